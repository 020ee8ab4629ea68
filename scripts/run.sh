#!/usr/bin/env bash
# Builds and runs drover on a fresh machine: installs what the build needs (a C compiler, and
# protoc for the etcd client's generated code), then `cargo run --release`. Arguments go to
# drover; without any, `run` on the embedded default. Usage: bash scripts/run.sh [ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t need_apt < <(bash scripts/build-deps.sh)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_apt[@]}"
  else
    echo "scripts/run.sh: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi
if [ $# -eq 0 ]; then
  set -- run
fi
exec cargo run --release --locked --bin drover -- "$@"
