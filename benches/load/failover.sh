#!/usr/bin/env bash
# Redis behind Sentinel, as hubgate sees it: the latency of a route write with
# --redis-min-replicas 0 and 1, and the time from SIGKILLing the Redis primary to the first write
# hubgate accepts again. On loopback: one primary, one replica, three sentinels
# (down-after-milliseconds 1000, as tests/it/redis_failover.rs), one release hubgate.
#
#   bash benches/load/failover.sh [--bin target/release/hubgate] [--count N] [--rounds R]
#
#   --bin     the hubgate to run (default target/release/hubgate, built if missing)
#   --count   writes per latency row (N adds then N deletes; default 1000)
#   --rounds  failovers to time, each on a new deployment (default 3)
#
# Needs redis-server (Debian's: installed when missing and root) and python3. Every process it
# starts is killed on exit; every address is 127.0.0.1. It is about Redis round trips, not proxy
# CPU, so it does not need the quiet machine the other load scripts need.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=$REPO/target/release/hubgate
COUNT=1000
ROUNDS=3
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=${2:?--bin needs a file}; shift ;;
        --count) COUNT=${2:?--count needs a number}; shift ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "failover.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

if ! command -v redis-server >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "failover.sh: needs redis-server (apt-get install redis-server)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; }
fi
if [ ! -x "$BIN" ]; then
    (cd "$REPO" && cargo build --release --bin hubgate) || exit 1
fi

WORK=$(mktemp -d /tmp/hubgate-failover.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
TOKEN="failover-bench-$$"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {  # PORT: until something accepts on it (10 s at most)
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}
redis() {  # NAME PORT [args]: a redis-server in its own directory
    local name=$1 port=$2; shift 2
    mkdir -p "$WORK/$name"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK/$name" --save '' --appendonly no \
        --repl-diskless-sync-delay 0 --logfile "$WORK/$name/log" "$@" &
    PIDS+=($!)
    LAST_PID=$!
    wait_port "$port"
}
sentinel() {  # NAME PORT PRIMARY_PORT
    local name=$1 port=$2
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/sentinel.conf" <<EOF
port $port
bind 127.0.0.1
dir $WORK/$name
logfile $WORK/$name/log
sentinel monitor hub 127.0.0.1 $3 2
sentinel down-after-milliseconds hub 1000
sentinel failover-timeout hub 5000
EOF
    redis-server "$WORK/$name/sentinel.conf" --sentinel &
    PIDS+=($!)
    wait_port "$port"
}
watching() {  # SENTINEL_PORT: the sentinel knows the 2 others and the replica
    local info
    info=$(redis-cli -p "$1" sentinel master hub 2>/dev/null | tr '\n' ' ')
    [[ $info == *"num-slaves 1 "* && $info == *"num-other-sentinels 2 "* ]]
}

# A primary, a replica in sync, three sentinels that see each other. Sets PRIMARY_PID, S1..S3.
deployment() {
    local p r
    p=$(free_port); r=$(free_port)
    redis "primary-$1" "$p"; PRIMARY_PID=$LAST_PID
    redis "replica-$1" "$r" --replicaof 127.0.0.1 "$p"
    S1=$(free_port); S2=$(free_port); S3=$(free_port)
    sentinel "s1-$1" "$S1" "$p"; sentinel "s2-$1" "$S2" "$p"; sentinel "s3-$1" "$S3" "$p"
    for _ in $(seq 300); do
        watching "$S1" && watching "$S2" && watching "$S3" && return 0
        sleep 0.1
    done
    log "the sentinels did not see each other within 30 s"; return 1
}
hubgate() {  # MIN_REPLICAS: a hubgate through the sentinels; sets HG_PID, API
    local api proxy
    api=$(free_port); proxy=$(free_port)
    CONFIGPROXY_AUTH_TOKEN=$TOKEN "$BIN" --ip 127.0.0.1 --port "$proxy" --api-ip 127.0.0.1 \
        --api-port "$api" --log-level warn --storage-backend redis \
        --redis-sentinel "127.0.0.1:$S1,127.0.0.1:$S2,127.0.0.1:$S3" --redis-sentinel-master hub \
        --redis-min-replicas "$1" 2>>"$WORK/hubgate.log" &
    HG_PID=$!
    PIDS+=($HG_PID)
    API=http://127.0.0.1:$api
    wait_port "$api" || return 1
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$API/health/ready" && return 0
        sleep 0.1
    done
    return 1
}

log "hubgate: $("$BIN" --version | head -1); $(redis-server --version | cut -d' ' -f1-3)"
deployment lat || exit 1
echo "| row | result |"
echo "|---|---|"
for n in 0 1; do
    hubgate "$n" || { log "hubgate did not get ready"; tail "$WORK/hubgate.log" >&2; exit 1; }
    res=$(python3 "$HERE/failover.py" latency --api "$API" --token "$TOKEN" --count "$COUNT")
    echo "| write latency, --redis-min-replicas $n | $res |"
    kill "$HG_PID"; wait "$HG_PID" 2>/dev/null
done
for round in $(seq "$ROUNDS"); do
    deployment "fo$round" || exit 1
    hubgate 0 || { log "hubgate did not get ready"; exit 1; }
    res=$(python3 "$HERE/failover.py" failover --api "$API" --token "$TOKEN" \
        --kill "$PRIMARY_PID" --sentinel "$S1" --master hub)
    echo "| failover $round: SIGKILL of the primary to the first accepted write | $res |"
    kill "$HG_PID"; wait "$HG_PID" 2>/dev/null
done
errors=$(grep -c -E 'panicked' "$WORK/hubgate.log")
echo "| hubgate log lines with panicked | ${errors:-0} |"
