#!/usr/bin/env bash
# Whole-process load benchmark: hubgate (release build) side by side with the backend alone,
# nginx as a reverse proxy (1 worker, and as many workers as cores) and configurable-http-proxy
# 5.3.0, on loopback, in one run, printing one table and the ratios measured in that run.
#
#   bash benches/load/run.sh [--quick] [--rows LIST] [--rounds N] [--out FILE] [--no-build] [--keep]
#
#   --quick     a short smoke run (2 s per row, 100/1000 websockets): proves it works, nothing more
#   --rows LIST only these groups of rows, comma-separated (default all):
#               small  small responses: backend directly, nginx 1 and N workers, the bare hyper
#                      proxy (the floor, one thread), hubgate --workers 1 and default workers
#                      (and CHP with chp)
#               big    the same with 1 MiB responses
#               chp    configurable-http-proxy's rows (its load rows follow small/big)
#               api    route adds one by one (hubgate and CHP; hubgate's file store)
#               table  big tables: a sync of 100 000 routes, GET /api/routes, repeated syncs
#               ws     websockets held and echoed
#               scrape hubgate with /metrics scraped, the plain run again, one scrape's cost
#               auth   hubgate with authentication at the edge against a fake hub
#               redis  hubgate replicas on a Redis store
#               failover  Redis's own rows, from failover.sh: write latency with
#                      --redis-min-replicas 0 and 1 (Sentinel, cluster), SIGKILL of the primary
#                      to the first accepted write, propagation between two replicas through one
#                      Redis and through a cluster. Not in `all`: it needs no quiet machine (Redis
#                      round trips, not proxy CPU), and alone it starts no nginx and no wrk
#               e.g. `--rows small,big --rounds 3`: issue 14's comparison, quickly
#   --rounds N  measure every selected row N times (rounds one after another, each with fresh
#               processes) and report each figure's median, with the rounds' figures in the notes
#   --out FILE  where the markdown report goes (default benches/results/<date>-<host>[-quick].md)
#   --no-build  use target/release/{hubgate,examples/wsload} as they are
#   --commit REV  build hubgate from git commit REV (exported to /tmp, its own target directory)
#               instead of the work tree, e.g. while the work tree is being edited
#   --keep      keep the work directory (logs, configs) instead of removing it
#
# Environment: BACKEND_CPUS, PROXY_CPUS, LOAD_CPUS (taskset lists; default: every core for each,
# see "CPU placement" below), HGBENCH_CHP_DIR (where CHP is installed, default
# /tmp/hgbench-chp-5.3.0).
#
# What it installs when missing: wrk, nginx and redis-server (Debian, needs root), configurable-http-proxy
# 5.3.0 (npm, into HGBENCH_CHP_DIR); it builds hubgate and examples/wsload with cargo --release.
#
# Every process it starts is recorded and killed on exit; every loop is bounded in count and
# time; every address is 127.0.0.1.
#
# CPU placement: the machine this was written for has 2 cores, too few to give the load
# generator, the backend and the proxy a core each. Rather than flatter one side with a private
# core, everything shares all cores by default (taskset -c 0-<n-1> on each process): the backend
# is one nginx worker, wrk runs 2 threads, and the proxy gets what is left. Absolute figures are
# therefore lower bounds; the ratios between rows, taken under the same conditions, are the
# result. Override with BACKEND_CPUS / PROXY_CPUS / LOAD_CPUS; the report records the placement.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

QUICK=0
OUT=""
BUILD=1
KEEP=0
COMMIT_REV=""
ROWS=all
ROUNDS=1
EMIT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --out=*) OUT=${1#--out=} ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --commit) COMMIT_REV=${2:?--commit needs a revision}; shift ;;
        --rows) ROWS=${2:?--rows needs a list}; shift ;;
        --rows=*) ROWS=${1#--rows=} ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
        --rounds=*) ROUNDS=${1#--rounds=} ;;
        --emit) EMIT=${2:?}; shift ;;   # internal: one round of --rounds, rows and meta to $EMIT.*
        -h|--help) sed -n '2,49p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

GROUPS_KNOWN=",all,small,big,chp,api,table,ws,scrape,auth,redis,failover,"
for g in ${ROWS//,/ }; do
    case "$GROUPS_KNOWN" in *",$g,"*) ;; *) echo "run.sh: unknown row group '$g' in --rows (see --help)" >&2; exit 64 ;; esac
done
case "$ROUNDS" in ''|*[!0-9]*|0) echo "run.sh: --rounds wants a number from 1, not '$ROUNDS'" >&2; exit 64 ;; esac
# want GROUP: whether --rows selected it.
want() { case ",$ROWS," in *",$1,"* | *",all,"*) return 0 ;; esac; return 1; }
want_load() { want small || want big; }
# named GROUP: whether --rows names it (for the groups that `all` leaves out).
named() { case ",$ROWS," in *",$1,"*) return 0 ;; esac; return 1; }
# Whether a selected group needs the nginx backend, wrk and wsload (every group but failover).
want_backend() {
    local g
    for g in small big chp api table ws scrape auth redis; do want "$g" && return 0; done
    return 1
}

if [ "$QUICK" = 1 ]; then
    DUR=2; WARM=1; WS_SMALL=100; WS_LARGE=1000; WS_RATE_SECS=2; WS_HOLD_SECS=1
    CHP_MAX_ROUTES=100000; CHP_ADD_LIMIT=40; MODE=quick
else
    DUR=10; WARM=2; WS_SMALL=1000; WS_LARGE=10000; WS_RATE_SECS=10; WS_HOLD_SECS=3
    CHP_MAX_ROUTES=100000; CHP_ADD_LIMIT=300; MODE=full
fi
ROUTES=10000          # routes in every proxy's table during the load rows
MIDDLE=5000           # the route the load hits: /user/u5000
WS_INDEX=4999         # /user/u4999 goes to the websocket echo backend
SYNC_ROUTES=100000    # one sync of this many routes (hubgate), and the GET /api/routes size
WS_RATE_CONNS=100
WRK_THREADS=2
WRK_CONNS=64
SMALL_BODY="hello from the backend: a small static response of about one hundred bytes....."
BIG_BYTES=1048576
TOKEN="bench-api-token-$$"
HUB_TOKEN="bench-hub-token-$$"
USER_TOKEN="bench-user-token-$$"

NPROC=$(nproc)
ALL_CPUS="0-$((NPROC - 1))"
BACKEND_CPUS=${BACKEND_CPUS:-$ALL_CPUS}
PROXY_CPUS=${PROXY_CPUS:-$ALL_CPUS}
LOAD_CPUS=${LOAD_CPUS:-$ALL_CPUS}
CHP_DIR=${HGBENCH_CHP_DIR:-/tmp/hgbench-chp-5.3.0}
SRC=$REPO
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
if [ -n "$COMMIT_REV" ]; then
    COMMIT_FULL=$(git -C "$REPO" rev-parse --verify "$COMMIT_REV^{commit}") || { echo "run.sh: no commit $COMMIT_REV" >&2; exit 64; }
    SRC=/tmp/hgbench-src-${COMMIT_FULL:0:12}
    TARGET_DIR=/tmp/hgbench-target
