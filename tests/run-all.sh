#!/usr/bin/env bash
# Installs what the tests need, builds everything with warnings as errors, runs every test project
# (unit and integration) and containerd 1.6's snapshotter conformance suite (tests/conformance, Go) against the
# published daemon, and prints one summary line: "N passed, N failed, N skipped" (xunit TRX files + go test events).
set -uo pipefail
# Daemons started by the tests must not find an outer service manager (a CI job in a systemd unit): they would keep
# their FUSE connections in its fd store and hand them over on SIGTERM instead of unmounting.
unset NOTIFY_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash integration/install-deps.sh || exit 1
dotnet build Stargz.sln -c Release -warnaserror -nologo -v q || exit 1
# The shipped executables, native AOT: the end-to-end tests run these (tests/Stargz.TestSupport/NativeExecutables.cs).
dotnet publish src/Stargz.Daemon -c Release -o artifacts/native/daemon -warnaserror -nologo -v q || exit 1
dotnet publish src/Stargz.Cli -c Release -o artifacts/native/cli -warnaserror -nologo -v q || exit 1
results="$top/artifacts/test-results"
rm -rf "$results"; mkdir -p "$results"
rc=0
# Projects run one after another: integration tests start containerd/registries and mount FUSE,
# and the machine has 2 cores.
for proj in $(find tests integration -name '*.Tests.csproj' | sort); do
  name=$(basename "$proj" .csproj)
  echo "=== $name"
  dotnet test --project "$proj" -c Release --no-build --results-directory "$results/$name" --report-xunit-trx \
    --minimum-expected-tests 1 -- ${STARGZ_TEST_ARGS:-} || rc=1
done
echo "=== conformance (containerd snapshots/testsuite)"
bash tests/conformance/run.sh artifacts/native/daemon/stargz-snapshotter "$results/conformance"
conformance_rc=$?
[ $conformance_rc -eq 0 ] || rc=1
python3 - "$results" "$conformance_rc" <<'PY'
import sys, glob, json, xml.etree.ElementTree as ET
p = f = s = 0
for trx in glob.glob(sys.argv[1] + "/**/*.trx", recursive=True):
    try:
        c = ET.parse(trx).getroot().find(".//{*}ResultSummary/{*}Counters")
    except ET.ParseError as e:
        # A report cut short (its writer failed, e.g. on a control character in a failure message): its project's run
        # failed (rc says so); counted as one failure rather than losing the summary.
        print(f"{trx}: unreadable report ({e}): counted as 1 failed", file=sys.stderr)
        f += 1
        continue
    if c is None: continue
    p += int(c.get("passed", 0)); f += int(c.get("failed", 0)) + int(c.get("error", 0))
    s += int(c.get("notExecuted", 0))
# go test -json events: every test without subtests counts once, by its last pass/fail/skip.
go_failed = 0
for path in glob.glob(sys.argv[1] + "/**/*.gotest.json", recursive=True):
    final = {}
    for line in open(path):
        e = json.loads(line)
        if e.get("Test") and e["Action"] in ("pass", "fail", "skip"): final[e["Test"]] = e["Action"]
    for t, a in final.items():
        if any(o.startswith(t + "/") for o in final): continue
        if a == "pass": p += 1
        elif a == "skip": s += 1
        else: f += 1; go_failed += 1
# The conformance run failed without a failed test to show for it (build, setup, crash): count it as one failure.
if sys.argv[2] != "0" and go_failed == 0: f += 1
print(f"Tests: {p} passed, {f} failed, {s} skipped")
PY
exit $rc
