#!/usr/bin/env bash
# Core throughput benchmark: drover vs nginx vs HAProxy vs no proxy at all.
#
#   bash bench/run.sh [--skip-build]
#
# Env knobs: DURATION (seconds per wrk run, default 10), RUNS (default 3),
# WARMUP (seconds of unmeasured load before the runs, default 1, 0 = none),
# CONNECTIONS (default 64), PROXIES (default "drover nginx haproxy direct"),
# PROXY_CPU / LOAD_CPU (default 0 / 1).
#
# Layout on a 2-core machine: the proxy under test runs alone on CPU 0; the
# origin (nginx) and the load generator (wrk) share CPU 1. See bench/README.md.
set -euo pipefail

# ----------------------------------------------------------------- settings
DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-64}
PROXIES=${PROXIES:-"drover nginx haproxy direct"}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

LISTEN_PORT=18080
ORIGIN_PORT=19000
ADMIN_PORT=18687
HOST=127.0.0.1

SKIP_BUILD=0
for arg in "$@"; do
    case "$arg" in
        --skip-build) SKIP_BUILD=1 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

# nginx and haproxy live in /usr/sbin, which is not always on PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
RESULTS_DIR="$BENCH_DIR/results"
TMP="$RESULTS_DIR/tmp"
DROVER_BIN="${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/drover"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------- process cleanup
# Every background process we start is recorded here and stopped on exit,
# whether the script ends normally, fails, or is interrupted.
PIDS=()

