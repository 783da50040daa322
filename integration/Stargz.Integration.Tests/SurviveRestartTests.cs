using System.Text.RegularExpressions;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Running containers keep their lazily pulled layers while the daemon dies, restarts and is upgraded: the daemon
/// runs under `stargz-snapshotter supervise`, whose fd store keeps every FUSE connection, and each new daemon adopts
/// the mounts instead of mounting again.
/// </summary>
public class SurviveRestartTests
{
    private const int SigHup = 1, SigKill = 9, SigTerm = 15;

    /// <summary>25 files of 4 MiB: a 100 MiB set, read lazily (no prefetch, no background fetch).</summary>
    private static Dictionary<string, int> DataSet()
    {
        var d = new Dictionary<string, int>();
        for (int i = 0; i < 25; i++) d[$"f{i:00}.bin"] = 4096;
        return d;
    }

    [Fact]
    public async Task AContainerHashingLazyFilesSeesNoErrorAcrossThreeKillsARestartAndAnUpgrade()
    {
        await using var rig = await OutageRig.StartAsync(supervised: true);
        var ct = TestContext.Current.CancellationToken;
        var img = await rig.PushImageAsync("survive/loop", DataSet(), seed: 1701);
        await rig.RpullAsync(img.Estargz);

        // The container hashes the whole set again and again, every pass through the daemon.
        await using var reader = await HashingReader.StartAsync(rig, img, "hasher", ct);
        await reader.WaitPassesAsync(1, "before any restart");
        var mounts = rig.FuseMountIds();
        Assert.Equal(2, mounts.Count);
        var exe = NativeExecutables.Daemon(LocalDaemon.DllPath());

        var events = new (string What, int Signal, bool ToSupervisor)[]
        {
            ("SIGKILL #1", SigKill, false), ("SIGKILL #2", SigKill, false), ("SIGKILL #3", SigKill, false),
            ("SIGTERM (restart)", SigTerm, false), ("SIGHUP to supervise (upgrade)", SigHup, true),
        };
        int step = 0;
        foreach (var (what, signal, toSupervisor) in events)
        {
            step++;
            if (toSupervisor && exe != null)
            {
                // "The binary now on disk": a new file in the old one's place (same code); the old daemon still runs the old inode.
                File.Copy(exe, exe + ".upgrade", overwrite: true);
                File.Move(exe + ".upgrade", exe, overwrite: true);
            }
            int before = reader.Passes();
            int pid = await rig.Daemon.SignalAndWaitRestartAsync(signal, toSupervisor);
            if (toSupervisor && exe != null)
                Assert.Equal(exe, File.ResolveLinkTarget($"/proc/{pid}/exe", false)?.FullName);
            await rig.WaitContainerdReachesDaemonAsync();
            // The same mounts, adopted: not one mounted again, none added.
            Assert.Equal(mounts, rig.FuseMountIds());
            Assert.Equal(2, await rig.WaitMetricAsync("stargz_fuse_adopted_mounts", v => v >= 2, TimeSpan.FromSeconds(60)));
            // The reader goes on through the restart: two more full passes, no error.
            await reader.WaitPassesAsync(before + 2, $"after {what}");
            // A new container from the same image starts and reads right bytes.
            var file = $"f{step:00}.bin";
            Assert.Equal(img.Sha256[file], await rig.Sha256InContainerAsync(img.Estargz, $"after-{step}", file));
            Assert.Equal(mounts, rig.FuseMountIds());
        }

        Assert.Equal("stopped", Regex.Replace(await reader.StopAsync(ct), @"stopped \d+", "stopped"));
        Assert.True(reader.Passes() >= 1 + 2 * events.Length);

        // Removing the container and the image ends the mounts and the stored connections.
        (await rig.Containerd.CtrAsync("tasks", "rm", "-f", "hasher")).EnsureSuccess("ctr tasks rm hasher");
        (await rig.Containerd.CtrAsync("containers", "rm", "hasher")).EnsureSuccess("ctr containers rm hasher");
        (await rig.Containerd.CtrAsync("images", "rm", "--sync", img.Estargz)).EnsureSuccess("ctr images rm");
        var gone = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while ((rig.FuseMountIds().Count > 0 || StoredFuseFds(rig.Daemon.Pid) > 0) && DateTime.UtcNow < gone) await Task.Delay(250, ct);
        Assert.Empty(rig.FuseMountIds());
        Assert.Equal(0, StoredFuseFds(rig.Daemon.Pid));
    }

