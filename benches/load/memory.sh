#!/usr/bin/env bash
# Resident memory of hubgate (release build) for a big route table and for idle websockets, each
# in a fresh process, printed as one JSON line per step. Loopback only; every process it starts
# is killed on exit; every step is bounded in time. Takes about a minute at the defaults.
#
#   bash benches/load/memory.sh [--bin PATH] [--wsload PATH] [--routes N] [--syncs K] [--ws N]
#                               [--only table|ws] [-- extra hubgate flags]
#
#   --bin PATH     the hubgate binary (default target/release/hubgate)
#   --wsload PATH  the websocket load tool (default target/release/examples/wsload)
#   --routes N     routes in the sync (default 100000)
#   --syncs K      repeated syncs after the first, each of the same N routes: K with unchanged
#                  data, then K that change every target (default 10)
#   --ws N         idle websockets to hold (default 10000; fewer when descriptors run short: the
#                  proxy needs two per websocket)
#   --only WHAT    just the table steps, or just the websocket steps
#
# Build first: cargo build --release --bin hubgate --example wsload

set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=$REPO/target/release/hubgate
WSLOAD=$REPO/target/release/examples/wsload
ROUTES=100000
SYNCS=10
WS=10000
ONLY=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift ;;
        --wsload) WSLOAD=$2; shift ;;
        --routes) ROUTES=$2; shift ;;
        --syncs) SYNCS=$2; shift ;;
        --ws) WS=$2; shift ;;
        --only) ONLY=$2; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "memory.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
[ -x "$BIN" ] || { echo "memory.sh: no $BIN" >&2; exit 1; }

TOKEN="mem-token-$$"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hgmem.XXXXXX")
ALL_CPUS="0-$(($(nproc) - 1))"
say() { python3 -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:])))' "$@"; }

start_hubgate() {  # sets HG_PID, HG_PORT, HG_API
    HG_PORT=$(free_port); local api; api=$(free_port)
    start hubgate "$ALL_CPUS" env CONFIGPROXY_AUTH_TOKEN="$TOKEN" "$BIN" --ip 127.0.0.1 \
        --port "$HG_PORT" --api-ip 127.0.0.1 --api-port "$api" --log-level warn "${EXTRA[@]}"
    HG_PID=$LAST_PID
    HG_API=http://127.0.0.1:$api
    wait_port "$api" && wait_port "$HG_PORT" && sleep 1
}
sync() {  # TARGET: one sync of ROUTES routes; prints the seconds it took
    timeout 300 python3 "$HERE/routeapi.py" sync --api "$HG_API" --token "$TOKEN" \
        --target "$1" --count "$ROUTES" | tail -1 | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["status"]==200, r; print(round(r["secs"],3))'
}

if [ "$ONLY" != ws ]; then
    start_hubgate || die "hubgate did not start: $(cat "$WORK/hubgate.log")"
    empty=$(rss_kb "$HG_PID")
    say step=empty rss_kb="$empty"
    secs=$(sync http://127.0.0.1:9/)
    one=$(rss_kb "$HG_PID")
    say step="sync $ROUTES" secs="$secs" rss_kb="$one" \
        bytes_per_route="$(( (one - empty) * 1024 / ROUTES ))"
    timeout 120 python3 "$HERE/routeapi.py" list --api "$HG_API" --token "$TOKEN" >/dev/null
    say step="GET /api/routes" rss_kb="$(rss_kb "$HG_PID")"
    for i in $(seq 1 "$SYNCS"); do
        secs=$(sync http://127.0.0.1:9/)
        say step="same sync $i" secs="$secs" rss_kb="$(rss_kb "$HG_PID")"
    done
    for i in $(seq 1 "$SYNCS"); do
        secs=$(sync "http://127.0.0.1:9/v$i")
        say step="sync changing every target $i" secs="$secs" rss_kb="$(rss_kb "$HG_PID")"
    done
    sleep 2
    say step="2 s later" rss_kb="$(rss_kb "$HG_PID")"
    stop "$HG_PID"
fi

if [ "$ONLY" != table ]; then
    [ -x "$WSLOAD" ] || { echo "memory.sh: no $WSLOAD" >&2; exit 1; }
    # The proxy holds two descriptors per websocket; leave room for its listeners.
    fit=$(( ($(ulimit -n) - 100) / 2 ))
    [ "$WS" -gt "$fit" ] && WS=$fit
    ws_port=$(free_port)
    start wsecho "$ALL_CPUS" "$WSLOAD" echo --listen "127.0.0.1:$ws_port" --secs 600
    wait_port "$ws_port" || die "echo backend did not start"
    start_hubgate || die "hubgate did not start: $(cat "$WORK/hubgate.log")"
    curl -s -o /dev/null --max-time 10 -X POST -H "Authorization: token $TOKEN" \
        -d "{\"target\": \"http://127.0.0.1:$ws_port\"}" "$HG_API/api/routes/ws"
    res=$(timeout 300 "$WSLOAD" hold --url "ws://127.0.0.1:$HG_PORT/ws" --conns "$WS" \
        --pid "$HG_PID" --secs 2)
    echo "$res"
    python3 - "$res" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
per = (r["rss_kb_held"] - r["rss_kb_before"]) / max(r["opened"], 1)
print(json.dumps({"step": "websockets", "opened": r["opened"], "kib_each": round(per, 2),
                  "mib_for_10000": round(per * 10000 / 1024, 1)}))
EOF
    sleep 2
    say step="websockets closed, 2 s later" rss_kb="$(rss_kb "$HG_PID")"
fi
