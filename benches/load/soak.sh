#!/usr/bin/env bash
# Soak test: a release build of hubgate under steady mixed load for minutes to hours, watching
# for leaks (open descriptors, RSS) and reporting latency as it goes.
#
#   bash benches/load/soak.sh [--minutes N] [--out FILE] [--no-build] [--keep]
#
#   --minutes N  how long the measured run lasts (default 3; fractions work; hours are fine)
#   --out FILE   the markdown report (default benches/results/soak-<date>-<time>.md)
#   --no-build   use target/release/{hubgate,examples/wsload} as they are
#   --keep       keep the work directory (hubgate's log, the websocket log) instead of removing it
#
# What runs, all on 127.0.0.1 and sharing every core:
# - hubgate (`cargo build --release`), with --metrics-port and --log-level warn;
# - examples/wsload echo: the websocket backend behind the route /soak/ws;
# - benches/load/soak_load.py: a pool of 40 small HTTP backends; 1 000 routes, 50 of them
#   replaced every 3 s (route churn); every 5 s the 4 backends stopped last time start again and
#   4 others stop, so their routes answer 503 meanwhile; HTTP traffic at a bounded rate
#   (300 req/s over 16 keep-alive connections; GETs, POSTs with bodies, 64 KiB answers);
#   100 websockets open at any time through hubgate, each living 2-15 s with an echoed message
#   every second, closed or dropped and replaced at once (about 12 opened and closed a second);
#   every 5 s a sample of hubgate's open descriptors (/proc/<pid>/fd, split into client,
#   upstream and websocket connections), VmRSS and Threads (/proc/<pid>/status), its routes and
#   open websockets (/metrics), the p99 of hubgate_request_duration_seconds over the interval,
#   and the client's p50/p99.
#
# At the end it prints the first and last samples and the verdict, and writes the report (the
# machine, the load, the trend, every sample). Exit 1 (FAIL) when descriptors or RSS trend up
# once warm: the mean of the last quarter of the samples against the second quarter, beyond
# +10 % (or +16 descriptors) and +15 % (or +4 MiB); also when hubgate dies, more than 0.5 %
# of the requests or websockets get no answer, or an echo comes back wrong. Knobs (environment):
# SOAK_RATE (req/s), SOAK_ROUTES, SOAK_BACKENDS, SOAK_WEBSOCKETS.
#
# Every process it starts is recorded and killed on exit (trap); every loop is bounded in count
# and time.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

MINUTES=3
OUT=""
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES=${2:?--minutes needs a number}; shift ;;
        --minutes=*) MINUTES=${1#--minutes=} ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --out=*) OUT=${1#--out=} ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
        *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
if ! python3 -c "import sys; m = float(sys.argv[1]); sys.exit(0 if 0 < m <= 7 * 24 * 60 else 1)" \
        "$MINUTES" 2>/dev/null; then
    echo "soak.sh: --minutes wants a number of minutes above 0 (at most a week), not '$MINUTES'" >&2
    exit 64
fi
SECONDS_TOTAL=$(python3 -c "import sys, math; print(math.ceil(float(sys.argv[1]) * 60))" "$MINUTES")

RATE=${SOAK_RATE:-300}
ROUTES=${SOAK_ROUTES:-1000}
BACKENDS=${SOAK_BACKENDS:-40}
WEBSOCKETS=${SOAK_WEBSOCKETS:-100}
TOKEN="soak-api-token-$$-$RANDOM"
STAMP=$(date +%Y-%m-%d-%H%M)
OUT=${OUT:-$REPO/benches/results/soak-$STAMP.md}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
HUBGATE=$TARGET_DIR/release/hubgate
WSLOAD=$TARGET_DIR/release/examples/wsload

# shellcheck source=lib.sh
. "$HERE/lib.sh"

# ---------------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    log "building hubgate and examples/wsload (release)"
    (cd "$REPO" && cargo build --release --bin hubgate --example wsload) || die "cargo build failed"
fi
[ -x "$HUBGATE" ] || die "$HUBGATE missing (build it, or drop --no-build)"
[ -x "$WSLOAD" ] || die "$WSLOAD missing (build it, or drop --no-build)"

NOFILE=$(ulimit -Hn)
ulimit -n "$NOFILE" 2>/dev/null
WORK=$(mktemp -d /tmp/hubgate-soak.XXXXXX)
REVISION="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    REVISION="$REVISION with uncommitted changes in src/"
fi
LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

PORT=$(free_port); API_PORT=$(free_port); METRICS_PORT=$(free_port); WS_PORT=$(free_port)
# The load's backends take BACKENDS ports from BACKEND_BASE: a block clear of the ports above.
for _ in $(seq 1 100); do
    BACKEND_BASE=$((25000 + RANDOM % 5000))
    clear=1
    for p in $USED_PORTS; do
        [ "$p" -ge "$BACKEND_BASE" ] && [ "$p" -lt $((BACKEND_BASE + BACKENDS)) ] && clear=0
    done
    [ $clear = 1 ] && break
done
ALL_CPUS="0-$(($(nproc) - 1))"

log "starting hubgate on 127.0.0.1:$PORT (API $API_PORT, metrics $METRICS_PORT)"
start hubgate "$ALL_CPUS" env CONFIGPROXY_AUTH_TOKEN="$TOKEN" "$HUBGATE" --ip 127.0.0.1 --port "$PORT" \
    --api-ip 127.0.0.1 --api-port "$API_PORT" \
    --metrics-ip 127.0.0.1 --metrics-port "$METRICS_PORT" \
    --log-level warn
HUBGATE_PID=$LAST_PID
wait_port "$API_PORT" && wait_port "$PORT" && wait_port "$METRICS_PORT" \
    || { cat "$WORK/hubgate.log" >&2; die "hubgate did not start"; }

# The echo backend outlives the run by a margin, then exits by itself if ever left behind.
start wsecho "$ALL_CPUS" "$WSLOAD" echo --listen "127.0.0.1:$WS_PORT" --secs $((SECONDS_TOTAL + 600))
wait_port "$WS_PORT" || die "wsload echo did not start"

log "soak for $MINUTES min: $ROUTES routes, $BACKENDS backends, $RATE req/s, $WEBSOCKETS websockets"
python3 "$HERE/soak_load.py" \
    --pid "$HUBGATE_PID" --proxy-port "$PORT" --api-port "$API_PORT" \
    --metrics-port "$METRICS_PORT" --ws-port "$WS_PORT" --token "$TOKEN" \
    --minutes "$MINUTES" --routes "$ROUTES" --backends "$BACKENDS" --rate "$RATE" \
    --websockets "$WEBSOCKETS" --backend-base "$BACKEND_BASE" --ready-file "$WORK/ready" \
    --report "$OUT" --proxy-log "$WORK/hubgate.log" --revision "$REVISION" \
    --loadavg-before "$LOADAVG_BEFORE" &
LOAD_PID=$!
PIDS+=("$LOAD_PID")

wait "$LOAD_PID"
STATUS=$?
if ! kill -0 "$HUBGATE_PID" 2>/dev/null; then
    log "hubgate is not running any more; its log ends:"
    tail -20 "$WORK/hubgate.log" >&2
    [ $STATUS = 0 ] && STATUS=1
fi
exit $STATUS
