#!/usr/bin/env bash
# Runs drover's whole test suite on a fresh machine: installs what the tests need, then runs
# every unit and end-to-end test with cargo-nextest. Usage: bash scripts/test.sh [nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# What the build needs (a C compiler, protoc and its .proto files), then what the tests need.
mapfile -t need_apt < <(bash scripts/build-deps.sh)
command -v curl >/dev/null || need_apt+=(curl)
# The cluster tests run real etcd members.
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
# The Docker source's tests run against a real Docker Engine.
[ -x /usr/sbin/dockerd ] || need_apt+=(docker.io)
command -v busybox >/dev/null || [ -x /bin/busybox ] || need_apt+=(busybox-static)
# The dashboard's tests drive a headless Chromium.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# drover top's interactive test runs it in a tmux pane.
command -v tmux >/dev/null || need_apt+=(tmux)
# HTTP/2 under load (h2load) and the slowloris / slow-read checks.
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v slowhttptest >/dev/null || need_apt+=(slowhttptest)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_apt[@]}"
  else
    echo "scripts/test.sh: please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi
docker_up() {
  curl -sf --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1
}
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

# A Docker Engine for the Docker source's tests: started here when none answers.
if ! docker_up; then
  if [ "$(id -u)" = 0 ]; then
    mkdir -p target
    echo "scripts/test.sh: starting dockerd (log: target/dockerd.log)" >&2
    setsid dockerd >target/dockerd.log 2>&1 < /dev/null &
    for _ in $(seq 1 60); do docker_up && break; sleep 0.5; done
    docker_up || { echo "scripts/test.sh: dockerd did not start; see target/dockerd.log" >&2; exit 1; }
  else
    echo "scripts/test.sh: no Docker Engine answers on /var/run/docker.sock; start dockerd" >&2
    exit 1
  fi
fi

cargo nextest run --workspace --locked "$@"