fi
HUBGATE=$TARGET_DIR/release/hubgate
WSLOAD=$TARGET_DIR/release/examples/wsload
FIXEDLOAD=$TARGET_DIR/release/examples/fixedload

num() { python3 -c "print(f'{$1:,}')"; }   # 10000 -> 10,000, for row names
# shellcheck source=lib.sh
. "$HERE/lib.sh"   # log, die, start, stop, cleanup (the EXIT trap), ports, rss_kb, cpu_split, ctx_switches

row() { python3 "$HERE/report.py" add --rows "$WORK/rows.jsonl" "$@"; }

# ---------------------------------------------------------------------------------------------
# 1. What the benchmark needs.
install_tools() {
    local missing=()
    if want_backend; then
        command -v wrk >/dev/null || missing+=(wrk)
        command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
    fi
    if want redis || named failover; then command -v redis-server >/dev/null || missing+=(redis-server); fi
    if want chp; then
        command -v node >/dev/null || missing+=(nodejs)
        command -v npm >/dev/null || missing+=(npm)
    fi
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v python3 >/dev/null || missing+=(python3)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run as root or install them"
        log "installing ${missing[*]} from Debian"
        apt-get update -qq || die "apt-get update failed"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"${TMPDIR:-/tmp}/hgbench-apt.log" 2>&1; then
            # nginx-light is not in every release; plain nginx is.
            local alt=("${missing[@]/nginx-light/nginx}")
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${alt[@]}" \
                >>"${TMPDIR:-/tmp}/hgbench-apt.log" 2>&1 || die "apt-get install ${alt[*]} failed"
        fi
    fi
    command -v nginx >/dev/null || PATH=$PATH:/usr/sbin
    CHP_BIN=$CHP_DIR/node_modules/configurable-http-proxy/bin/configurable-http-proxy
    if want chp && [ ! -f "$CHP_BIN" ]; then
        log "installing configurable-http-proxy 5.3.0 into $CHP_DIR"
        mkdir -p "$CHP_DIR"
        npm install --silent --no-audit --no-fund --prefix "$CHP_DIR" configurable-http-proxy@5.3.0 \
            >"$CHP_DIR/npm.log" 2>&1 || die "npm install failed (see $CHP_DIR/npm.log)"
    fi
    if want chp; then [ -f "$CHP_BIN" ] || die "configurable-http-proxy not found at $CHP_BIN"; fi
    if [ "$BUILD" = 1 ]; then
        if [ "$SRC" != "$REPO" ] && [ ! -f "$SRC/Cargo.toml" ]; then
            log "exporting commit $COMMIT_REV to $SRC"
            mkdir -p "$SRC.part" && git -C "$REPO" archive "$COMMIT_FULL" | tar -x -C "$SRC.part" \
                && mv "$SRC.part" "$SRC" || die "cannot export $COMMIT_REV"
        fi
        # The load tool comes from the work tree when the commit predates it.
        local tool
        for tool in wsload fixedload; do
            if [ "$SRC" != "$REPO" ] && ! git -C "$REPO" cat-file -e "$COMMIT_FULL:examples/$tool.rs" 2>/dev/null; then
                mkdir -p "$SRC/examples" && cp "$REPO/examples/$tool.rs" "$SRC/examples/$tool.rs"
            fi
        done
        local what=(--bin hubgate)
        want_backend && what+=(--example wsload)
        want_load && what+=(--example fixedload)
        log "building ${what[*]} in $SRC (cargo build --release)"
        (cd "$SRC" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release "${what[@]}") \
            || die "cargo build --release failed"
    fi
    [ -x "$HUBGATE" ] || die "no $HUBGATE (build it, or drop --no-build)"
    if want_backend; then [ -x "$WSLOAD" ] || die "no $WSLOAD (build it, or drop --no-build)"; fi
    if want_load; then [ -x "$FIXEDLOAD" ] || die "no $FIXEDLOAD (build it, or drop --no-build)"; fi
}

install_tools

# --rounds N: this script once per round (tools and build done above), then the medians.
if [ "$ROUNDS" -gt 1 ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/hgbench-rounds.XXXXXX")
    pass=()
    [ "$QUICK" = 1 ] && pass+=(--quick)
    [ -n "$COMMIT_REV" ] && pass+=(--commit "$COMMIT_REV")
    [ "$KEEP" = 1 ] && pass+=(--keep)
    for r in $(seq 1 "$ROUNDS"); do
        log "round $r of $ROUNDS"
        bash "$0" "${pass[@]}" --rows "$ROWS" --no-build --emit "$WORK/round$r" \
            || die "round $r failed"
    done
    python3 "$HERE/report.py" median --rows-in "$WORK"/round*.rows.jsonl --out "$WORK/rows.jsonl"
    python3 - "$WORK/round1.meta.json" "$WORK/round$ROUNDS.meta.json" "$ROUNDS" >"$WORK/meta.json" <<'EOF'
import json, sys
first, last, n = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
first["mode"] = f"median of {n} rounds, each: {first['mode']}"
first["ratios_from"] = f"medians of {n} rounds, each round measuring every row"
first["loadavg_after"] = last["loadavg_after"]
json.dump(first, sys.stdout)
EOF
    if [ -z "$OUT" ]; then
        suffix="-median$ROUNDS"; [ "$QUICK" = 1 ] && suffix="-quick$suffix"
        OUT=$REPO/benches/results/$(date +%F)-$(hostname -s 2>/dev/null || hostname)$suffix.md
    fi
    mkdir -p "$(dirname "$OUT")"
    python3 "$HERE/report.py" render --rows "$WORK/rows.jsonl" --meta "$WORK/meta.json" \
        --rows-in "$WORK"/round*.rows.jsonl >"$OUT"
    cat "$OUT"
    log "report written to $OUT"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hgbench.XXXXXX")
chmod 755 "$WORK"   # nginx workers may run as nobody and must read the backend's files
: >"$WORK/rows.jsonl"
RUN_START=$(date +%s)
LOADAVG_BEFORE=$(cut -d" " -f1-3 /proc/loadavg)

# File descriptors: 10 000 proxied websockets are 20 000 descriptors in the proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
WS_LARGE_WANTED=$WS_LARGE
WS_LIMIT_NOTE=""
if [ "$NOFILE" != unlimited ] && [ $((WS_LARGE * 2 + 200)) -gt "$NOFILE" ]; then
    WS_LARGE=$(((NOFILE - 200) / 2 / 100 * 100))
    WS_LIMIT_NOTE="wanted $WS_LARGE_WANTED, but the hard limit on open files is $NOFILE (2 per proxied websocket)"
    log "websockets: $WS_LIMIT_NOTE; using $WS_LARGE"
fi

# ---------------------------------------------------------------------------------------------
# 2. The backends: nginx serving a small response and a 1 MiB file, and the websocket echo.
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if want_backend; then
BACKEND_PORT=$(free_port)
mkdir -p "$WORK/backend/www" "$WORK/backend/tmp"
head -c "$BIG_BYTES" /dev/urandom >"$WORK/backend/www/big.bin"
chmod -R a+rX "$WORK/backend"

nginx_common() {  # the lines every nginx here shares; $1 is its directory
    cat <<EOF
daemon off;
master_process on;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections 16384; multi_accept on; }
EOF
}
nginx_http_common() {
    cat <<EOF
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

{
    echo "worker_processes 1;"
    nginx_common "$WORK/backend"
    echo "http {"
    nginx_http_common "$WORK/backend"
    cat <<EOF
    sendfile on;
    tcp_nopush on;
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        location ~ /small\$ { default_type text/plain; return 200 "$SMALL_BODY\n"; }
        location ~ /big\$ {
            root $WORK/backend/www;
            default_type application/octet-stream;
            rewrite ^ /big.bin break;
        }
    }
}
EOF
} >"$WORK/backend/nginx.conf"
start backend "$BACKEND_CPUS" "$NGINX" -p "$WORK/backend" -e "$WORK/backend/error.log" -c "$WORK/backend/nginx.conf"
BACKEND_PID=$LAST_PID
wait_port "$BACKEND_PORT" || die "backend nginx did not start: $(cat "$WORK/backend.log" "$WORK/backend/error.log" 2>/dev/null)"
BACKEND=http://127.0.0.1:$BACKEND_PORT

