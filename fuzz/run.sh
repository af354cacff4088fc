#!/usr/bin/env bash
# Builds and runs every hubgate fuzz target for a bounded time, then prints a summary table.
#
#   fuzz/run.sh [seconds-per-target] [target...]
#
# Needs the nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz from
# crates.io when it is missing. Each target starts from its seeds in fuzz/seeds/<target> (kept in
# the repository) and grows its working corpus in fuzz/corpus/<target> (ignored by git). A crash
# leaves its input in fuzz/artifacts/<target>/ and the whole log in fuzz/logs/<target>.log;
# reproduce it with `cargo +nightly fuzz run <target> <file>`. Exits non-zero when any target
# found something.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
seconds="${1:-60}"
shift || true
all=(path routes api_bodies target credentials session config)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "run.sh: the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

# Build everything first, so that the time given is spent fuzzing (and a source change made while
# this runs does not trigger a rebuild in the middle).
cargo +nightly fuzz build -O
host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin="target/$host/release"

count_artifacts() {
    find "artifacts/$1" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) \
        2>/dev/null | wc -l
}

mkdir -p logs
status=0
rows=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
    log="logs/$t.log"
    before=$(count_artifacts "$t")
    start=$(date +%s)
    set +e
    ASAN_OPTIONS="detect_odr_violation=0:${ASAN_OPTIONS:-}" "$bin/$t" "corpus/$t" "seeds/$t" \
        -artifact_prefix="artifacts/$t/" -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    crashes=$(($(count_artifacts "$t") - before))
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then status=1; fi
    rows+=("$(printf '%-12s %8s %12s %9s %8s %4s' "$t" "$took" "${execs:-?}" "${cov:-?}" "$crashes" "$rc")")
done
rm -f /dev/shm/hubgate-fuzz-config-*.toml 2>/dev/null || true

printf '\n%-12s %8s %12s %9s %8s %4s\n' target seconds executions coverage crashes rc
for r in "${rows[@]}"; do echo "$r"; done
exit "$status"
