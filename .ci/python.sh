#!/usr/bin/env bash
# The pip package (jupyterhub-hubgate): build the wheel once, install it with JupyterHub into a
# venv under target/, then the tests in tests/python (a real JupyterHub, headless Chromium).
# Called by .ci/run after `cargo test`, whose compiled dependencies the wheel's build reuses (the
# wheel is built with the dev profile here; see benches/jupyterhub_reconcile.py for the release
# wheel and its size). (ruff checks this Python with the rest of the repository's: .ci/ruff.sh.)
#
# Installs what is missing: Debian's chromium and chromium-driver (apt-get, as root), and
# maturin, JupyterHub, pytest, pytest-asyncio and selenium from PyPI into venvs under
# target/python/ that later runs reuse (a venv is made again when its requirements change).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
out=$root/target/python
mkdir -p "$out"

# The JupyterHub the tests run against: the same as tests/it/jhub.rs.
jupyterhub_req='jupyterhub>=6,<7'
tools_req='maturin>=1.5,<2'
test_req="$jupyterhub_req pytest>=8 pytest-asyncio>=0.24 selenium>=4.20"

# venv DIR REQUIREMENTS: a venv at DIR holding REQUIREMENTS, made again when they change.
venv() {
    local dir=$1 req=$2
    if [[ ! -x $dir/bin/python || "$(cat "$dir/.requirements" 2>/dev/null)" != "$req" ]]; then
        rm -rf "$dir"
        python3 -m venv "$dir"
        # shellcheck disable=SC2086 # the requirements are words
        "$dir/bin/pip" install --quiet --disable-pip-version-check $req
        echo "$req" >"$dir/.requirements"
    fi
}

if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "installing Debian's chromium and chromium-driver for the browser test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
dpkg-query -W -f '${Package} ${Version}\n' chromium chromium-driver

venv "$out/tools" "$tools_req"
venv "$out/venv" "$test_req"

echo "building the wheel"
rm -rf "$out/wheels"
"$out/tools/bin/maturin" build --quiet --profile dev --out "$out/wheels"
wheel=$(ls "$out"/wheels/jupyterhub_hubgate-*.whl)
echo "built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

# The wheel replaces whatever an earlier run installed; its dependencies are in the venv already.
"$out/venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"
"$out/venv/bin/pip" check

echo "pytest tests/python"
cd "$root"
"$out/venv/bin/python" -m pytest tests/python -p no:cacheprovider -q
