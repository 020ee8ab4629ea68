#!/usr/bin/env bash
# drover vs nginx vs HAProxy vs Caddy vs no proxy at all.
#
#   bash bench/run.sh [--skip-build]          # full run, about 20 minutes on 2 cores
#   QUICK=1 bash bench/run.sh --skip-build    # every scenario briefly, about 1.5 minutes
#
# Installs what is missing (as root on Debian: nginx haproxy caddy wrk
# nghttp2-client libnginx-mod-stream), builds drover, bench/pace and bench/floor in
# release mode, runs bench/bench.py (writes bench/results/$NAME.json), then
# bench/report.py (bench/results/$NAME.{md,svg} and, unless QUICK=1 or UPDATE_DOC=0,
# the results section of docs/benchmarks.md). Knobs: see bench/README.md.
set -euo pipefail

SKIP_BUILD=0
for arg in "$@"; do
    case "$arg" in
        --skip-build) SKIP_BUILD=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

# nginx and haproxy live in /usr/sbin, which is not always on PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_DIR/target}"
log() { printf '[bench] %s\n' "$*" >&2; }

# ------------------------------------------------------------- 1. install
missing=()
for pair in nginx:nginx haproxy:haproxy caddy:caddy wrk:wrk h2load:nghttp2-client \
            curl:curl taskset:util-linux python3:python3 openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# nginx's stream module, for the relay phase (nginx as a plain TCP relay).
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
# What building drover needs (a C compiler, protoc and its .proto files).
mapfile -t -O "${#missing[@]}" missing < <(bash "$REPO_DIR/scripts/build-deps.sh")
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { log "missing ${missing[*]}; run as root or apt-get install them"; exit 1; }
    log "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
# The Debian packages start their services where systemd runs; the benchmark
# starts its own instances on its own ports and leaves those alone.

# ---------------------------------------------------------------- 2. build
if ((SKIP_BUILD)); then
    log "skipping drover build, using $TARGET_DIR/release/drover"
else
    log "building drover (release)"
    (cd "$REPO_DIR" && cargo build --release --locked -p drover) \
        || log "cargo build failed; drover will be reported as not available"
fi
log "building bench/pace (the fixed-rate load generator)"
cargo build --release --quiet --manifest-path "$BENCH_DIR/pace/Cargo.toml" \
    --target-dir "$TARGET_DIR/bench-pace"
log "building bench/floor (the minimal proxies drover is set beside)"
cargo build --release --quiet --locked --manifest-path "$BENCH_DIR/floor/Cargo.toml" \
    --target-dir "$TARGET_DIR/bench-floor"

# ------------------------------------------------------------------ 3. run
export DROVER_BIN="$TARGET_DIR/release/drover" PACE_BIN="$TARGET_DIR/bench-pace/release/pace"
export FLOOR_BIN="$TARGET_DIR/bench-floor/release/floor"
QUICK=${QUICK:-0}
NAME=${NAME:-$([[ $QUICK != 0 ]] && echo quick || echo latest)}
export QUICK NAME
python3 "$BENCH_DIR/bench.py"

# --------------------------------------------------------------- 4. report
doc_flag=()
if [[ ${UPDATE_DOC:-$([[ $QUICK != 0 ]] && echo 0 || echo 1)} == 0 ]]; then doc_flag=(--no-doc); fi
python3 "$BENCH_DIR/report.py" "$BENCH_DIR/results/$NAME.json" "${doc_flag[@]}" \
    ${NOTE:+--note "$NOTE"}
log "results: bench/results/$NAME.json, .md, .svg (raw tool output in bench/results/tmp/)"