is_alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL it and its children.
stop_pid() {
    local pid=$1 i children
    is_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    children=$(pgrep -P "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        is_alive "$pid" || break
        sleep 0.1
    done
    if is_alive "$pid"; then
        log "pid $pid ignored SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # nginx workers exit with their master; make sure no orphan survives.
    for c in $children; do
        is_alive "$c" && kill -KILL "$c" 2>/dev/null || true
    done
    wait "$pid" 2>/dev/null || true
    local kept=()
    for p in "${PIDS[@]}"; do [[ "$p" != "$pid" ]] && kept+=("$p"); done
    PIDS=("${kept[@]+"${kept[@]}"}")
}

CLEANED=0
cleanup() {
    [[ $CLEANED == 1 ]] && return
    CLEANED=1
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$p"; done
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# start_bg CPU LOGFILE CMD...: start CMD pinned to CPU, in the background.
# Sets STARTED_PID.
start_bg() {
    local cpu=$1 logfile=$2; shift 2
    taskset -c "$cpu" "$@" >"$logfile" 2>&1 </dev/null &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# wait_ready URL PID TIMEOUT_S: until URL answers 200 with the origin's body.
wait_ready() {
    local url=$1 pid=$2 timeout=$3 deadline body
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        is_alive "$pid" || { READY_ERR="process exited"; return 1; }
        if body=$(curl -fsS --max-time 1 "$url" 2>/dev/null); then
            if [[ "$body" == "hello world" ]]; then return 0; fi
            READY_ERR="unexpected response body: ${body:0:60}"
            return 1
        fi
        sleep 0.2
    done
    READY_ERR="no answer within ${timeout}s"
    return 1
}

# ------------------------------------------------------------- 1. install
need_install=0
for cmd in nginx haproxy wrk curl taskset python3; do
    command -v "$cmd" >/dev/null 2>&1 || need_install=1
done
if ((need_install)); then
    [[ $(id -u) == 0 ]] || die "nginx/haproxy/wrk/curl missing and not root; install them with apt-get"
    log "installing nginx haproxy wrk curl"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y nginx haproxy wrk curl util-linux python3
fi

NCPU=$(nproc)
((NCPU > PROXY_CPU && NCPU > LOAD_CPU)) || die "need CPUs $PROXY_CPU and $LOAD_CPU, have $NCPU"

for port in $LISTEN_PORT $ORIGIN_PORT $ADMIN_PORT; do
    port_open "$port" && die "port $HOST:$port is already in use; stop whatever listens there"
done

# Room for the proxies' file descriptors (HAProxy sizes its limit from maxconn).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

rm -rf "$TMP"
mkdir -p "$TMP"

# ---------------------------------------------------------------- 2. build
DROVER_STATUS=ok
if [[ " $PROXIES " == *" drover "* ]]; then
    if ((SKIP_BUILD)); then
        log "skipping build, using $DROVER_BIN"
    else
        log "building drover (release)"
        if ! (cd "$REPO_DIR" && cargo build --release --locked -p drover); then
            log "cargo build failed; drover will be reported as not available"
            DROVER_STATUS="build failed"
        fi
    fi
    if [[ $DROVER_STATUS == ok && ! -x "$DROVER_BIN" ]]; then
        DROVER_STATUS="binary not found ($DROVER_BIN)"
    fi
fi

# -------------------------------------------------------------- configs
# Temp paths nginx would otherwise put under /var/lib/nginx.
nginx_common() {
    local name=$1
    cat <<EOF
daemon off;
worker_processes 1;
pid $TMP/$name.pid;
error_log $TMP/$name-error.log warn;
events { worker_connections 4096; }
EOF
}

nginx_http_common() {
    local name=$1
    cat <<EOF
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path $TMP/$name-tmp/body;
    proxy_temp_path $TMP/$name-tmp/proxy;
    fastcgi_temp_path $TMP/$name-tmp/fastcgi;
    uwsgi_temp_path $TMP/$name-tmp/uwsgi;
    scgi_temp_path $TMP/$name-tmp/scgi;
EOF
}

write_origin_conf() {
    {
        nginx_common origin
        echo "http {"
        nginx_http_common origin
        cat <<EOF
    server {
        listen $HOST:$ORIGIN_PORT backlog=4096;
        location / { return 200 "hello world\n"; }
    }
}
EOF
    } >"$TMP/origin.conf"
}

write_nginx_conf() {
    {
        nginx_common nginx
        echo "http {"
        nginx_http_common nginx
        cat <<EOF
    upstream origin {
        server $HOST:$ORIGIN_PORT;
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen $HOST:$LISTEN_PORT backlog=4096;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$TMP/nginx.conf"
}

write_haproxy_conf() {
    cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
    pidfile $TMP/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    maxconn 4096

frontend bench
    bind $HOST:$LISTEN_PORT
    default_backend origin

backend origin
    server origin1 $HOST:$ORIGIN_PORT
EOF
}

write_drover_conf() {
    cat >"$TMP/drover.toml" <<EOF
[[listeners]]
name = "bench"
listen = "$HOST:$LISTEN_PORT"

[[routes]]
listener = "bench"
service = "origin"

[services.origin]
endpoints = [ { address = "$HOST:$ORIGIN_PORT" } ]
EOF
}

# ------------------------------------------------------------ 3. origin
write_origin_conf
mkdir -p "$TMP/origin-tmp"
nginx -t -q -p "$TMP" -e "$TMP/origin-error.log" -c "$TMP/origin.conf" \
    || die "origin nginx config invalid (see $TMP/origin-error.log)"
start_bg "$LOAD_CPU" "$TMP/origin.out" nginx -p "$TMP" -e "$TMP/origin-error.log" -c "$TMP/origin.conf"
ORIGIN_PID=$STARTED_PID
wait_ready "http://$HOST:$ORIGIN_PORT/" "$ORIGIN_PID" 10 \
    || die "origin did not start: $READY_ERR (see $TMP/origin-error.log)"
log "origin nginx up on $HOST:$ORIGIN_PORT (pid $ORIGIN_PID, CPU $LOAD_CPU)"

# ------------------------------------------------------------ 4. proxies
# start_proxy NAME: starts the proxy pinned to PROXY_CPU; sets PROXY_PID.
# Returns non-zero (with START_ERR) if it cannot be started.
start_proxy() {
    local name=$1
    PROXY_PID=""
    case "$name" in
        nginx)
            write_nginx_conf
            mkdir -p "$TMP/nginx-tmp"
            nginx -t -q -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf" \
                >"$TMP/nginx-check.out" 2>&1 || { START_ERR="config check failed"; return 1; }
            start_bg "$PROXY_CPU" "$TMP/nginx.out" nginx -p "$TMP" -e "$TMP/nginx-error.log" -c "$TMP/nginx.conf"
            ;;
        haproxy)
            write_haproxy_conf
            haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.out" 2>&1 \
                || { START_ERR="config check failed"; return 1; }
            start_bg "$PROXY_CPU" "$TMP/haproxy.out" haproxy -db -f "$TMP/haproxy.cfg"
            ;;
        drover)
            [[ $DROVER_STATUS == ok ]] || { START_ERR=$DROVER_STATUS; return 1; }
            write_drover_conf
            start_bg "$PROXY_CPU" "$TMP/drover.log" "$DROVER_BIN" run \
                --config "$TMP/drover.toml" --workers 1 --admin "$HOST:$ADMIN_PORT"
            ;;
        *) START_ERR="unknown proxy"; return 1 ;;
    esac
    PROXY_PID=$STARTED_PID
    if ! wait_ready "http://$HOST:$LISTEN_PORT/" "$PROXY_PID" 15; then
        START_ERR=$READY_ERR
        return 1
    fi
}