    [Fact]
    public async Task StoppingTheSupervisorStopsTheDaemonForGoodAndUnmountsEverything()
    {
        await using var rig = await OutageRig.StartAsync(supervised: true);
        var img = await rig.PushImageAsync("survive/stop", new Dictionary<string, int> { ["a.bin"] = 256 }, seed: 1702);
        await rig.RpullAsync(img.Estargz);
        Assert.Equal(img.Sha256["a.bin"], await rig.Sha256InContainerAsync(img.Estargz, "once", "a.bin"));
        Assert.Equal(2, rig.FuseMountIds().Count);
        Assert.True(StoredFuseFds(rig.Daemon.Pid) >= 2, "the supervisor holds no FUSE connection");
        int child = rig.Daemon.ChildPid;
        Assert.NotEqual(0, child);

        rig.Daemon.Signal(SigTerm);
        Assert.Equal(0, await rig.Daemon.WaitExitAsync(TimeSpan.FromSeconds(90)));
        Assert.False(Directory.Exists($"/proc/{child}"), "the daemon outlived its supervisor");
        Assert.Empty(rig.FuseMountIds());
        Assert.Contains("stopping for good (SIGINT)", rig.Daemon.Log);
    }

    /// <summary>/dev/fuse descriptors the process holds (the supervisor's fd store).</summary>
    /// <summary>
    /// Issue 20: a container started lazily keeps reading through its layers' FUSE connections after they are promoted to
    /// EROFS (the mounts are detached then, new containers get the images). Those detached connections are kept in the fd
    /// store too, under their layer, and a restarted daemon adopts them (served from the images): the container's reads
    /// go on with right bytes across a SIGKILL and a SIGTERM.
    /// </summary>
    [Fact]
    public async Task AContainerStartedBeforeItsLayersWerePromotedKeepsReadingRightBytesAcrossAKillAndARestart()
    {
        Requires.Erofs();
        await using var rig = await OutageRig.StartAsync(supervised: true, backgroundFetch: true, extraToml: "[erofs]\npromote = true\n");
        var ct = TestContext.Current.CancellationToken;
        var set = new Dictionary<string, int>();
        for (int i = 0; i < 4; i++) set[$"f{i:00}.bin"] = 4096;
        var img = await rig.PushImageAsync("survive/promoted", set, seed: 1702);
        await rig.RpullAsync(img.Estargz);
        await using var reader = await HashingReader.StartAsync(rig, img, "early", ct);
        await reader.WaitPassesAsync(1, "before the promotion");
        Assert.Equal(2, rig.FuseMountIds().Count);
        await rig.WaitMetricAsync("stargz_layers_promoted", v => v >= 2, TimeSpan.FromSeconds(240));
        // Promoted: no FUSE mount left at the mount points; the container reads through the detached connections.
        Assert.Empty(rig.FuseMountIds());
        await reader.WaitPassesAsync(reader.Passes() + 2, "after the promotion");

        foreach (var (what, signal) in new[] { ("SIGKILL", SigKill), ("SIGTERM", SigTerm) })
        {
            int before = reader.Passes();
            await rig.Daemon.SignalAndWaitRestartAsync(signal);
            await rig.WaitContainerdReachesDaemonAsync();
            Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "adopted a detached FUSE connection"));
            await reader.WaitPassesAsync(before + 2, $"after {what}");
            // New containers get the images.
            Assert.Equal(img.Sha256["f01.bin"], await rig.Sha256InContainerAsync(img.Estargz, $"late-{what.ToLowerInvariant()}", "f01.bin"));
            Assert.Equal(2, await rig.MetricAsync("stargz_layers_promoted"));
        }

        Assert.Equal("stopped", Regex.Replace(await reader.StopAsync(ct), @"stopped \d+", "stopped"));

        // The container gone, its detached connections end and leave the fd store.
        (await rig.Containerd.CtrAsync("tasks", "rm", "-f", "early")).EnsureSuccess("ctr tasks rm early");
        (await rig.Containerd.CtrAsync("containers", "rm", "early")).EnsureSuccess("ctr containers rm early");
        var gone = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (StoredFuseFds(rig.Daemon.Pid) > 0 && DateTime.UtcNow < gone) await Task.Delay(250, ct);
        Assert.Equal(0, StoredFuseFds(rig.Daemon.Pid));
    }

    /// <summary>
    /// A container that checks the image's /data files against their sha256 again and again and logs each pass to a host
    /// dir, while the kernel's caches are dropped every 300 ms: page-cache hits never reach the daemon, so every pass
    /// reads through FUSE (and the kernel forgets inodes, sending FORGETs across restarts).
    /// </summary>
    private sealed class HashingReader : IAsyncDisposable
    {
        private const string Script = """
            cd /data
            n=0
            while [ ! -e /out/stop ]; do
              n=$((n+1))
              if sha256sum -c /out/expected > /out/last 2>&1; then echo "pass $n" >> /out/log
              else echo "FAIL $n" >> /out/log; cat /out/last >> /out/log; fi
            done
            echo "stopped $n" >> /out/log
            """;

        private readonly OutageRig _rig;
        private readonly string _outDir, _log;
        private readonly CancellationTokenSource _stopDropping;
        private readonly Task _dropper;

        private HashingReader(OutageRig rig, string outDir, CancellationToken ct)
        {
            _rig = rig;
            _outDir = outDir;
            _log = Path.Combine(outDir, "log");
            _stopDropping = CancellationTokenSource.CreateLinkedTokenSource(ct);
            var stop = _stopDropping.Token;
            _dropper = Task.Run(async () =>
            {
                while (!stop.IsCancellationRequested)
                {
                    try { await File.WriteAllTextAsync("/proc/sys/vm/drop_caches", "3", CancellationToken.None); } catch (IOException) { }
                    try { await Task.Delay(300, stop); } catch (OperationCanceledException) { }
                }
            }, CancellationToken.None);
        }

        public static async Task<HashingReader> StartAsync(OutageRig rig, TestImage img, string container, CancellationToken ct)
        {
            var outDir = rig.Work.Sub(container + "-out");
            await File.WriteAllLinesAsync(Path.Combine(outDir, "expected"), img.Sha256.Select(kv => $"{kv.Value}  {kv.Key}"), ct);
            (await rig.Containerd.CtrAsync("run", "-d", "--snapshotter", "stargz",
                "--mount", $"type=bind,src={outDir},dst=/out,options=rbind:rw", img.Estargz, container, "/bin/sh", "-c", Script))
                .EnsureSuccess($"ctr run -d {container}");
            return new HashingReader(rig, outDir, ct);
        }

        public int Passes() => File.Exists(_log) ? File.ReadAllLines(_log).Count(l => l.StartsWith("pass ", StringComparison.Ordinal)) : 0;

        /// <summary>The log's lines other than passes: failed checks, and "stopped N" once stopped.</summary>
        public string Failures() => File.Exists(_log) ? string.Join('\n', File.ReadAllLines(_log).Where(l => !l.StartsWith("pass ", StringComparison.Ordinal))) : "";

        public async Task WaitPassesAsync(int atLeast, string after)
        {
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(180);
            while (Passes() < atLeast)
            {
                Assert.True(Failures() == "", $"the reader saw errors {after}:\n{Failures()}\ndaemon log:\n{Tail(_rig.Daemon.Log)}");
                if (DateTime.UtcNow > deadline) throw new TimeoutException($"the reader made {Passes()} passes, not {atLeast}, {after}\n{Tail(_rig.Daemon.Log)}");
                await Task.Delay(200, _stopDropping.Token);
            }
        }

        /// <summary>Ends the loop after its current pass and the cache dropping; returns <see cref="Failures"/>.</summary>
        public async Task<string> StopAsync(CancellationToken ct)
        {
            File.WriteAllText(Path.Combine(_outDir, "stop"), "");
            var end = DateTime.UtcNow + TimeSpan.FromSeconds(120);
            while (!(File.Exists(_log) && File.ReadAllText(_log).Contains("stopped", StringComparison.Ordinal)) && DateTime.UtcNow < end)
                await Task.Delay(200, ct);
            await DisposeAsync();
            Assert.Contains("stopped", File.ReadAllText(_log));
            return Failures();
        }

        public async ValueTask DisposeAsync()
        {
            if (_dropper.IsCompleted) return;
            await _stopDropping.CancelAsync();
            await _dropper;
            _stopDropping.Dispose();
        }
    }

    private static int StoredFuseFds(int pid)
    {
        int n = 0;
        foreach (var fd in Directory.EnumerateFileSystemEntries($"/proc/{pid}/fd"))
        {
            try { if (File.ResolveLinkTarget(fd, false)?.FullName == "/dev/fuse") n++; }
            catch (IOException) { }
        }
        return n;
    }

    private static string Tail(string log) => log.Length > 6000 ? log[^6000..] : log;
}
