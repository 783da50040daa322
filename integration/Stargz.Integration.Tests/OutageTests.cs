using System.Diagnostics;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>The registry goes away: at the daemon's start, or under mounted layers.</summary>
public class OutageTests
{
    private static readonly Dictionary<string, int> Files = new()
    {
        ["early.bin"] = 512, ["late.bin"] = 512, ["later.bin"] = 256,
    };

    [Fact]
    public async Task DaemonStartsWithTheRegistryUnreachableServesOrdinarySnapshotsAndRecoversRemoteOnes()
    {
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("outage/start", Files, seed: 801);
        await rig.RpullAsync(img.Estargz);
        await rig.PlainPullAsync(img.Plain);
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(img.Estargz, "lazy-1", "early.bin"));
        var snapshots = await rig.CommittedSnapshotsAsync();
        Assert.Equal(4, snapshots.Count);

        Assert.Equal(0, await rig.Daemon.StopAsync());
        await rig.StopRegistryAsync();
        // RestartAsync waits (bounded) for the daemon to serve its socket: it must not refuse to start.
        await rig.Daemon.RestartAsync();
        await rig.WaitContainerdReachesDaemonAsync();
        Assert.Null(rig.Daemon.ExitCode);
        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());

        // Ordinary snapshots work with the registry away.
        Assert.Equal(img.Sha256["late.bin"], await rig.Sha256InContainerAsync(img.Plain, "plain-down", "late.bin"));

        // The remote layers are either mounted again or reported unavailable; they are not lost.
        var mounts = rig.FuseMountIds().Count;
        var unavailable = await rig.MetricAsync("stargz_snapshotter_remote_snapshots_unavailable");
        Assert.True(mounts == 2 || unavailable > 0, $"remote layers neither mounted ({mounts}) nor reported unavailable ({unavailable})");
        Assert.Equal(2, await rig.MetricAsync("stargz_snapshotter_remote_snapshots"));

        // The registry comes back on the same port with the same blobs: the lazy image runs again, without a re-pull.
        await rig.StartRegistryAsync();
        var run = await rig.RunUntilItSucceedsAsync(img.Estargz, "lazy-up", "sha256sum /data/late.bin", TimeSpan.FromSeconds(120));
        run.EnsureSuccess("the lazy image's container once the registry is back");
        Assert.Equal(img.Sha256["late.bin"], run.StdOut.Trim().Split(' ', 2)[0]);
        Assert.Equal(2, rig.FuseMountIds().Count);
        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());
    }

    [Fact]
    public async Task RegistryOutageFailsUncachedReadsWithEioWithinTheTimeoutAndReadsRecoverWithoutRemount()
    {
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("outage/reads", Files, seed: 802);
        await rig.RpullAsync(img.Estargz);
        var holder = await rig.RunDetachedAsync(img.Estargz, "holder", "/bin/sleep", "3600");
        var exec = 0;
        Task<ProcessResult> Exec(string script) =>
            rig.Containerd.CtrAsync("tasks", "exec", "--exec-id", $"e{exec++}", holder, "/bin/sh", "-c", script);

        var cached = await Exec("sha256sum /data/early.bin");
        Assert.Equal(img.Sha256["early.bin"], cached.EnsureSuccess("read while the registry is up").StdOut.Trim().Split(' ', 2)[0]);
        var mounts = rig.FuseMountIds();
        Assert.Equal(2, mounts.Count);

        await rig.StopRegistryAsync();

        // Already read: served from the cache.
        var again = (await Exec("sha256sum /data/early.bin")).EnsureSuccess("cached read with the registry down");
        Assert.Equal(img.Sha256["early.bin"], again.StdOut.Trim().Split(' ', 2)[0]);

        // Never read: fails with EIO, bounded by the fetching timeout (a generous multiple of it: no hang).
        var sw = Stopwatch.StartNew();
        var failed = await Exec("cat /data/late.bin > /dev/null");
        sw.Stop();
        Assert.NotEqual(0, failed.ExitCode);
        Assert.Contains("Input/output error", failed.StdOut + failed.StdErr);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(OutageRig.FetchingTimeoutSec * 12),
            $"the failing read took {sw.Elapsed}, fetching_timeout_sec is {OutageRig.FetchingTimeoutSec}");
        var errors = await rig.MetricAsync("stargz_layer_errors");
        Assert.True(errors > 0, "the failed fetch was not counted as a layer error");

        // The registry is back: the same read works on the same mounts.
        await rig.StartRegistryAsync();
        var late = (await Exec("sha256sum /data/late.bin")).EnsureSuccess("read after the registry came back");
        Assert.Equal(img.Sha256["late.bin"], late.StdOut.Trim().Split(' ', 2)[0]);
        var later = (await Exec("sha256sum /data/later.bin")).EnsureSuccess("another read after the registry came back");
        Assert.Equal(img.Sha256["later.bin"], later.StdOut.Trim().Split(' ', 2)[0]);
        Assert.Equal(mounts, rig.FuseMountIds());
    }
    [Fact]
    public async Task RegistryThatStopsAnsweringFailsUncachedReadsWithEioWithinTheTimeoutAndReadsRecoverWithoutRemount()
    {
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("outage/hang", Files, seed: 803);
        // The daemon reaches the registry through a proxy that can stop answering (connections accepted, no reply),
        // as a registry behind a broken network does; a stopped registry only refuses connections.
        await using var proxy = new CountingProxy(rig.RegistryHost);
        var image = img.Estargz.Replace(rig.RegistryHost, proxy.Host, StringComparison.Ordinal);
        await rig.RpullAsync(image);
        var holder = await rig.RunDetachedAsync(image, "holder", "/bin/sleep", "3600");
        var exec = 0;
        Task<ProcessResult> Exec(string script) =>
            rig.Containerd.CtrAsync("tasks", "exec", "--exec-id", $"e{exec++}", holder, "/bin/sh", "-c", script);
        Assert.Equal(img.Sha256["early.bin"], (await Exec("sha256sum /data/early.bin")).EnsureSuccess("read").StdOut.Trim().Split(' ', 2)[0]);
        var mounts = rig.FuseMountIds();
        Assert.Equal(2, mounts.Count);

        proxy.Down();
        var again = (await Exec("sha256sum /data/early.bin")).EnsureSuccess("cached read with the registry silent");
        Assert.Equal(img.Sha256["early.bin"], again.StdOut.Trim().Split(' ', 2)[0]);
        var sw = Stopwatch.StartNew();
        var failed = await Exec("cat /data/late.bin > /dev/null");
        sw.Stop();
        Assert.NotEqual(0, failed.ExitCode);
        Assert.Contains("Input/output error", failed.StdOut + failed.StdErr);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(OutageRig.FetchingTimeoutSec * 12),
            $"the failing read took {sw.Elapsed}, fetching_timeout_sec is {OutageRig.FetchingTimeoutSec}");

        proxy.Up();
        var late = (await Exec("sha256sum /data/late.bin")).EnsureSuccess("read after the registry answers again");
        Assert.Equal(img.Sha256["late.bin"], late.StdOut.Trim().Split(' ', 2)[0]);
        Assert.Equal(mounts, rig.FuseMountIds());
    }
    [Fact]
    public async Task DaemonStartsAndServesWhileTheRegistryDoesNotAnswer()
    {
        // The reference default fetching timeout: a start that waited for a silent registry would wait 300 s per layer.
        await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 300);
        var img = await rig.PushImageAsync("outage/silent", Files, seed: 804);
        await using var proxy = new CountingProxy(rig.RegistryHost);
        var lazy = img.Estargz.Replace(rig.RegistryHost, proxy.Host, StringComparison.Ordinal);
        await rig.RpullAsync(lazy);
        await rig.PlainPullAsync(img.Plain);
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(lazy, "lazy-1", "early.bin"));
        var snapshots = await rig.CommittedSnapshotsAsync();
        Assert.Equal(4, snapshots.Count);

        Assert.Equal(0, await rig.Daemon.StopAsync());
        proxy.Down();
        await rig.Daemon.RestartAsync(waitReady: false);
        // Bounded generously, and far below what waiting for the silent registry would take.
        await rig.Daemon.WaitReadyAsync(TimeSpan.FromSeconds(90));
        await rig.WaitContainerdReachesDaemonAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());
        Assert.Equal(img.Sha256["late.bin"], await rig.Sha256InContainerAsync(img.Plain, "plain-silent", "late.bin"));

        proxy.Up();
        var run = await rig.RunUntilItSucceedsAsync(lazy, "lazy-up", "sha256sum /data/late.bin", TimeSpan.FromSeconds(120));
        run.EnsureSuccess("the lazy image's container once the registry answers again");
        Assert.Equal(img.Sha256["late.bin"], run.StdOut.Trim().Split(' ', 2)[0]);
    }

    [Fact]
    public async Task AFullyFetchedLazyImageRunsAfterARestartWhileTheRegistryIsDown()
    {
        // The layers' TOCs are kept beside the chunk cache: a restart mounts them again without the registry, and a
        // layer whose every chunk is cached passes Check, so new containers start during the outage.
        await using var rig = await OutageRig.StartAsync(backgroundFetch: true);
        var img = await rig.PushImageAsync("outage/fetched", Files, seed: 805);
        await rig.RpullAsync(img.Estargz);
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(img.Estargz, "fetched-1", "early.bin"));
        Assert.Equal(2, await rig.WaitMetricAsync("stargz_layers_fully_fetched", v => v == 2, TimeSpan.FromSeconds(120)));

        Assert.Equal(0, await rig.Daemon.StopAsync());
        await rig.StopRegistryAsync();
        await rig.Daemon.RestartAsync();
        await rig.WaitContainerdReachesDaemonAsync();
        Assert.Equal(2, rig.FuseMountIds().Count);
        Assert.Equal(0, await rig.MetricAsync("stargz_snapshotter_remote_snapshots_unavailable"));
        // Every file of the lazy image reads right in a new container while the registry is down.
        var run = (await rig.RunAsync(img.Estargz, "fetched-down", "cd /data && sha256sum early.bin late.bin later.bin"))
            .EnsureSuccess("the fully fetched lazy image's container with the registry down");
        foreach (var line in run.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var parts = line.Split(' ', 2, StringSplitOptions.TrimEntries);
            Assert.Equal(img.Sha256[parts[1]], parts[0]);
        }
        Assert.Equal(3, run.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);
    }
}
