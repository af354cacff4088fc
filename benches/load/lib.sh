# Shared pieces of the load scripts (run.sh, budget.sh, memory.sh, abtest.sh, soak.sh): logging,
# processes started and cleaned up, ports, waiting, and what /proc says about a process.
#
# Source it after setting KEEP (1 keeps $WORK at exit). It sets the EXIT trap; a script that
# needs more clean-up defines `on_exit` before sourcing and it is called first.
# Every process started with `start` is recorded and killed on exit; every wait is bounded.

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

PIDS=()
WORK=${WORK:-}
KEEP=${KEEP:-0}
cleanup() {
    local pid i
    declare -F on_exit >/dev/null && on_exit
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for i in $(seq 1 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# start NAME CPUS CMD...: runs CMD in the background on CPUS, logs to $WORK/NAME.log, and sets
# LAST_PID. Commands are exec'd (taskset, env and node's shebang all exec), so the pid is the
# process itself.
start() {
    local name=$1 cpus=$2; shift 2
    taskset -c "$cpus" "$@" >"$WORK/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# stop PID: SIGTERM, up to 10 s, then SIGKILL; forgets the pid.
stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" != "$pid" ] && keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# wait_port PORT [TENTHS]: up to TENTHS/10 s (default 20 s) for a listener on 127.0.0.1:PORT.
wait_port() {
    local i
    for i in $(seq 1 "${2:-200}"); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

USED_PORTS=" "
# free_port: a port in 20000-29999 (below the ephemeral range) that binds now and was not
# handed out before in this run.
free_port() {
    local p i
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 10000))
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1',$p))" 2>/dev/null \
           && ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS="$USED_PORTS$p "
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# children PID: PID and its child processes (nginx's workers).
children() {
    echo "$1"
    cat /proc/"$1"/task/*/children 2>/dev/null
}

# rss_kb PID: VmRSS of PID plus its children's, in KiB.
rss_kb() {
    local total=0 kb c
    [ -r "/proc/$1/status" ] || { echo ""; return; }
    for c in $(children "$1"); do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$c/status" 2>/dev/null)
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# cpu_split PID: "user system" CPU clock ticks of PID and its children.
cpu_split() {
    local u=0 s=0 c line
    for c in $(children "$1"); do
        line=$(awk '{print $14, $15}' "/proc/$c/stat" 2>/dev/null) || continue
        [ -n "$line" ] || continue
        u=$((u + ${line% *})); s=$((s + ${line#* }))
    done
    echo "$u $s"
}

# cpu_ticks PID: user+system CPU clock ticks of PID and its children.
cpu_ticks() {
    local split
    split=$(cpu_split "$1")
    echo $((${split% *} + ${split#* }))
}
CLK_TCK=$(getconf CLK_TCK)

# ctx_switches PID: "voluntary involuntary" context switches summed over every thread of PID
# and of its children.
ctx_switches() {
    local v=0 n=0 c t a b
    for c in $(children "$1"); do
        for t in /proc/"$c"/task/*/status; do
            a=$(awk '/^voluntary_ctxt_switches:/ {print $2}' "$t" 2>/dev/null)
            b=$(awk '/^nonvoluntary_ctxt_switches:/ {print $2}' "$t" 2>/dev/null)
            v=$((v + ${a:-0})); n=$((n + ${b:-0}))
        done
    done
    echo "$v $n"
}

alive_note() { kill -0 "$1" 2>/dev/null && echo "" || echo "PROCESS DIED"; }
