#!/usr/bin/env bash
# Runs containerd's snapshotter conformance suite (snapshots/testsuite of containerd 1.6, Debian's
# golang-github-containerd-containerd-dev) against our daemon through containerd's proxy client.
# Usage: run.sh DAEMON_EXECUTABLE OUT_DIR
# Builds conformance_test.go in GOPATH mode from Debian's packaged Go sources (integration/packages.txt installs them),
# runs it as root, and writes OUT_DIR/conformance.log (go test -v), OUT_DIR/conformance.gotest.json (its test2json
# events, which tests/run-all.sh counts) and OUT_DIR/logs/ (each daemon's log). Exits non-zero when a test failed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 2 ] || { echo "usage: $0 DAEMON_EXECUTABLE OUT_DIR" >&2; exit 2; }
daemon=$(realpath -m "$1")
out=$(realpath -m "$2")
[ -x "$daemon" ] || { echo "conformance: daemon executable $daemon not found (dotnet publish src/Stargz.Daemon)" >&2; exit 1; }
command -v go >/dev/null || { echo "conformance: go not installed (integration/install-deps.sh)" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' golang-github-containerd-containerd-dev 2>/dev/null) \
  || { echo "conformance: golang-github-containerd-containerd-dev not installed" >&2; exit 1; }
case "$version" in
  1.6.*) ;;
  *) echo "conformance: the suite is containerd 1.6's; Debian's containerd sources are $version" >&2; exit 1 ;;
esac
mkdir -p "$out"
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/stargz-conformance"
cp "$here/conformance_test.go" "$gopath/src/stargz-conformance/"
# GOPATH mode: Debian's -dev packages put the sources under /usr/share/gocode, not in a module cache.
export GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS=
[ -n "${HOME:-}" ] || export GOCACHE="$gopath/cache"
echo "conformance: building containerd $version's snapshotter suite"
go test -c -o "$gopath/conformance.test" stargz-conformance || exit 1
cd "$gopath"
"$gopath/conformance.test" -test.v -test.count=1 -test.timeout 20m -daemon "$daemon" -logdir "$out/logs" \
  > "$out/conformance.log" 2>&1
rc=$?
go tool test2json -t -p stargz-conformance < "$out/conformance.log" > "$out/conformance.gotest.json"
# One line per suite variant (TestSnapshotterSuite/VARIANT/TEST) and per other test, and every failure with its output.
python3 - "$out/conformance.gotest.json" "$version" <<'PY'
import json, sys, collections
final, output = {}, collections.defaultdict(list)
for line in open(sys.argv[1]):
    e = json.loads(line)
    t = e.get("Test")
    if not t: continue
    if e["Action"] in ("pass", "fail", "skip"): final[t] = e["Action"]
    elif e["Action"] == "output": output[t].append(e["Output"])
counts = collections.OrderedDict()
for t, a in final.items():
    parts = t.split("/")
    if len(parts) != 3: continue
    counts.setdefault(parts[1], collections.Counter())[a] += 1
for v, c in counts.items():
    print(f"conformance (containerd {sys.argv[2]} snapshots/testsuite) {v}: {c['pass']} passed, {c['fail']} failed, {c['skip']} skipped")
for t, a in final.items():
    if "/" not in t and not any(o.startswith(t + "/") for o in final):
        print(f"conformance {t}: {a}")
for t, a in final.items():
    if a == "fail" and not any(o.startswith(t + "/") for o in final):
        print(f"--- FAIL {t}\n" + "".join(output[t])[-4000:])
PY
[ $rc -eq 0 ] || echo "conformance: go test exited $rc (full output: $out/conformance.log)" >&2
exit $rc
