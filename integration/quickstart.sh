#!/usr/bin/env bash
# Quick start: installs the Debian parts and our daemon, starts a private registry, containerd (with the
# `stargz` proxy plugin) and stargz-snapshotter with its embedded default config, then lazily pulls an
# eStargz image and runs a container from it, printing how long that took and how many bytes were fetched.
#
#   sudo bash integration/quickstart.sh          # install, start, demo (leaves the services running)
#   sudo bash integration/quickstart.sh stop     # stop what the quick start started
#
# Everything lives under /var/lib/stargz-quickstart and /run/stargz-quickstart; the daemon itself uses the
# reference's defaults (/run/containerd-stargz-grpc/containerd-stargz-grpc.sock, /var/lib/containerd-stargz-grpc).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
qs=/var/lib/stargz-quickstart
run=/run/stargz-quickstart
sock=/run/containerd-stargz-grpc/containerd-stargz-grpc.sock
ctd_sock=$run/containerd.sock
reg=127.0.0.1:5000

stop_all() {
  for name in containerd stargz-snapshotter registry; do
    if [ -f "$run/$name.pid" ]; then
      pid=$(cat "$run/$name.pid")
      if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" || true; for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done; fi
      rm -f "$run/$name.pid"
    fi
  done
  echo "quickstart: stopped"
}
if [ "${1:-}" = "stop" ]; then stop_all; exit 0; fi
[ "$(id -u)" -eq 0 ] || { echo "quickstart: run as root (mounts, containerd)" >&2; exit 1; }

echo "== installing Debian parts and building Stargz"
bash "$top/integration/install-deps.sh"
# Native (AOT) executables: no .NET runtime is needed where they run.
build=$(mktemp -d)
dotnet publish "$top/src/Stargz.Daemon" -c Release -o "$build/daemon" -nologo -v q
dotnet publish "$top/src/Stargz.Cli" -c Release -o "$build/cli" -nologo -v q
install -m 0755 "$build/daemon/stargz-snapshotter" /usr/local/bin/stargz-snapshotter
install -m 0755 "$build/cli/stargz" /usr/local/bin/stargz
rm -rf "$build"
install -D -m 0644 "$top/src/Stargz.Daemon/stargz-snapshotter.service" /etc/systemd/system/stargz-snapshotter.service 2>/dev/null || true

stop_all >/dev/null
mkdir -p "$qs" "$run"
echo "== starting docker-registry on $reg"
cat > "$qs/registry.yml" <<YML
version: 0.1
log: { level: warn, formatter: text }
storage: { filesystem: { rootdirectory: $qs/registry }, delete: { enabled: true } }
http: { addr: $reg }
YML
docker-registry serve "$qs/registry.yml" > "$qs/registry.log" 2>&1 & echo $! > "$run/registry.pid"

echo "== starting stargz-snapshotter (embedded default config) on $sock, under its supervisor"
# `supervise` keeps the FUSE connections while the daemon restarts: kill -HUP the supervisor to upgrade the daemon,
# kill -9 the daemon to see it come back; running containers keep reading their lazily pulled files meanwhile.
stargz-snapshotter supervise --log-level info > "$qs/stargz-snapshotter.log" 2>&1 & echo $! > "$run/stargz-snapshotter.pid"

echo "== starting containerd with the stargz proxy plugin on $ctd_sock"
cat > "$qs/containerd.toml" <<TOML
version = 2
root = "$qs/containerd-root"
state = "$run/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ctd_sock"
[ttrpc]
  address = "$ctd_sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "$sock"
TOML
containerd --config "$qs/containerd.toml" > "$qs/containerd.log" 2>&1 & echo $! > "$run/containerd.pid"
for _ in $(seq 100); do [ -S "$ctd_sock" ] && [ -S "$sock" ] && ctr -a "$ctd_sock" version >/dev/null 2>&1 && break; sleep 0.2; done
ctr -a "$ctd_sock" version >/dev/null || { echo "quickstart: containerd did not start, see $qs/containerd.log" >&2; exit 1; }
[ -S "$sock" ] || { echo "quickstart: stargz-snapshotter did not start, see $qs/stargz-snapshotter.log" >&2; exit 1; }

echo "== building a demo image from local files (busybox + 64 MB of data) and converting it with stargz image convert"
img=$qs/image; rm -rf "$img"; mkdir -p "$img/l1/bin" "$img/l2/data"
cp /bin/busybox "$img/l1/bin/busybox"
for a in sh cat ls echo wc sha256sum; do ln -sf busybox "$img/l1/bin/$a"; done
head -c 67108864 /dev/urandom > "$img/l2/data/big.bin"
echo "Hello from a lazily pulled eStargz container" > "$img/l2/data/hello.txt"
umoci init --layout "$img/oci" >/dev/null
umoci new --image "$img/oci:v1"
umoci insert --image "$img/oci:v1" --no-history "$img/l1" / >/dev/null
umoci insert --image "$img/oci:v1" --no-history "$img/l2" / >/dev/null
skopeo copy --quiet --dest-tls-verify=false "oci:$img/oci:v1" "docker://$reg/demo:v1"
stargz image convert --plain-http "$reg/demo:v1" "$reg/demo:esgz"

echo "== lazy pull (stargz image rpull) and run"
# A previous quick start may have left the image behind; start the pull from nothing (chunks it cached stay cached).
ctr -a "$ctd_sock" image rm --sync "$reg/demo:esgz" >/dev/null 2>&1 || true
log_mark=$(wc -l < "$qs/registry.log")
start=$(date +%s.%N)
stargz image rpull --address "$ctd_sock" --plain-http "$reg/demo:esgz"
ctr -a "$ctd_sock" run --rm --snapshotter stargz "$reg/demo:esgz" quickstart-demo /bin/cat /data/hello.txt
end=$(date +%s.%N)
# The registry's access log (combined format) says how many bytes it served for this pull and run.
fetched=$(tail -n +"$((log_mark + 1))" "$qs/registry.log" | awk '/"GET \/v2\// { for (i = 1; i <= NF; i++) if ($i ~ /^HTTP\/[0-9.]+"$/) { s += $(i + 2); break } } END { print s + 0 }')
image_bytes=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$reg/v2/demo/manifests/esgz" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
printf '== pulled and ran in %.2f s; by then the registry had served %s bytes of the %s-byte image (%s%%, prefetch and background fetch included)\n' \
  "$(awk "BEGIN{print $end - $start}")" "$fetched" "$image_bytes" "$(awk "BEGIN{printf \"%.1f\", 100*$fetched/$image_bytes}")"
echo "== services keep running; stop them with: sudo bash integration/quickstart.sh stop"
