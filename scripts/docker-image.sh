#!/usr/bin/env bash
# Builds a drover image without a registry: a root filesystem holding a drover binary, the
# shared libraries it links and the CA certificates, imported with `docker import`. The image
# runs like the Dockerfile's: `drover run --docker`.
#
# Usage: bash scripts/docker-image.sh [BINARY] [TAG]
#   BINARY  default: target/release/drover (built with `cargo build --release --locked`)
#   TAG     default: drover:local
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-target/release/drover}
tag=${2:-drover:local}
if [ ! -x "$binary" ]; then
  if [ $# -ge 1 ]; then
    echo "docker-image.sh: $binary is not an executable drover binary" >&2
    exit 1
  fi
  cargo build --release --locked --bin drover
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -D -m 0755 "$binary" "$root/usr/local/bin/drover"
# The dynamic loader and every library the binary needs, at the paths ldd gives.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
  install -D -m 0755 "$lib" "$root$lib"
done
if [ -e /etc/ssl/certs/ca-certificates.crt ]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
mkdir -p "$root/tmp" "$root/var/lib/drover"
chmod 1777 "$root/tmp"
echo 'root:x:0:0:root:/root:/sbin/nologin' > "$root/etc/passwd"

tar -C "$root" -c . | docker import \
  --change 'ENTRYPOINT ["/usr/local/bin/drover"]' \
  --change 'CMD ["run", "--docker", "--data-dir", "/var/lib/drover"]' \
  --change 'WORKDIR /var/lib/drover' \
  - "$tag" >/dev/null
echo "$tag"