# run_wrk OUTFILE URL SECONDS: wrk pinned to LOAD_CPU (in the background so
# that an interrupt can stop it too).
run_wrk() {
    local out=$1 url=$2 secs=$3 pid
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${secs}s" --latency "$url" >"$out" 2>&1 </dev/null &
    pid=$!
    PIDS+=("$pid")
    local rc=0
    wait "$pid" || rc=$?
    stop_pid "$pid"
    return $rc
}

# ------------------------------------------------------ proxy CPU accounting
# On 2 cores the load-generator core (wrk + origin) can be the bound, so
# req/s alone cannot rank the proxies; the CPU the proxy spends per request can.
CLK_TCK=$(getconf CLK_TCK)

# proc_tree PID: PID and all of its descendants (nginx: master + worker).
proc_tree() {
    local child
    echo "$1"
    for child in $(pgrep -P "$1" 2>/dev/null || true); do proc_tree "$child"; done
}

# cpu_snapshot PID: one line "pid:starttime utime+stime" (clock ticks) for PID
# and each descendant. /proc/PID/stat of a process already sums its threads.
# The comm field (2) may contain spaces, so split after its closing ")":
# the rest starts at field 3, putting utime (14) / stime (15) / starttime (22)
# at indexes 11 / 12 / 19.
cpu_snapshot() {
    local pid stat f
    for pid in $(proc_tree "$1"); do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        read -ra f <<<"${stat##*) }"
        echo "$pid:${f[19]} $((f[11] + f[12]))"
    done
}

# cpu_measure_start PID / cpu_measure_end PID OUTFILE: CPU seconds PID and its
# descendants used in between, and the wall time, written to OUTFILE as
# "cpu_seconds=..." and "wall_seconds=..." lines. Processes are matched by pid
# and start time; one that appeared in between counts in full, one that
# vanished is reported (its CPU since the start is lost).
cpu_measure_start() {
    CPU_BEFORE=$(cpu_snapshot "$1")
    CPU_T0=$EPOCHREALTIME
}
cpu_measure_end() {
    local pid=$1 out=$2 t1 after
    t1=$EPOCHREALTIME
    after=$(cpu_snapshot "$pid")
    if [[ -z $after ]]; then
        log "cpu: pid $pid is gone, no CPU figure for this run"
        return 0
    fi
    awk -v hz="$CLK_TCK" -v t0="$CPU_T0" -v t1="$t1" -v pid="$pid" '
        BEGIN { sub(",", ".", t0); sub(",", ".", t1) }   # locale decimal comma
        FNR == NR { before[$1] = $2; next }
        { n++; seen[$1] = 1; d += ($1 in before) ? $2 - before[$1] : $2 }
        END {
            for (k in before) if (!(k in seen)) gone++
            printf "cpu_seconds=%.4f\nwall_seconds=%.4f\nclk_tck=%d\nprocesses=%d\n", d / hz, t1 - t0, hz, n
            printf "vanished_processes=%d\nmain_pid=%s\n", gone, pid
        }' <(printf '%s\n' "$CPU_BEFORE") <(printf '%s\n' "$after") >"$out"
    if grep -q '^vanished_processes=[1-9]' "$out"; then
        log "cpu: a process of pid $pid exited during the run; CPU figure may be low ($out)"
    fi
}

