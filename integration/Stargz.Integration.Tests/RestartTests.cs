using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>Our daemon killed or stopped under containerd, then started again on the same root and socket.</summary>
public class RestartTests
{
    private static readonly Dictionary<string, int> Files = new()
    {
        ["early.bin"] = 512, ["late.bin"] = 512, ["spare.bin"] = 256,
    };

    [Fact]
    public async Task SigkillWhileAContainerReadsThenRestartKeepsSnapshotsAndCacheAndANewContainerRuns()
    {
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("restart/kill", Files, seed: 701);
        await rig.RpullAsync(img.Estargz);
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(img.Estargz, "first", "early.bin"));

        // A container that keeps reading the image's files while the daemon dies under it.
        var reader = await rig.RunDetachedAsync(img.Estargz, "reader",
            "/bin/sh", "-c", "while true; do cat /data/early.bin /bin/busybox > /dev/null; done");
        var tasks = (await rig.Containerd.CtrAsync("tasks", "ls")).EnsureSuccess("ctr tasks ls").StdOut;
        Assert.Contains(reader, tasks);
        Assert.Contains("RUNNING", tasks);

        var snapshots = await rig.CommittedSnapshotsAsync();
        Assert.Equal(2, snapshots.Count);
        var cache = rig.CacheFiles();
        Assert.NotEmpty(cache);
        Assert.Equal(2, rig.FuseMountIds().Count);

        await rig.Daemon.KillAsync();
        await rig.Daemon.RestartAsync();
        await rig.WaitContainerdReachesDaemonAsync();

        // Metadata: the same committed snapshots; the remote ones are FUSE mounts again (new mounts, the old ones died).
        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());
        var mounted = await rig.WaitMetricAsync("stargz_layers_mounted", v => v >= 2, TimeSpan.FromSeconds(60));
        Assert.Equal(2, mounted);
        Assert.Equal(2, rig.FuseMountIds().Count);

        // Cache: every chunk file that was on disk before the kill is still there, whole.
        var after = rig.CacheFiles();
        foreach (var (file, size) in cache)
        {
            Assert.True(after.TryGetValue(file, out var s), $"cache file {file} lost over the restart");
            Assert.Equal(size, s);
        }

        // A new container reads the file read before the kill: right bytes, nothing fetched from the registry.
        var fetchedBefore = await rig.MetricAsync("stargz_layer_fetched_bytes");
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(img.Estargz, "after-early", "early.bin"));
        Assert.Equal(fetchedBefore, await rig.MetricAsync("stargz_layer_fetched_bytes"));
        Assert.True(await rig.MetricAsync("stargz_layer_cache_hits") > 0, "the cached file was not served from the cache");

        // A file never read before comes from the registry through the restored layers.
        Assert.Equal(img.Sha256["late.bin"], await rig.Sha256InContainerAsync(img.Estargz, "after-late", "late.bin"));
        Assert.True(await rig.MetricAsync("stargz_layer_fetched_bytes") > fetchedBefore, "late.bin was not fetched");

        // The container that was reading during the kill can be torn down through the restarted daemon.
        await rig.Containerd.CtrAsync("tasks", "kill", "-s", "SIGKILL", reader);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        ProcessResult rm;
        while ((rm = await rig.Containerd.CtrAsync("tasks", "rm", "-f", reader)).ExitCode != 0 && DateTime.UtcNow < deadline)
            await Task.Delay(500, TestContext.Current.CancellationToken);
        (await rig.Containerd.CtrAsync("containers", "rm", reader)).EnsureSuccess("ctr containers rm reader");
        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());
    }

    [Fact]
    public async Task GracefulStopAndStartKeepsLazyAndPlainImagesRunnableWithoutRepull()
    {
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("restart/term", Files, seed: 702);
        await rig.RpullAsync(img.Estargz);
        await rig.PlainPullAsync(img.Plain);
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(img.Estargz, "lazy-1", "early.bin"));
        Assert.Equal(img.Sha256["early.bin"], await rig.Sha256InContainerAsync(img.Plain, "plain-1", "early.bin"));

        // 2 remote layers (eStargz) + 2 ordinary ones (the plain image's layers unpacked into our snapshots).
        var snapshots = await rig.CommittedSnapshotsAsync();
        Assert.Equal(4, snapshots.Count);
        Assert.Equal(2, rig.FuseMountIds().Count);

        // Drop the plain image's layer blobs from containerd's content store: if its snapshots were lost, `ctr run`
        // would have to unpack them again and could not.
        var plainLayers = await PlainLayerDigestsAsync(rig, img.Plain);
        Assert.Equal(2, plainLayers.Count);
        foreach (var d in plainLayers) (await rig.Containerd.CtrAsync("content", "rm", d)).EnsureSuccess($"ctr content rm {d}");
        var content = (await rig.Containerd.CtrAsync("content", "ls", "-q")).EnsureSuccess("ctr content ls").StdOut;
        foreach (var d in plainLayers) Assert.DoesNotContain(d, content);

        Assert.Equal(0, await rig.Daemon.StopAsync());
        Assert.Empty(rig.FuseMountIds());
        await rig.Daemon.RestartAsync();
        await rig.WaitContainerdReachesDaemonAsync();

        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());
        Assert.Equal(img.Sha256["late.bin"], await rig.Sha256InContainerAsync(img.Estargz, "lazy-2", "late.bin"));
        Assert.Equal(img.Sha256["late.bin"], await rig.Sha256InContainerAsync(img.Plain, "plain-2", "late.bin"));
        Assert.Equal(2, rig.FuseMountIds().Count);
        Assert.Equal(snapshots, await rig.CommittedSnapshotsAsync());
    }

    /// <summary>Layer digests of the plain image as containerd stored its manifest.</summary>
    private static async Task<List<string>> PlainLayerDigestsAsync(OutageRig rig, string image)
    {
        var ls = (await rig.Containerd.CtrAsync("images", "ls")).EnsureSuccess("ctr images ls").StdOut;
        var line = ls.Split('\n').First(l => l.StartsWith(image + " ", StringComparison.Ordinal));
        var manifestDigest = line.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries)[2];
        var json = (await rig.Containerd.CtrAsync("content", "get", manifestDigest)).EnsureSuccess("ctr content get").StdOut;
        using var doc = System.Text.Json.JsonDocument.Parse(json);
        return doc.RootElement.GetProperty("layers").EnumerateArray().Select(l => l.GetProperty("digest").GetString()!).ToList();
    }
}
