#!/usr/bin/env bash
# Prints the Debian packages that building drover needs and this machine lacks, one per line:
# a C compiler (ring builds C and assembly) and protoc with the well-known .proto files
# (the etcd client compiles etcd's API, which imports google/protobuf/descriptor.proto; that
# file comes with libprotobuf-dev, only a recommendation of protobuf-compiler, so an install
# with --no-install-recommends leaves it out).
# Usage: mapfile -t need_apt < <(bash scripts/build-deps.sh)
command -v cc >/dev/null || echo build-essential
command -v protoc >/dev/null || echo protobuf-compiler
[ -f /usr/include/google/protobuf/descriptor.proto ] || echo libprotobuf-dev