for proxy in $PROXIES; do
    echo "available" >"$TMP/status-$proxy"
    url="http://$HOST:$LISTEN_PORT/"
    PROXY_PID=""
    if [[ $proxy == direct ]]; then
        url="http://$HOST:$ORIGIN_PORT/"
        log "direct: wrk straight at the origin"
    else
        START_ERR=""
        if ! start_proxy "$proxy"; then
            log "$proxy: not available ($START_ERR)"
            echo "not available: $START_ERR" >"$TMP/status-$proxy"
            for f in "$TMP/$proxy.log" "$TMP/$proxy.out" "$TMP/$proxy-check.out" "$TMP/$proxy-error.log"; do
                [[ -s $f ]] && { log "last lines of $f:"; tail -n 5 "$f" >&2; }
            done
            [[ -n $PROXY_PID ]] && stop_pid "$PROXY_PID"
            # the port must be free before the next proxy starts
            for ((i = 0; i < 50; i++)); do port_open $LISTEN_PORT || break; sleep 0.1; done
            continue
        fi
        log "$proxy up (pid $PROXY_PID, CPU $PROXY_CPU)"
    fi

    if ((WARMUP > 0)); then
        run_wrk "$TMP/warmup-$proxy.txt" "$url" "$WARMUP" || true
    fi
    for ((run = 1; run <= RUNS; run++)); do
        out="$TMP/wrk-$proxy-$run.txt"
        cpu_out="$TMP/cpu-$proxy-$run.txt"
        [[ -n $PROXY_PID ]] && cpu_measure_start "$PROXY_PID"
        if ! run_wrk "$out" "$url" "$DURATION"; then
            log "$proxy run $run: wrk failed"
        fi
        [[ -n $PROXY_PID ]] && cpu_measure_end "$PROXY_PID" "$cpu_out"
        log "$proxy run $run/$RUNS: $(python3 "$BENCH_DIR/report.py" parse "$out" ${PROXY_PID:+"$cpu_out"})"
    done

    if [[ -n $PROXY_PID ]]; then
        stop_pid "$PROXY_PID"
        for ((i = 0; i < 50; i++)); do port_open $LISTEN_PORT || break; sleep 0.1; done
        port_open $LISTEN_PORT && die "port $LISTEN_PORT still busy after stopping $proxy"
    fi
done

stop_pid "$ORIGIN_PID"

# -------------------------------------------------------------- 6. report
# First line of "CMD -v", trimmed to "name version".
version_of() {
    { "$@" 2>&1 || true; } | head -n 1 \
        | sed -E 's/^nginx version: //; s/^HAProxy version ([^ ]+).*/HAProxy \1/; s/ \[.*//'
}
drover_commit=$(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo "none")
if [[ $drover_commit != none ]] && \
   [[ -n $(cd "$REPO_DIR" && GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    drover_commit="$drover_commit-dirty"
fi

python3 "$BENCH_DIR/report.py" report \
    --tmp "$TMP" \
    --proxies "$PROXIES" \
    --json "$RESULTS_DIR/core.json" \
    --md "$RESULTS_DIR/core.md" \
    --meta "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --meta "nproc=$NCPU" \
    --meta "kernel=$(uname -r)" \
    --meta "nginx_version=$(version_of nginx -v)" \
    --meta "haproxy_version=$(version_of haproxy -v)" \
    --meta "wrk_version=$(version_of wrk -v)" \
    --meta "drover_commit=$drover_commit" \
    --meta "duration_s=$DURATION" \
    --meta "runs_requested=$RUNS" \
    --meta "connections=$CONNECTIONS" \
    --meta "proxy_cpu=$PROXY_CPU" \
    --meta "load_cpu=$LOAD_CPU"

log "wrote $RESULTS_DIR/core.json and $RESULTS_DIR/core.md (raw wrk output in $TMP)"
