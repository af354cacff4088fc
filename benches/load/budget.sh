#!/usr/bin/env bash
# The per-request cost budget: instructions and heap allocations per proxied request, counted
# (not timed) so that the figure is the same on a busy machine as on a quiet one.
#
#   bash benches/load/budget.sh [--bin PATH] [--requests N] [--conns C] [--routes R] [--top K]
#                               [--preload LIB] [--floor | --auth]
#
# hubgate runs under `valgrind --tool=callgrind` with one worker; a backend (examples/fixedload
# serve) answers a small body. After a warm-up (every connection opened, pools filled), the
# counters are zeroed, N requests are sent on C keep-alive connections through one route of a
# table of R, and the counters are dumped. Everything counted in that window is divided by N:
# instructions (Ir), calls to malloc/calloc/realloc, and the top K functions by their own
# instructions. `--bin` measures another build (e.g. an older commit's) the same way;
# `--preload` runs it with another allocator (e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2).
# `--floor` measures the bare hyper proxy (`fixedload floor`) instead: the floor hubgate's own
# work sits on. `--auth` turns on authentication at the edge against benches/load/fakehub.py and
# sends a token the hub knows (cached after the warm-up): what a checked request costs.
#
# Needs valgrind (installed from Debian when missing, as root) and builds hubgate and
# examples/fixedload with cargo --release unless --bin is given.

set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BIN=""
REQUESTS=20000
CONNS=32
ROUTES=1000
TOP=25
PRELOAD=""
FLOOR=""
AUTH=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=${2:?}; shift ;;
        --requests) REQUESTS=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --routes) ROUTES=${2:?}; shift ;;
        --top) TOP=${2:?}; shift ;;
        --preload) PRELOAD=${2:?}; shift ;;
        --floor) FLOOR=1 ;;
        --auth) AUTH=1 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "budget.sh: unknown argument $1" >&2; exit 64 ;;
    esac
    shift
done

command -v valgrind >/dev/null || {
    [ "$(id -u)" = 0 ] || die "valgrind is missing: install it or run as root"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null \
        || die "apt-get install valgrind failed"
}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
(cd "$REPO" && cargo build -q --release --example fixedload) || die "cannot build examples/fixedload"
if [ -z "$BIN" ] && [ -z "$FLOOR" ]; then
    (cd "$REPO" && cargo build -q --release --bin hubgate) || die "cannot build hubgate"
    BIN=$TARGET_DIR/release/hubgate
fi
LOAD=$TARGET_DIR/release/examples/fixedload
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hgbudget.XXXXXX")

BACKEND_PORT=$(free_port)
PROXY_PORT=$(free_port)
API_PORT=$(free_port)
TOKEN=budget-token-$$
start backend 0-63 "$LOAD" serve --listen "127.0.0.1:$BACKEND_PORT" --secs 1800
wait_port "$BACKEND_PORT" || die "backend did not start"

add_routes() {
    wait_port "$API_PORT" 600 || die "hubgate's API did not start"
    log "adding $ROUTES routes"
    python3 - "$API_PORT" "$TOKEN" "$ROUTES" "$BACKEND_PORT" <<'PY' || die "adding routes failed"
import json, sys, urllib.request
api, token, n, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
routes = {f"/user/u{i}": {"target": f"http://127.0.0.1:{backend}", "user": f"u{i}"}
          for i in range(n)}
req = urllib.request.Request(f"http://127.0.0.1:{api}/api/proxy", method="POST",
    data=json.dumps(routes).encode(),
    headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=300).read()
PY
}

if [ -n "$FLOOR" ]; then
    BIN="$LOAD floor"
    LD_PRELOAD=$PRELOAD start hubgate 0-63 valgrind --tool=callgrind \
        --callgrind-out-file="$WORK/cg.out" \
        "$LOAD" floor --listen "127.0.0.1:$PROXY_PORT" --target "127.0.0.1:$BACKEND_PORT" --secs 1800