WS_PORT=$(free_port)
start wsecho "$BACKEND_CPUS" "$WSLOAD" echo --listen "127.0.0.1:$WS_PORT" --secs 14400
WS_PID=$LAST_PID
wait_port "$WS_PORT" || die "websocket echo backend did not start: $(cat "$WORK/wsecho.log")"
WS_BACKEND=http://127.0.0.1:$WS_PORT

# Sanity: the backend answers what we think.
got=$(curl -s --max-time 5 "$BACKEND/user/u$MIDDLE/small") || die "backend did not answer"
[ "$got" = "$SMALL_BODY" ] || die "backend answered '$got'"
got=$(curl -s --max-time 5 -o /dev/null -w '%{size_download}' "$BACKEND/user/u$MIDDLE/big")
[ "$got" = "$BIG_BYTES" ] || die "backend's big file is $got bytes"

log "backend nginx on :$BACKEND_PORT (cpus $BACKEND_CPUS), websocket echo on :$WS_PORT; work dir $WORK"
fi

# ---------------------------------------------------------------------------------------------
# wrk rows.
# load ID NAME URL PROXY_PID [wrk args...]: a warm-up, then the measured run; adds the row.
LAST_WRK=""
load() {
    local id=$1 name=$2 url=$3 pid=$4; shift 4
    timeout $((WARM + 30)) taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WARM}s" \
        --timeout 10s "$@" "$url" >/dev/null 2>&1
    local out cpu0 cpu1 ctx0 ctx1
    cpu0=$(cpu_split "$pid"); ctx0=$(ctx_switches "$pid")
    out=$(timeout $((DUR + 60)) taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" \
        -d"${DUR}s" --timeout 10s -s "$HERE/report.lua" "$@" "$url" 2>&1)
    cpu1=$(cpu_split "$pid"); ctx1=$(ctx_switches "$pid")
    LAST_WRK=$(printf '%s\n' "$out" | grep '^{' | tail -1)
    local rss note
    rss=$(rss_kb "$pid")
    note=$(alive_note "$pid")
    if [ -z "$LAST_WRK" ]; then
        log "$name: wrk failed: $out"
        row --id "$id" --name "$name" --rss-kb "$rss" --note "wrk failed ${note}"
        return 1
    fi
    # "user system" ticks and "voluntary involuntary" switches, before and after.
    local u0=${cpu0% *} s0=${cpu0#* } u1=${cpu1% *} s1=${cpu1#* }
    row --id "$id" --name "$name" --wrk "$LAST_WRK" --rss-kb "$rss" --note "${EXTRA_NOTE:-}${note}" \
        --cpu-secs "$(python3 -c "print(($u1 + $s1 - $u0 - $s0) / $CLK_TCK)")" \
        --cpu-user-secs "$(python3 -c "print(($u1 - $u0) / $CLK_TCK)")" \
        --cpu-sys-secs "$(python3 -c "print(($s1 - $s0) / $CLK_TCK)")" \
        --ctx-vol $((${ctx1% *} - ${ctx0% *})) --ctx-invol $((${ctx1#* } - ${ctx0#* }))
    log "$name: $LAST_WRK"
}

# small and 1 MiB rows against one base URL.
load_pair() {
    local id=$1 name=$2 base=$3 pid=$4; shift 4
    if want small; then load "$id.small" "$name, small" "$base/small" "$pid" "$@"; fi
    if want big; then load "$id.big" "$name, 1 MiB" "$base/big" "$pid" "$@"; fi
}

# ---------------------------------------------------------------------------------------------
# 3. The floor: the backend directly.
if want_load; then
    log "direct"
    load_pair direct "backend directly" "$BACKEND/user/u$MIDDLE" "$BACKEND_PID"
fi

not_started() {  # ID NAME LOG
    row --id "$1" --name "$2" --note "did not start: $(tail -c 300 "$WORK/$3.log" | tr '\n' ' ')"
}

# 4. nginx as a reverse proxy, 10 000 locations like the proxies' 10 000 routes.
run_nginx_proxy() {
    local id=$1 workers=$2 name=$3
    local dir=$WORK/$id port
    port=$(free_port)
    mkdir -p "$dir/tmp"
    {
        echo "worker_processes $workers;"
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto \$scheme;
    proxy_buffering off;
    proxy_buffer_size 64k;
    proxy_buffers 4 64k;
    proxy_busy_buffers_size 64k;
    server {
        listen 127.0.0.1:$port backlog=4096;
EOF
        local i
        for ((i = 0; i < ROUTES; i++)); do
            echo "        location /user/u$i/ { proxy_pass http://backend; }"
        done
        echo "    }"
        echo "}"
    } >"$dir/nginx.conf"
    start "$id" "$PROXY_CPUS" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    local pid=$LAST_PID
    if ! wait_port "$port"; then
        log "$name did not start: $(tail -5 "$dir/error.log" "$WORK/$id.log" 2>/dev/null)"
        stop "$pid"
        return 1
    fi
    log "$name"
    load_pair "$id" "$name" "http://127.0.0.1:$port/user/u$MIDDLE" "$pid"
    stop "$pid"
}
if want_load; then
    run_nginx_proxy nginx1 1 "nginx proxy, 1 worker"
    run_nginx_proxy nginxN "$NPROC" "nginx proxy, $NPROC workers"
fi

# 4b. The floor hubgate is built on: a bare hyper 1.x proxy of one thread (`fixedload floor`: one
# current_thread runtime, one upstream connection per client connection, one header added; no
# routing, auth, metrics or log). Above it is hubgate's own work; below it, hyper's against nginx's.
if want_load; then
    FLOOR_PORT=$(free_port)
    start floor "$PROXY_CPUS" "$FIXEDLOAD" floor --listen "127.0.0.1:$FLOOR_PORT" \
        --target "127.0.0.1:$BACKEND_PORT" --secs 3600
    FLOOR_PID=$LAST_PID
    if wait_port "$FLOOR_PORT"; then
        log "bare hyper proxy (the floor)"
        load_pair floor "bare hyper proxy (floor), 1 thread" "http://127.0.0.1:$FLOOR_PORT/user/u$MIDDLE" "$FLOOR_PID"
    else
        not_started floor.small "bare hyper proxy (floor), 1 thread" floor
    fi
    stop "$FLOOR_PID"
fi

# ---------------------------------------------------------------------------------------------
# Route API helpers.
api() { python3 "$HERE/routeapi.py" "$@"; }

# add_routes ID NAME APIURL PID COUNT START LIMIT [extra routeapi args]: one by one.
add_routes() {
    local id=$1 name=$2 url=$3 pid=$4 count=$5 first=$6 limit=$7; shift 7
    local out res before
    before=$(rss_kb "$pid")
    out=$(timeout $((limit + 120)) python3 "$HERE/routeapi.py" add --api "$url" --token "$TOKEN" \
        --target "$BACKEND" --ws-target "$WS_BACKEND" --ws-index "$WS_INDEX" \
        --count "$count" --start "$first" --time-limit "$limit" "$@")
    res=$(printf '%s\n' "$out" | grep '"op"' | tail -1)
    printf '%s\n' "$out" | grep '"warning"' >&2
    [ -n "$res" ] && res=$(merge_json "$res" "{\"rss_kb_before\": ${before:-null}}")
    if [ -z "$res" ]; then
        row --id "$id" --name "$name" --rss-kb "$(rss_kb "$pid")" --note "route adds failed $(alive_note "$pid")"
        return 1
    fi
    local note
    note=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
t = "{done:,} adds in {total_s:.1f} s".format(**r)
if r["timed_out"]:
    t += " (stopped at the {} s limit; {wanted:,} wanted)".format(sys.argv[2], **r)
if r["errors"]:
    t += "; {errors} errors".format(**r)
print(t)' "$res" "$limit")
    row --id "$id" --name "$name" --rps "$(jq_ "$res" per_sec)" --p50 "$(jq_ "$res" p50_ms)" \
        --p99 "$(jq_ "$res" p99_ms)" --errors "$(jq_ "$res" errors)" --rss-kb "$(rss_kb "$pid")" \
        --note "$note $(alive_note "$pid")" --data "$res"
    log "$name: $res"
}
merge_json() { python3 -c 'import json,sys; a=json.loads(sys.argv[1]); a.update(json.loads(sys.argv[2])); print(json.dumps(a))' "$@"; }
jq_() { python3 -c 'import json,sys; v=json.loads(sys.argv[1]); [v:=v[k] for k in sys.argv[2:]]; print(v)' "$@"; }

list_routes() {
    local id=$1 name=$2 url=$3 pid=$4 extra=${5:-}
    local res
    res=$(timeout 300 python3 "$HERE/routeapi.py" list --api "$url" --token "$TOKEN" | tail -1)
    if [ -z "$res" ]; then
        row --id "$id" --name "$name" --rss-kb "$(rss_kb "$pid")" --note "GET /api/routes failed $(alive_note "$pid")"
        return 1
    fi
    local secs bytes n
    secs=$(jq_ "$res" secs); bytes=$(jq_ "$res" bytes); n=$(jq_ "$res" routes)
    row --id "$id" --name "$name" --p50 "$(python3 -c "print($secs*1000)")" --rss-kb "$(rss_kb "$pid")" \
        --note "status $(jq_ "$res" status), $n routes, $(python3 -c "print(f'{$bytes/2**20:.1f}')") MiB body, one request ${extra}$(alive_note "$pid")" \
        --data "$res"
    log "$name: $res"
}

# ws_rows WHO NAME PROXY_PORT PID [--header ...]
ws_rows() {
    local who=$1 name=$2 port=$3 pid=$4; shift 4
    local url="ws://127.0.0.1:$port/user/u$WS_INDEX/ws" size n res
    for size in small large; do
        if [ "$size" = small ]; then n=$WS_SMALL; else n=$WS_LARGE; fi
        res=$(timeout 600 taskset -c "$LOAD_CPUS" "$WSLOAD" hold --url "$url" --conns "$n" --pid "$pid" \
            --secs "$WS_HOLD_SECS" --timeout 120 "$@" 2>"$WORK/ws-$who-$size.err" | grep '^{' | tail -1)
        if [ -z "$res" ]; then
            row --id "$who.ws.$size" --name "$name: hold $(num $n) websockets" --rss-kb "$(rss_kb "$pid")" \
                --note "wsload failed: $(tail -c 200 "$WORK/ws-$who-$size.err" | tr '\n' ' ') $(alive_note "$pid")"
            continue
        fi
        local note
        note=$(python3 -c '
import json, sys
r = json.loads(sys.argv[1])
t = "{opened:,}/{wanted:,} opened in {open_secs:.1f} s, {sample_alive}/{sample} answered after the hold".format(**r)
t += "; RSS before {:.1f} MiB".format(r["rss_kb_before"] / 1024)
print(t)' "$res")
        sleep 2
        local after
        after=$(rss_kb "$pid")
        [ -n "$after" ] && note="$note; RSS 2 s after closing them $((after / 1024)) MiB"
        [ "$size" = large ] && [ -n "$WS_LIMIT_NOTE" ] && note="$note; $WS_LIMIT_NOTE"
        row --id "$who.ws.$size" --name "$name: hold $(num $n) websockets" \
            --rss-kb "$(jq_ "$res" rss_kb_held)" --errors "$(jq_ "$res" failed)" \
            --note "$note $(alive_note "$pid")" --data "$res"
        log "$name hold $n: $res"
    done
    res=$(timeout $((WS_RATE_SECS + 120)) taskset -c "$LOAD_CPUS" "$WSLOAD" rate --url "$url" \
        --conns "$WS_RATE_CONNS" --secs "$WS_RATE_SECS" --pid "$pid" "$@" 2>"$WORK/ws-$who-rate.err" | grep '^{' | tail -1)
    if [ -z "$res" ]; then
        row --id "$who.ws.rate" --name "$name: websocket echo" --rss-kb "$(rss_kb "$pid")" \
            --note "wsload failed: $(tail -c 200 "$WORK/ws-$who-rate.err" | tr '\n' ' ') $(alive_note "$pid")"
        return
    fi
    row --id "$who.ws.rate" --name "$name: websocket echo, $WS_RATE_CONNS conns" \
        --rps "$(jq_ "$res" msgs_per_sec)" --p50 "$(jq_ "$res" p50_ms)" --p99 "$(jq_ "$res" p99_ms)" \
        --errors "$(jq_ "$res" errors)" --rss-kb "$(jq_ "$res" rss_kb)" \
        --note "messages/s (64 B, round trips) $(alive_note "$pid")" --data "$res"
    log "$name echo: $res"
}

start_row() {  # ID NAME PID: RSS of a proxy just started, empty table
    row --id "$1" --name "$2" --rss-kb "$(rss_kb "$3")" --note "started, empty table"
}

# ---------------------------------------------------------------------------------------------
# 5. configurable-http-proxy 5.3.0, then hubgate. Each proxy runs three times, each a fresh
# process, so that the memory one step takes is not hidden in heap that an earlier step freed
# (allocators keep it) nor counted in the next:
#  - the load process: empty table, 10 000 routes added one by one, the HTTP rows;
#  - the table process: the big table (CHP: added one by one; hubgate: one sync), then
#    GET /api/routes;
#  - the websocket process: one route to the echo backend, held connections, echo rate.
start_chp() {  # NAME: sets PROXY_PID, PROXY_PORT, PROXY_API; returns 1 if it did not start
    PROXY_PORT=$(free_port); local api_port; api_port=$(free_port)
    start "$1" "$PROXY_CPUS" env CONFIGPROXY_AUTH_TOKEN="$TOKEN" node "$CHP_BIN" --ip 127.0.0.1 \
        --port "$PROXY_PORT" --api-ip 127.0.0.1 --api-port "$api_port" --log-level warn
    PROXY_PID=$LAST_PID
    PROXY_API=http://127.0.0.1:$api_port
    wait_port "$api_port" && wait_port "$PROXY_PORT" && sleep 1
}
start_hubgate() {  # NAME [extra flags]: as start_chp
    local name=$1; shift
    PROXY_PORT=$(free_port); local api_port; api_port=$(free_port)
    start "$name" "$PROXY_CPUS" env CONFIGPROXY_AUTH_TOKEN="$TOKEN" "$HUBGATE" --ip 127.0.0.1 \
        --port "$PROXY_PORT" --api-ip 127.0.0.1 --api-port "$api_port" --log-level warn "$@"
    PROXY_PID=$LAST_PID
    PROXY_API=http://127.0.0.1:$api_port
    wait_port "$api_port" && wait_port "$PROXY_PORT" && sleep 1
}
ws_route() {  # API: the one route of a websocket process, to the echo backend
    curl -s -o /dev/null --max-time 10 -X POST -H "Authorization: token $TOKEN" \
        -d "{\"target\": \"$WS_BACKEND\"}" "$1/api/routes/user/u$WS_INDEX"
}
errlines() { grep -c -E 'ERROR|panicked' "$WORK/$1.log" 2>/dev/null; }

if want chp; then
log "CHP 5.3.0"
if start_chp chp; then
    CHP_PID=$PROXY_PID
    start_row chp.start "CHP" "$CHP_PID"
    add_routes chp.add10k "CHP: add $(num $ROUTES) routes one by one" "$PROXY_API" "$CHP_PID" "$ROUTES" 0 600
    load_pair chp "CHP" "http://127.0.0.1:$PROXY_PORT/user/u$MIDDLE" "$CHP_PID"
else
    not_started chp.start "CHP" chp
fi
stop "$PROXY_PID"
fi

if want chp && want table; then
log "CHP 5.3.0, big table"
if start_chp chp-table; then
    add_routes chp.table "CHP, fresh: add $(num $CHP_MAX_ROUTES) routes one by one" "$PROXY_API" "$PROXY_PID" \
        "$CHP_MAX_ROUTES" 0 "$CHP_ADD_LIMIT"
    CHP_N=$(python3 - "$WORK/rows.jsonl" <<'EOF'
import json, sys
path = sys.argv[1]
lines = [json.loads(l) for l in open(path) if l.strip()]
n = "?"
for r in lines:
    if r["id"] == "chp.table" and r.get("data"):
        r["data"]["routes_before"] = 0
        r["data"]["routes_after"] = n = r["data"]["done"]
        n = f"{n:,}"
open(path, "w").write("".join(json.dumps(r) + "\n" for r in lines))
print(n)
EOF
)
    row --id chp.sync --name "CHP: sync $(num $SYNC_ROUTES) routes" --note "n/a: CHP has no sync API"
    list_routes chp.list "CHP: GET /api/routes at $CHP_N routes" "$PROXY_API" "$PROXY_PID"
else
    not_started chp.table "CHP, big table" chp-table
fi
stop "$PROXY_PID"
fi

if want chp && want ws; then
log "CHP 5.3.0, websockets"
if start_chp chp-ws; then
    ws_route "$PROXY_API"
    ws_rows chp "CHP" "$PROXY_PORT" "$PROXY_PID"
else
    not_started chp.ws.large "CHP, websockets" chp-ws
fi
stop "$PROXY_PID"
fi
CHP_ERRLINES="$(errlines chp)/$(errlines chp-table)/$(errlines chp-ws)"

# ---------------------------------------------------------------------------------------------
# 6. hubgate, release build, memory store (as JupyterHub starts it): first with one worker
# (against nginx with one), then with its default, one worker per core (against nginx with as
# many).
sync_routes() {  # API: the load rows' table in one sync, when the adds one by one are not measured
    timeout 300 python3 "$HERE/routeapi.py" sync --api "$1" --token "$TOKEN" --target "$BACKEND" \
        --count "$ROUTES" >>"$WORK/sync.out"
}
if want_load; then
    log "hubgate, --workers 1"
    if start_hubgate hubgate-w1 --workers 1; then
        sync_routes "$PROXY_API"
        load_pair hubgate1 "hubgate, --workers 1" "http://127.0.0.1:$PROXY_PORT/user/u$MIDDLE" "$PROXY_PID"
    else
        not_started hubgate1.small "hubgate, --workers 1" hubgate-w1
    fi
    stop "$PROXY_PID"
fi

if want_load || want api || want scrape; then
log "hubgate"
HG_METRICS_PORT=$(free_port)
if start_hubgate hubgate --metrics-ip 127.0.0.1 --metrics-port "$HG_METRICS_PORT"; then
    HG_PID=$PROXY_PID
    HG_URL=http://127.0.0.1:$PROXY_PORT/user/u$MIDDLE
    if want api; then
        start_row hubgate.start "hubgate" "$HG_PID"
        add_routes hubgate.add10k "hubgate: add $(num $ROUTES) routes one by one" "$PROXY_API" "$HG_PID" "$ROUTES" 0 600
    else
        sync_routes "$PROXY_API"
    fi
    load_pair hubgate "hubgate, default workers ($NPROC)" "$HG_URL" "$HG_PID"
    if want scrape; then
    # Scraped every 100 ms, then the same load again without, to see the noise between the two
    # plain runs.
    timeout $((WARM + DUR + 60)) taskset -c "$LOAD_CPUS" python3 "$HERE/scrape.py" \
        --url "http://127.0.0.1:$HG_METRICS_PORT/metrics" --interval 0.1 --secs $((WARM + DUR + 1)) \
        >"$WORK/scrape.out" 2>&1 &
    SCRAPE_PID=$!
    PIDS+=("$SCRAPE_PID")
    load hubgate.scraped "hubgate, small, /metrics scraped every 100 ms" "$HG_URL/small" "$HG_PID"
    wait "$SCRAPE_PID" 2>/dev/null
    SCRAPE=$(grep '^{' "$WORK/scrape.out" | tail -1)
    if [ -n "$SCRAPE" ]; then
        python3 - "$WORK/rows.jsonl" "$SCRAPE" <<'EOF'
import json, sys
path, s = sys.argv[1], json.loads(sys.argv[2])
lines = [json.loads(l) for l in open(path) if l.strip()]
for r in lines:
    if r["id"] == "hubgate.scraped":
        r["note"] = (f"{s['scrapes']} scrapes ({s['failed']} failed), {s['bytes'] / 1024:.0f} KiB each, "
                     f"slowest {s['worst_ms']:.1f} ms " + r.get("note", "")).strip()
        r["data"] = s
open(path, "w").write("".join(json.dumps(r) + "\n" for r in lines))
EOF
    fi
    load hubgate.repeat "hubgate, small, again (noise check)" "$HG_URL/small" "$HG_PID"
    # What one scrape costs, on the idle process: 100 scrapes a second for 3 s.
    c0=$(cpu_ticks "$HG_PID")
    res=$(timeout 60 python3 "$HERE/scrape.py" --url "http://127.0.0.1:$HG_METRICS_PORT/metrics" \
        --interval 0.01 --secs 3 | tail -1)
    c1=$(cpu_ticks "$HG_PID")
    if [ -n "$res" ] && [ "$(jq_ "$res" scrapes)" -gt 0 ]; then
        row --id hubgate.scrapecost --name "hubgate: one /metrics scrape, idle process" \
            --cpu-us "$(python3 -c "print(($c1 - $c0) / $CLK_TCK * 1e6 / $(jq_ "$res" scrapes))")" \
            --rss-kb "$(rss_kb "$HG_PID")" \
            --note "$(jq_ "$res" scrapes) scrapes of $(($(jq_ "$res" bytes) / 1024)) KiB in 3 s; CPU µs per scrape $(alive_note "$HG_PID")"
    fi
    fi
else
    not_started hubgate.start "hubgate" hubgate
fi
stop "$PROXY_PID"
fi

if want table; then
log "hubgate, big table"
if start_hubgate hubgate-table; then
    before=$(rss_kb "$PROXY_PID")
    res=$(timeout 600 python3 "$HERE/routeapi.py" sync --api "$PROXY_API" --token "$TOKEN" \
        --target "$BACKEND" --count "$SYNC_ROUTES" | tail -1)
    if [ -n "$res" ] && [ "$(jq_ "$res" status)" = 200 ]; then
        row --id hubgate.table --name "hubgate, fresh: sync $(num $SYNC_ROUTES) routes (one POST /api/proxy)" \
            --p50 "$(python3 -c "print($(jq_ "$res" secs)*1000)")" --rss-kb "$(rss_kb "$PROXY_PID")" \
            --note "one request of $(python3 -c "print(f'{$(jq_ "$res" request_bytes)/2**20:.1f}')") MiB; answer $(jq_ "$res" answer | tr -d "'{}" | cut -c1-120) $(alive_note "$PROXY_PID")" \
            --data "$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.pop("answer",None); r.update(rss_kb_before=int(sys.argv[2]), routes_before=0, routes_after=r["routes"]); print(json.dumps(r))' "$res" "$before")"
        log "hubgate sync: $res"
    else
        row --id hubgate.table --name "hubgate: sync $(num $SYNC_ROUTES) routes" --rss-kb "$(rss_kb "$PROXY_PID")" \
            --note "sync failed: ${res:0:200} $(alive_note "$PROXY_PID")"
    fi
    list_routes hubgate.list "hubgate: GET /api/routes at $(num $SYNC_ROUTES) routes" "$PROXY_API" "$PROXY_PID"
    # Syncs that change every route's target (as after a migration), to see where memory settles.
    took=""
    for i in 1 2 3; do
        res=$(timeout 300 python3 "$HERE/routeapi.py" sync --api "$PROXY_API" --token "$TOKEN" \
            --target "$BACKEND/v$i" --count "$SYNC_ROUTES" | tail -1)
        if [ -n "$res" ] && [ "$(jq_ "$res" status)" = 200 ]; then
            took="$took $(python3 -c "print(round($(jq_ "$res" secs) * 1000))")"
        else
            took="$took failed"
        fi
    done
    row --id hubgate.resync --name "hubgate: 3 more syncs of $(num $SYNC_ROUTES), each changing every target" \
        --rss-kb "$(rss_kb "$PROXY_PID")" --note "ms per sync:$took $(alive_note "$PROXY_PID")"
else
    not_started hubgate.table "hubgate, big table" hubgate-table
fi
stop "$PROXY_PID"
fi

if want ws; then
log "hubgate, websockets"
if start_hubgate hubgate-ws; then
    ws_route "$PROXY_API"
    ws_rows hubgate "hubgate" "$PROXY_PORT" "$PROXY_PID"
else
    not_started hubgate.ws.large "hubgate, websockets" hubgate-ws
fi
stop "$PROXY_PID"
fi
HG_ERRLINES="$(errlines hubgate)/$(errlines hubgate-table)/$(errlines hubgate-ws)"

# ---------------------------------------------------------------------------------------------
# 7. hubgate with the embedded file store: every add is fsync'ed before its 201.
if want api; then
log "hubgate, file store"
if start_hubgate hubgate-file --storage-backend file --storage-path "$WORK/hubgate-store"; then
    add_routes hubgatefile.add10k "hubgate, file store: add $(num $ROUTES) routes one by one (fsync each)" \
        "$PROXY_API" "$PROXY_PID" "$ROUTES" 0 $((QUICK == 1 ? 30 : 300))
else
    not_started hubgatefile.add10k "hubgate, file store" hubgate-file
fi
stop "$PROXY_PID"
fi

# 8. hubgate with authentication at the edge, against a fake hub, with a cached token. The same
# process also serves a route that opts out ("auth": "none"), measured just before: the cost of
# authentication without a second process in between.
if want auth; then
log "hubgate with authentication"
HUB_PORT=$(free_port)
start fakehub "$BACKEND_CPUS" python3 "$HERE/fakehub.py" --port "$HUB_PORT" --token "$USER_TOKEN" \
    --user "u$MIDDLE" --secs 14400
HUB_PID=$LAST_PID
OPEN=$((MIDDLE + 1))
if wait_port "$HUB_PORT" && JUPYTERHUB_API_TOKEN="$HUB_TOKEN" start_hubgate hubgate-auth \
        --hub-api-url "http://127.0.0.1:$HUB_PORT/hub/api"; then
    timeout 300 python3 "$HERE/routeapi.py" sync --api "$PROXY_API" --token "$TOKEN" \
        --target "$BACKEND" --count "$ROUTES" --with-user >"$WORK/auth-sync.out"
    curl -s -o /dev/null --max-time 10 -X POST -H "Authorization: token $TOKEN" \
        -d "{\"target\": \"$BACKEND\", \"user\": \"u$OPEN\", \"auth\": \"none\"}" "$PROXY_API/api/routes/user/u$OPEN"
    URL="http://127.0.0.1:$PROXY_PORT/user/u$MIDDLE/small"
    code_ok=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: token $USER_TOKEN" "$URL")
    code_no=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$URL")
    code_open=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$PROXY_PORT/user/u$OPEN/small")
    EXTRA_NOTE="same process, route u$OPEN with \"auth\": \"none\" (answered $code_open); "
    load hubgate.authopen "hubgate + auth, small, open route" "http://127.0.0.1:$PROXY_PORT/user/u$OPEN/small" "$PROXY_PID"
    EXTRA_NOTE="check: with the token $code_ok, without $code_no; "
    load hubgate.auth "hubgate + auth, small, cached token" "$URL" "$PROXY_PID" \
        -H "Authorization: token $USER_TOKEN"
    EXTRA_NOTE=""
    load hubgate.authopen2 "hubgate + auth, small, open route again" "http://127.0.0.1:$PROXY_PORT/user/u$OPEN/small" "$PROXY_PID"
    STATS=$(curl -s --max-time 5 "http://127.0.0.1:$HUB_PORT/_stats")
    python3 - "$WORK/rows.jsonl" "$STATS" <<'EOF'
import json, sys
path, s = sys.argv[1], json.loads(sys.argv[2] or "{}")
lines = [json.loads(l) for l in open(path) if l.strip()]
for r in lines:
    if r["id"] == "hubgate.auth":
        r["data"] = {"hub_user_calls": s.get("user", 0), "hub_calls": s}
        r["note"] = (r.get("note", "") + f"hub calls: GET /user {s.get('user', 0)}, "
                     f"GET /hub/api {s.get('root', 0)}, POST /proxy {s.get('proxy', 0)}").strip()
open(path, "w").write("".join(json.dumps(r) + "\n" for r in lines))
EOF
else
    not_started hubgate.auth "hubgate + auth" hubgate-auth
fi
stop "$PROXY_PID"
# The same with fair-use limits on (issue 19): a rate and a concurrency cap per user and per
# client address, set high enough never to refuse, so every check runs and none answers.
cat >"$WORK/limits.toml" <<'TOML'
[limits]
user = { rate = 1000000.0, burst = 1000000, concurrent = 100000, websockets = 100000 }
client = { rate = 1000000.0, burst = 1000000, concurrent = 100000, websockets = 100000 }
login = { rate = 1.0, burst = 10 }
TOML
if JUPYTERHUB_API_TOKEN="$HUB_TOKEN" start_hubgate hubgate-limits \
        --hub-api-url "http://127.0.0.1:$HUB_PORT/hub/api" --config "$WORK/limits.toml"; then
    timeout 300 python3 "$HERE/routeapi.py" sync --api "$PROXY_API" --token "$TOKEN" \
        --target "$BACKEND" --count "$ROUTES" --with-user >"$WORK/limits-sync.out"
    URL="http://127.0.0.1:$PROXY_PORT/user/u$MIDDLE/small"
    code_ok=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: token $USER_TOKEN" "$URL")
    EXTRA_NOTE="limits on for user and client (never refusing); check: with the token $code_ok; "
    load hubgate.authlimits "hubgate + auth + limits, small, cached token" "$URL" "$PROXY_PID" \
        -H "Authorization: token $USER_TOKEN"
    EXTRA_NOTE=""
else
    not_started hubgate.authlimits "hubgate + auth + limits" hubgate-limits
fi
stop "$PROXY_PID"
stop "$HUB_PID"
HGA_ERRLINES=$(errlines hubgate-auth)
fi

# ---------------------------------------------------------------------------------------------
# 9. hubgate replicas sharing one table in Redis: how fast a change made through one replica
# reaches another, and the throughput of two replicas on one port (SO_REUSEPORT) against one.
if want redis; then
log "hubgate replicas on redis"
REDIS_PORT=$(free_port)
start redis "$BACKEND_CPUS" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$WORK"
REDIS_PID=$LAST_PID
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
routes_of() {  # API: how many routes a replica has (0 when it does not answer)
    curl -s --max-time 5 -H "Authorization: token $TOKEN" "$1/api/status" |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("routes", 0))' 2>/dev/null || echo 0
}
if wait_port "$REDIS_PORT" && start_hubgate hubgate-r1 --storage-backend redis --redis-url "$REDIS_URL"; then
    R1_PID=$PROXY_PID; R1_API=$PROXY_API; R_PORT=$PROXY_PORT
    timeout 300 python3 "$HERE/routeapi.py" sync --api "$R1_API" --token "$TOKEN" \
        --target "$BACKEND" --count "$ROUTES" >"$WORK/redis-sync.out"
    R_URL="http://127.0.0.1:$R_PORT/user/u$MIDDLE/small"
    load hubgate.redis1 "hubgate, redis store, 1 replica, small" "$R_URL" "$R1_PID"
    R2_API_PORT=$(free_port)
    start hubgate-r2 "$PROXY_CPUS" env CONFIGPROXY_AUTH_TOKEN="$TOKEN" "$HUBGATE" --ip 127.0.0.1 \
        --port "$R_PORT" --api-ip 127.0.0.1 --api-port "$R2_API_PORT" --log-level warn \
        --storage-backend redis --redis-url "$REDIS_URL"
    R2_PID=$LAST_PID
    R2_API=http://127.0.0.1:$R2_API_PORT
    for _ in $(seq 1 100); do
        [ "$(routes_of "$R2_API")" -ge "$ROUTES" ] && break
        sleep 0.2
    done
    res=$(timeout 300 python3 "$HERE/propagation.py" --writer "$R1_API" --reader "$R2_API" \
        --token "$TOKEN" --target "$BACKEND" --count $((QUICK == 1 ? 100 : 1000)) | tail -1)
    if [ -n "$res" ]; then
        row --id hubgate.propagation --name "hubgate, redis store: a route change through one replica, seen by the other" \
            --p50 "$(jq_ "$res" p50_ms)" --p99 "$(jq_ "$res" p99_ms)" --errors "$(jq_ "$res" failed)" \
            --rss-kb "$(rss_kb "$R2_PID")" \
            --note "$(jq_ "$res" changes) changes (adds, then deletes), from before the write to the other replica's first answer with it; max $(jq_ "$res" max_ms) ms; the write itself p50 $(jq_ "$res" write_p50_ms) ms, p99 $(jq_ "$res" write_p99_ms) ms $(alive_note "$R2_PID")" \
            --data "$res"
        log "propagation: $res"
    fi
    EXTRA_NOTE="two processes on one port, CPU column is replica 1 only; "
    load hubgate.redis2 "hubgate, redis store, 2 replicas on one port, small" "$R_URL" "$R1_PID"
    EXTRA_NOTE=""
    stop "$R2_PID"
else
    not_started hubgate.redis1 "hubgate, redis store" hubgate-r1
fi
stop "$PROXY_PID"
stop "$REDIS_PID"
HGR_ERRLINES="$(errlines hubgate-r1)/$(errlines hubgate-r2)"
fi

# ---------------------------------------------------------------------------------------------
# 9b. Redis's own rows, measured by failover.sh (one implementation of each): its table rows
# become report rows, the JSON in the notes and the percentiles in the p50/p99 columns (for a
# failover, the time from the SIGKILL to the first accepted write).
if named failover; then
log "redis: failover.sh"
if [ "$QUICK" = 1 ]; then fo_args=(--count 200 --rounds 1); else fo_args=(--count 1000 --rounds 3); fi
timeout 900 bash "$HERE/failover.sh" --bin "$HUBGATE" "${fo_args[@]}" >"$WORK/failover.out" 2>"$WORK/failover.log" \
    || log "failover.sh failed: $(tail -c 300 "$WORK/failover.log" | tr '\n' ' ')"
i=0
while IFS='|' read -r _ name res _; do
    name=$(echo "$name" | sed 's/^ *//; s/ *$//'); res=$(echo "$res" | sed 's/^ *//; s/ *$//')
    case "$res" in "{"*) ;; *) continue ;; esac
    i=$((i + 1))
    p50=$(jq_ "$res" p50_ms 2>/dev/null || true); p99=$(jq_ "$res" p99_ms 2>/dev/null || true)
    resumed=$(jq_ "$res" first_accepted_write_s 2>/dev/null || true)
    if [ -n "$resumed" ]; then   # a failover: its time goes in the p50 column, to get a median
        p50=$(python3 -c "print($resumed * 1000)"); name="$name (ms, in the p50 column)"
    fi
    row --id "redis.failover$i" --name "$name" --p50 "$p50" --p99 "$p99" --note "$res" --data "$res"
done <"$WORK/failover.out"
[ "$i" -gt 0 ] || row --id redis.failover --name "Redis (failover.sh)" \
    --note "no rows: $(tail -c 300 "$WORK/failover.log" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------------------------
# 10. The report.
RUN_SECS=$(($(date +%s) - RUN_START))
HOST=$(hostname -s 2>/dev/null || hostname)
DATE=$(date +%F)
if [ -z "$OUT" ]; then
    suffix=""; [ "$QUICK" = 1 ] && suffix="-quick"
    OUT=$REPO/benches/results/$DATE-$HOST$suffix.md
fi
mkdir -p "$(dirname "$OUT")"
if [ -n "$COMMIT_REV" ]; then
    COMMIT="${COMMIT_FULL:0:12} (built from an export of that commit)"
else
    COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
    DIRTY=$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)
    [ "$DIRTY" != 0 ] && COMMIT="$COMMIT + $DIRTY uncommitted changes under src/, Cargo.*"
fi
python3 - "$WORK/meta.json" <<EOF
import json, sys
meta = {
    "date": "$(date '+%F %T %Z')",
    "mode": "$MODE (run took ${RUN_SECS} s, builds and installs excluded)",
    "duration": $DUR, "warmup": $WARM,
    "wrk_args": "-t$WRK_THREADS -c$WRK_CONNS, small = ${#SMALL_BODY}+1 B body, 1 MiB = $BIG_BYTES B file (sendfile); $ROUTES routes in every table, requests hit /user/u$MIDDLE",
    "host": "$HOST",
    "nproc": "$NPROC",
    "cpu": """$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)""",
    "memory": "$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)",
    "kernel": "$(uname -sr)",
    "wrk": """$(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//')""",
    "nginx": """$("$NGINX" -v 2>&1 | head -1)""",
    "node": "$(node --version 2>/dev/null)",
    "rows": "$ROWS",
    "chp": "configurable-http-proxy $(python3 -c "import json; print(json.load(open('$CHP_DIR/node_modules/configurable-http-proxy/package.json'))['version'])" 2>/dev/null || echo "not run")",
    "hubgate": """$("$HUBGATE" --version 2>&1 | head -1), git $COMMIT; log lines with ERROR or panicked (load/table/websocket/auth/redis replicas): ${HG_ERRLINES:-?}/${HGA_ERRLINES:-?}/${HGR_ERRLINES:-?}; CHP's (load/table/websocket): ${CHP_ERRLINES:-?}""",
    "python": "$(python3 --version 2>&1)",
    "loadavg_before": "$LOADAVG_BEFORE",
    "loadavg_after": "$(cut -d' ' -f1-3 /proc/loadavg)",
    "ulimit_n": "$NOFILE",
    "placement": "backend nginx (1 worker) and websocket echo on cpus $BACKEND_CPUS; proxy under test on cpus $PROXY_CPUS; wrk, wsload and the route API client on cpus $LOAD_CPUS (taskset). nginx proxies: proxy_buffering off (streams, as CHP and hubgate do) with 64 KiB buffers (the 4 KiB default halves 1 MiB throughput), upstream keepalive 64.",
}
json.dump(meta, open(sys.argv[1], "w"))
EOF
if [ -n "$EMIT" ]; then   # one round of --rounds: the caller takes the medians
    cp "$WORK/rows.jsonl" "$EMIT.rows.jsonl" && cp "$WORK/meta.json" "$EMIT.meta.json"
    exit
fi
python3 "$HERE/report.py" render --rows "$WORK/rows.jsonl" --meta "$WORK/meta.json" >"$OUT"
cat "$OUT"
log "report written to $OUT (run took ${RUN_SECS} s)"
