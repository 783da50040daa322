using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Removing a lazily pulled image and letting containerd's GC run (it removes snapshots through the proxy plugin)
/// removes our snapshots, their dirs and our FUSE mounts, and frees their chunk cache (root/stargz/cache): a removed
/// snapshot releases its layer, whose chunks no other mounted layer uses are deleted (the reference drops a layer's
/// cache when the layer is released). A restart (RestartTests) keeps the cache.
/// </summary>
public class CleanupTests
{
    [Fact]
    public async Task RemovingTheImageAndGcRemovesOurSnapshotsDirsAndMounts()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var l1 = rig.Work.Sub("gc-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("gc-l2");
        Directory.CreateDirectory(Path.Combine(l2, "etc"));
        await File.WriteAllTextAsync(Path.Combine(l2, "etc", "motd"), "collect me\n", ct);
        var image = await rig.PushEstargzAsync("e2e/gc", [l1, l2]);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);

        (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess("rpull");
        Assert.Equal("collect me", (await E2eHelpers.RunAsync(rig.Containerd, image, "gc-run", "/bin/cat", "/etc/motd")).Trim());
        Assert.Equal(manifest.Count, rig.FuseMounts().Count);
        Assert.Equal(manifest.Count, (await E2eHelpers.StargzSnapshotsAsync(rig.Containerd)).Count);
        var snapshotsDir = Path.Combine(rig.Daemon.Root, "snapshots");
        Assert.NotEmpty(Directory.EnumerateDirectories(snapshotsDir));
        // The run read chunks, so the cache holds some (a read is answered before its chunk is written: wait for it).
        var cacheChunks = Path.Combine(rig.Daemon.Root, "stargz", "cache", "chunks");
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (CountFiles(cacheChunks) == 0 && DateTime.UtcNow < deadline) await Task.Delay(100, ct);
        Assert.True(CountFiles(cacheChunks) > 0, $"no chunk file in {cacheChunks} after running the image");

        (await rig.Containerd.CtrAsync("images", "rm", "--sync", image)).EnsureSuccess("ctr images rm --sync");
        (await rig.Containerd.CtrAsync("content", "prune", "references")).EnsureSuccess("ctr content prune references");
        await FallbackTests.WaitNoSnapshotsAsync(rig);

        // Our side: no snapshot dirs, no FUSE mounts, no layers held.
        Assert.Empty(rig.FuseMounts());
        Assert.Empty(Directory.EnumerateDirectories(snapshotsDir));
        Assert.Equal(0, await rig.MetricAsync("stargz_layers_mounted"));
        Assert.Empty(await rig.ContentDigestsAsync());
        Assert.Null(rig.Daemon.ExitCode);

        // Say what is left so a reader of the test output knows.
        var cache = Path.Combine(rig.Daemon.Root, "stargz", "cache");
        var kept = Directory.Exists(cache) ? Directory.EnumerateFiles(cache, "*", SearchOption.AllDirectories).Count() : 0;
        TestContext.Current.TestOutputHelper?.WriteLine($"chunk cache files kept after GC: {kept}");
        // The layers were released with their snapshots: no chunk file (nor temp file) is left in the cache.
        Assert.Equal(0, kept);
        Assert.Equal(0, CountFiles(cacheChunks));
    }

    private static int CountFiles(string dir) =>
        Directory.Exists(dir) ? Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories).Count() : 0;
}
