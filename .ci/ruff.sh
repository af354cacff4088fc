#!/usr/bin/env bash
# ruff over every Python file of the repository: `ruff check` and `ruff format --check` of `.`,
# with the settings in pyproject.toml ([tool.ruff]; target/ is excluded there, so are the venvs
# the other CI scripts and the tests make under it). Run from anywhere: bash .ci/ruff.sh
#
# The one place that says which ruff CI uses: a new ruff can flag or format code that the old
# one passed, so the version is pinned, and raised here for the whole repository at once.
# Installs it from PyPI into target/ruff-venv, which later runs reuse until the pin changes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUFF=ruff==0.17.6
venv=target/ruff-venv

if [[ ! -x $venv/bin/ruff || "$(cat "$venv/.requirements" 2>/dev/null)" != "$RUFF" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input "$RUFF"
    echo "$RUFF" >"$venv/.requirements"
fi
"$venv/bin/ruff" --version

# --no-cache: nothing written into the work tree (ruff would make .ruff_cache/ at the root).
"$venv/bin/ruff" check --no-cache .
"$venv/bin/ruff" format --no-cache --check .
