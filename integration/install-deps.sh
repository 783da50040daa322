#!/usr/bin/env bash
# Installs the real parts the project talks to (containerd, runc, docker-registry, ctr-remote, ...)
# from Debian's archive. Idempotent: it skips apt when every package is already installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t pkgs < <(grep -vE '^\s*(#|$)' "$here/packages.txt")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v dotnet >/dev/null || { echo "install-deps: the .NET 10 SDK (dotnet) is required" >&2; exit 1; }
# containerd's Debian package may start a system instance; our tests run their own private ones.
modprobe fuse 2>/dev/null || true
# Debian's udev default; some machines ship 0600, which keeps non-root FUSE mounts (fusermount3) from working.
[ -c /dev/fuse ] && chmod 0666 /dev/fuse
modprobe overlay 2>/dev/null || true
echo "install-deps: ok"
