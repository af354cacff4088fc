#!/usr/bin/env bash
# Redis as hubgate's replicas share it, rows of two groups:
#   sentinel     behind Sentinel: the latency of a route write with --redis-min-replicas 0 and 1,
#                and the time from SIGKILLing the Redis primary to the first write hubgate
#                accepts again (one primary, one replica, three sentinels with
#                down-after-milliseconds 1000, as tests/it/redis_failover.rs; one hubgate)
#   propagation  how long a route change made through one hubgate replica takes to be listed by
#                another (propagation.py), through one Redis and through a Redis Cluster (three
#                primaries with a replica each, as the tests make it) in the same run; and the
#                write latency on the cluster with --redis-min-replicas 0 and 1
# All on loopback, release hubgates.
#
#   bash benches/load/failover.sh [--bin target/release/hubgate] [--count N] [--rounds R]
#                                 [--rows sentinel,propagation]
#
#   --bin     the hubgate to run (default target/release/hubgate, built if missing)
#   --count   writes per latency row (N adds then N deletes; default 1000), and route changes
#             per propagation row (N/2 adds then N/2 deletes)
#   --rounds  failovers to time, each on a new deployment (default 3)
#   --rows    the groups to run (default both)
#
# It prints a markdown table, `| row | result |`, the result a JSON object; benches/load/run.sh
# --rows failover turns these rows into its report's.
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
ROWS=sentinel,propagation
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS=${2:?--rows needs a list}; shift ;;
        --bin) BIN=${2:?--bin needs a file}; shift ;;
        --count) COUNT=${2:?--count needs a number}; shift ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "failover.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
want() { case ",$ROWS," in *",$1,"*) return 0 ;; esac; return 1; }

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
    wait_port "$port" || { log "redis-server $name did not start: $(tail -c 300 "$WORK/$name/log")"; return 1; }
}
cluster_port() {  # a port that binds, with its cluster bus port (+10 000) free too, below 30 000
    python3 -c '
import random, socket
for _ in range(500):
    p = random.randint(20000, 29999)
    try:
        for q in (p, p + 10000):
            socket.socket().bind(("127.0.0.1", q))
    except OSError:
        continue
    print(p)
    break'
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
hubgate() {  # MIN_REPLICAS [STORE FLAGS]: a hubgate (default: through the sentinels); sets HG_PID, API
    local api proxy n=$1; shift
    [ $# -gt 0 ] || set -- --redis-sentinel "127.0.0.1:$S1,127.0.0.1:$S2,127.0.0.1:$S3" \
        --redis-sentinel-master hub
    api=$(free_port); proxy=$(free_port)
    CONFIGPROXY_AUTH_TOKEN=$TOKEN "$BIN" --ip 127.0.0.1 --port "$proxy" --api-ip 127.0.0.1 \
        --api-port "$api" --log-level warn --storage-backend redis "$@" \
        --redis-min-replicas "$n" 2>>"$WORK/hubgate.log" &
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

# Six cluster-enabled servers made one cluster of three primaries with a replica each, as
# tests/it/redis_failover.rs makes it. Sets CLUSTER (the --redis-cluster value: three nodes).
# (Ports from cluster_port: a cluster node refuses a port above 55 535, and the ephemeral range
# free_port draws from goes to 60 999.)
cluster() {
    local ports=() p i
    for i in 1 2 3 4 5 6; do
        p=$(cluster_port); ports+=("$p")
        redis "node$i" "$p" --cluster-enabled yes --cluster-config-file "$WORK/node$i/nodes.conf" \
            --cluster-node-timeout 1000 || return 1
    done
    redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 1 --cluster-yes \
        >"$WORK/cluster-create.log" 2>&1 || { log "redis-cli --cluster create failed"; return 1; }
    for _ in $(seq 300); do
        local ok=1
        for p in "${ports[@]}"; do
            redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok' || ok=0
        done
        [ $ok = 1 ] && break
        sleep 0.1
    done
    [ $ok = 1 ] || { log "the cluster was not ok within 30 s"; return 1; }
    CLUSTER="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
}

# propagation NAME STORE FLAGS...: two hubgates on the same store; changes through the first,
# timed until the second lists them (propagation.py, N/2 adds then N/2 deletes).
propagation() {
    local name=$1 a b a_pid res; shift
    hubgate 0 "$@" || { log "hubgate did not get ready"; tail "$WORK/hubgate.log" >&2; return 1; }
    a=$API; a_pid=$HG_PID
    hubgate 0 "$@" || { log "hubgate did not get ready"; tail "$WORK/hubgate.log" >&2; return 1; }
    b=$API
    res=$(python3 "$HERE/propagation.py" --writer "$a" --reader "$b" --token "$TOKEN" \
        --target http://127.0.0.1:9 --count $((COUNT / 2)))
    echo "| propagation between two replicas, $name | $res |"
    kill "$a_pid" "$HG_PID"; wait "$a_pid" "$HG_PID" 2>/dev/null
}

# latency NAME MIN_REPLICAS [STORE FLAGS]: write latency through one hubgate.
latency() {
    local name=$1 n=$2 res; shift 2
    hubgate "$n" "$@" || { log "hubgate did not get ready"; tail "$WORK/hubgate.log" >&2; return 1; }
    res=$(python3 "$HERE/failover.py" latency --api "$API" --token "$TOKEN" --count "$COUNT")
    echo "| write latency, ${name}--redis-min-replicas $n | $res |"
    kill "$HG_PID"; wait "$HG_PID" 2>/dev/null
}

log "hubgate: $("$BIN" --version | head -1); $(redis-server --version | cut -d' ' -f1-3)"
echo "| row | result |"
echo "|---|---|"
if want propagation; then
    single=$(free_port)
    redis single "$single" || exit 1
    cluster || exit 1
    propagation "one Redis" --redis-url "redis://127.0.0.1:$single" || exit 1
    propagation "Redis Cluster (3 primaries, 3 replicas)" --redis-cluster "$CLUSTER" || exit 1
    for n in 0 1; do
        latency "Redis Cluster, " "$n" --redis-cluster "$CLUSTER" || exit 1
    done
fi
want sentinel || ROUNDS=0
if want sentinel; then
    deployment lat || exit 1
    for n in 0 1; do
        latency "" "$n" || exit 1
    done
fi
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
