#!/usr/bin/env bash
# Request throughput of two hubgate builds, A and B, measured in turns (A B A B ...) on the same
# machine against the same backend, so that whatever else runs on a shared machine falls on both
# alike; prints each run and the B/A ratios of the medians. Loopback only; every process it starts
# is killed on exit; takes about (2 + secs) x 2 x rounds seconds.
#
#   bash benches/load/abtest.sh A_BIN B_BIN [--rounds N] [--secs S] [--routes R]
#
# Each run: a fresh hubgate with R routes (one sync, default 10 000), a 1 s warm-up, then
# `wrk -t2 -c64 -d S` on /user/u<R/2>/small (a ~80-byte answer from one nginx worker); the CPU
# the hubgate process used during the run, per request, is the steadier figure on a busy machine.

set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
A=${1:?usage: abtest.sh A_BIN B_BIN [--rounds N] [--secs S] [--routes R]}
B=${2:?usage: abtest.sh A_BIN B_BIN [--rounds N] [--secs S] [--routes R]}
shift 2
ROUNDS=5
SECS=5
ROUTES=10000
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --routes) ROUTES=$2; shift ;;
        *) echo "abtest.sh: unknown argument $1" >&2; exit 64 ;;
    esac
    shift
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
command -v wrk >/dev/null || { echo "abtest.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
TOKEN="ab-token-$$"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hgab.XXXXXX")

BACKEND_PORT=$(free_port)
mkdir -p "$WORK/tmp"
cat >"$WORK/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path $WORK/tmp;
    proxy_temp_path $WORK/tmp;
    fastcgi_temp_path $WORK/tmp;
    uwsgi_temp_path $WORK/tmp;
    scgi_temp_path $WORK/tmp;
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location / { default_type text/plain; return 200 "hello from the backend: a small static response of about one hundred bytes.....\n"; }
    }
}
EOF
ALL_CPUS="0-$(($(nproc) - 1))"
start backend "$ALL_CPUS" "$NGINX" -p "$WORK" -c "$WORK/nginx.conf"
wait_port "$BACKEND_PORT" || die "backend did not start: $(cat "$WORK/backend.log" "$WORK/error.log" 2>/dev/null)"

run() {  # BIN: prints "req/s cpu_us_per_req"
    local bin=$1 p api pid out c0 c1
    p=$(free_port); api=$(free_port)
    start hubgate "$ALL_CPUS" env CONFIGPROXY_AUTH_TOKEN="$TOKEN" "$bin" --ip 127.0.0.1 --port "$p" \
        --api-ip 127.0.0.1 --api-port "$api" --log-level warn
    pid=$LAST_PID
    wait_port "$api" && wait_port "$p" || die "hubgate did not start: $(cat "$WORK/hubgate.log")"
    timeout 120 python3 "$HERE/routeapi.py" sync --api "http://127.0.0.1:$api" --token "$TOKEN" \
        --target "http://127.0.0.1:$BACKEND_PORT" --count "$ROUTES" >/dev/null
    local url="http://127.0.0.1:$p/user/u$((ROUTES / 2))/small"
    timeout 30 wrk -t2 -c64 -d1s "$url" >/dev/null 2>&1
    c0=$(cpu_ticks "$pid")
    out=$(timeout $((SECS + 30)) wrk -t2 -c64 -d"${SECS}s" "$url" 2>&1)
    c1=$(cpu_ticks "$pid")
    stop "$pid"
    python3 - "$out" "$c0" "$c1" "$CLK_TCK" <<'EOF'
import re, sys
out, c0, c1, tck = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reqs = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))
print(f"{rps:.0f} {(c1 - c0) / tck * 1e6 / reqs:.2f}")
EOF
}

ra=(); rb=(); ca=(); cb=()
for i in $(seq 1 "$ROUNDS"); do
    read -r r c < <(run "$A"); ra+=("$r"); ca+=("$c"); echo "round $i A: $r req/s, $c µs CPU/req"
    read -r r c < <(run "$B"); rb+=("$r"); cb+=("$c"); echo "round $i B: $r req/s, $c µs CPU/req"
done
python3 - "${ra[*]}" "${rb[*]}" "${ca[*]}" "${cb[*]}" <<'EOF'
import statistics as st, sys
ra, rb, ca, cb = ([float(x) for x in a.split()] for a in sys.argv[1:])
print(f"median req/s: A {st.median(ra):.0f}, B {st.median(rb):.0f}, B/A {st.median(rb) / st.median(ra):.3f}")
print(f"median CPU µs/req: A {st.median(ca):.2f}, B {st.median(cb):.2f}, B/A {st.median(cb) / st.median(ca):.3f}")
EOF
