#!/usr/bin/env bash
# Builds the reference snapshotter daemon (main.go) from Debian's packaged Go sources of containerd/stargz-snapshotter
# 0.12 and its dependencies. Usage: build.sh [OUT] (default /tmp/stargz-reference/containerd-stargz-grpc-reference).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-/tmp/stargz-reference/containerd-stargz-grpc-reference}"
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/fs ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go golang-github-containerd-stargz-snapshotter-dev >/dev/null
fi
gopath="$(mktemp -d)"
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/stargz-reference-daemon" "$(dirname "$out")"
cp "$here/main.go" "$gopath/src/stargz-reference-daemon/"
# GOPATH mode: the Debian -dev packages install sources under /usr/share/gocode, not a module cache.
GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOCACHE="$gopath/cache" go build -o "$out" stargz-reference-daemon
echo "$out"