else
    HUB_FLAGS=()
    if [ -n "$AUTH" ]; then
        HUB_PORT=$(free_port)
        USER_TOKEN=budget-user-token-$$
        start fakehub 0-63 python3 "$HERE/fakehub.py" --port "$HUB_PORT" --token "$USER_TOKEN" \
            --user "u$((ROUTES / 2))" --secs 1800
        wait_port "$HUB_PORT" || die "the fake hub did not start"
        HUB_FLAGS=(--hub-api-url "http://127.0.0.1:$HUB_PORT/hub/api")
        export JUPYTERHUB_API_TOKEN=budget-hub-token-$$
    fi
    # One worker: the budget is the work a request costs, not how it spreads.
    # TOKIO_WORKER_THREADS does the same for builds older than --workers.
    HUBGATE_WORKERS=1 TOKIO_WORKER_THREADS=1 CONFIGPROXY_AUTH_TOKEN=$TOKEN LD_PRELOAD=$PRELOAD \
        start hubgate 0-63 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
        "$BIN" --ip 127.0.0.1 --port "$PROXY_PORT" --api-ip 127.0.0.1 --api-port "$API_PORT" \
        --log-level warn "${HUB_FLAGS[@]}"
fi
SEND_HEADER=()
[ -n "$AUTH" ] && SEND_HEADER=(--header "Authorization: token $USER_TOKEN")
HG_PID=$LAST_PID
wait_port "$PROXY_PORT" 1200 || die "the proxy did not start under valgrind: $(tail -5 "$WORK/hubgate.log")"
[ -n "$FLOOR" ] || add_routes
URL="http://127.0.0.1:$PROXY_PORT/user/u$((ROUTES / 2))/api/contents"
log "warm-up: $((CONNS * 20)) requests on $CONNS connections"
"$LOAD" send --url "$URL" --conns "$CONNS" --requests $((CONNS * 20)) "${SEND_HEADER[@]}" >/dev/null \
    || die "warm-up failed"
callgrind_control -z "$HG_PID" >/dev/null || die "callgrind_control -z failed"
log "measuring: $REQUESTS requests on $CONNS connections"
"$LOAD" send --url "$URL" --conns "$CONNS" --requests "$REQUESTS" "${SEND_HEADER[@]}" \
    >"$WORK/send.json" || die "load failed"
callgrind_control -d "$HG_PID" >/dev/null || die "callgrind_control -d failed"
DUMP=$(ls "$WORK"/cg.out.* 2>/dev/null | head -1)
[ -n "$DUMP" ] || die "no callgrind dump"

python3 - "$DUMP" "$REQUESTS" "$TOP" "$BIN" "$PRELOAD" <<'PY'
import re, subprocess, sys
dump, n, top, binary = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
names, total, allocs = {}, 0, 0
alloc_fns = {"malloc", "calloc", "realloc", "__libc_malloc", "__libc_calloc", "__libc_realloc"}
current_cfn = None
with open(dump, errors="replace") as f:
    for line in f:
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2).strip()
            if line.startswith("cfn="):
                current_cfn = names.get(m.group(1))
            continue
        if line.startswith("calls=") and current_cfn in alloc_fns:
            allocs += int(line.split("=")[1].split()[0])
print(f"binary: {binary}" + (f" (allocator preloaded: {sys.argv[5]})" if sys.argv[5] else ""))
print(f"requests measured: {n}")
print(f"instructions per request: {total / n:,.0f}")
print(f"heap allocations per request (malloc+calloc+realloc calls): {allocs / n:.1f}")
print(f"\ntop {top} functions by own instructions per request:")
out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", dump],
                     capture_output=True, text=True).stdout
rows = []
for line in out.splitlines():
    m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)", line)
    if m and "PROGRAM TOTALS" not in line:
        rows.append((int(m.group(1).replace(",", "")), m.group(2)))
for ir, name in rows[:top]:
    name = re.sub(r"^\S*:", "", name, count=1) if " " not in name.split(":")[0] else name
    print(f"{ir / n:10,.0f}  {name[:150]}")
PY
