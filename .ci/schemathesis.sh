#!/usr/bin/env bash
# Fuzz hubgate's API against docs/openapi.json with schemathesis (PyPI), on loopback only.
#
#   bash .ci/schemathesis.sh [--max-time SECONDS] [--max-examples N] [--seed N]
#
# Makes its own venv under target/ with pinned schemathesis, builds the debug hubgate (which
# `cargo test` has built already in CI), then runs tests/schemathesis/run.py: every operation on
# the API port (examples, coverage, fuzzing, and the stateful phase that follows the document's
# links) and on the metrics listener, then the checks that the table left behind parses, routes,
# and survives a restart. Fails on any server error, any answer the document does not allow, or
# any inconsistency. (ruff checks run.py with the rest of the repository's Python: .ci/ruff.sh.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCHEMATHESIS=schemathesis==4.32.5
venv=target/schemathesis-venv
marker="$venv/hubgate-ready"

if [ "$(cat "$marker" 2>/dev/null)" != "$SCHEMATHESIS" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "$SCHEMATHESIS"
    echo "$SCHEMATHESIS" >"$marker"
fi
"$venv/bin/schemathesis" --version

cargo build --bin hubgate
"$venv/bin/python" tests/schemathesis/run.py \
    --hubgate target/debug/hubgate --schemathesis "$venv/bin/schemathesis" "$@"
