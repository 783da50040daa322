#!/usr/bin/env bash
# Records which managed methods of the native daemon run while it starts, idles, pulls and runs the Stargz.Bench.Pull
# images (python: pull + run, twice; large: pull + run + background fetch) and writes them, in the order the compiler
# laid them out, to src/Stargz.Daemon/hot-methods.order. The daemon's build (IlcOrderFile) places those methods first,
# together: the kernel maps an executable's code in folios of 64 KiB and more, so code that runs scattered among code
# that never does keeps nearly all 10 MiB of it resident; packed, far fewer pages are in use.
#
# How: a uprobe on the entry of every managed method (the executable's .dbg symbols), enabled without tracing, so the
# kernel counts each method's calls (uprobe_profile). Root; tracefs; about 35 minutes on the 2-core machine: 2 to
# register the 40,000 probes, 5 for the runs (slowed down by the probes), 25 for the kernel to remove them again. Run
# it again when much of the daemon's code changed; a method missing from the file (renamed, new) only lands among the
# rest, where it was before. HOT_METHODS_LIMIT=N probes only the first N methods (a quick check of the script itself).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../../.." && pwd)"
out="${1:-$repo/src/Stargz.Daemon/hot-methods.order}"
work="$(mktemp -d /tmp/hot-methods.XXXXXX)"
tracing=/sys/kernel/tracing
group=stargzhot
mounted=
cleanup() {
    echo "removing the probes ..."
    [ ! -e "$tracing/events/$group/enable" ] || echo 0 >"$tracing/events/$group/enable"
    # One by one: truncating uprobe_events would remove other users' probes too.
    [ ! -e "$work/names" ] || python3 - "$work/names" "$group" "$tracing/uprobe_events" <<'PY' || true
import os, sys
names, group, events = sys.argv[1:]
fd = os.open(events, os.O_WRONLY | os.O_APPEND)
for line in open(names):
    try: os.write(fd, f"-:{group}/{line.split()[0]}\n".encode())
    except OSError: pass
PY
    rm -rf "$work"
    [ -z "$mounted" ] || umount "$tracing"
}
trap cleanup EXIT
if [ ! -e "$tracing/uprobe_events" ]; then mount -t tracefs nodev "$tracing"; mounted=1; fi

echo "building the daemon without a method order ..."
dotnet publish "$repo/src/Stargz.Daemon" -c Release -o "$work/daemon" -warnaserror -p:StargzMethodOrder=false >"$work/publish.log"
exe="$work/daemon/stargz-snapshotter"

# One probe line per managed method: group/fN at the method's file offset.
python3 - "$exe" "$group" "$work" "${HOT_METHODS_LIMIT:-0}" <<'PY'
import subprocess, sys
exe, group, work, limit = sys.argv[1:]
limit = int(limit)
start = size = off = None
for line in subprocess.run(["readelf", "-SW", exe], capture_output=True, text=True, check=True).stdout.splitlines():
    p = line.replace("[ ", "[").split()
    if len(p) > 5 and p[1] == "__managedcode":
        start, off, size = int(p[3], 16), int(p[4], 16), int(p[5], 16)
if start is None:
    sys.exit(f"{exe}: no __managedcode section")
seen = set()
with open(f"{work}/probes", "w") as probes, open(f"{work}/names", "w") as names:
    for line in subprocess.run(["nm", "-n", exe + ".dbg"], capture_output=True, text=True, check=True).stdout.splitlines():
        p = line.split()
        if len(p) != 3 or p[1] not in "tT":
            continue
        addr = int(p[0], 16)
        if not start <= addr < start + size or addr in seen or 0 < limit <= len(seen):
            continue
        seen.add(addr)
        probes.write(f"p:{group}/f{len(seen)} {exe}:0x{addr - start + off:x}\n")
        names.write(f"f{len(seen)}\t{p[2]}\n")
print(f"{len(seen)} managed methods")
PY


echo "registering the probes ..."
python3 - "$work/probes" "$tracing/uprobe_events" <<'PY'
import os, sys
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND)
for line in open(sys.argv[1]):
    os.write(fd, line.encode())  # one write per probe: a write that splits a line is refused
PY
echo 1 >"$tracing/events/$group/enable"

bench() {
    dotnet run -c Release --project "$repo/integration/bench/Stargz.Bench.Pull" -- --daemon "$exe" --variants 2 --idle-s 12 \
        --out "$work/bench.md" "$@" >"$work/bench.log" 2>&1 || { tail -20 "$work/bench.log"; exit 1; }
}
echo "python image, pull + run, twice ..."
bench --image python --data-mb 128 --runs 2
echo "large image, pull + run + background fetch ..."
bench --image large --bulk-layers 3 --bulk-mb 128 --runs 1 --wait-fetch
echo 0 >"$tracing/events/$group/enable"

python3 - "$work/names" "$tracing/uprobe_profile" "$out" <<'PY'
import sys
names, profile, out = sys.argv[1:]
name = dict(line.rstrip("\n").split("\t") for line in open(names))
ran = set()
for line in open(profile):
    p = line.split()
    # "  PATH GROUP/EVENT  HITS" or "  PATH EVENT  HITS" depending on the kernel
    if len(p) >= 3 and p[-1].isdigit() and int(p[-1]) > 0:
        ran.add(p[-2].split("/")[-1])
order = [name[k] for k in sorted(ran, key=lambda k: int(k[1:]))]
with open(out, "w") as f:
    f.write("# Managed methods the daemon runs to start, idle, pull and run images, in compiled order: written by\n"
            "# integration/bench/hot-methods/record.sh, read by the native build (IlcOrderFile) to place them first.\n")
    f.writelines(m + "\n" for m in order)
print(f"{len(order)} of {len(name)} methods ran: {out}")
PY
