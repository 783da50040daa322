using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Removing a lazily pulled image and letting containerd's GC run (it removes snapshots through the proxy plugin)
/// removes our snapshots, their dirs and our FUSE mounts. The chunk cache (root/stargz/cache) is kept by design: it is
/// keyed by chunk digest and shared across layers and images (the reference instead drops a layer's cache dir when
/// the layer leaves its resolver cache).
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

        (await rig.Containerd.CtrAsync("images", "rm", "--sync", image)).EnsureSuccess("ctr images rm --sync");
        (await rig.Containerd.CtrAsync("content", "prune", "references")).EnsureSuccess("ctr content prune references");
        await FallbackTests.WaitNoSnapshotsAsync(rig);

        // Our side: no snapshot dirs, no FUSE mounts, no layers held.
        Assert.Empty(rig.FuseMounts());
        Assert.Empty(Directory.EnumerateDirectories(snapshotsDir));
        Assert.Equal(0, await rig.MetricAsync("stargz_layers_mounted"));
        Assert.Empty(await rig.ContentDigestsAsync());
        Assert.Null(rig.Daemon.ExitCode);

        // Kept by design (see the class comment): say what is left so a reader of the test output knows.
        var cache = Path.Combine(rig.Daemon.Root, "stargz", "cache");
        var kept = Directory.Exists(cache) ? Directory.EnumerateFiles(cache, "*", SearchOption.AllDirectories).Count() : 0;
        TestContext.Current.TestOutputHelper?.WriteLine($"chunk cache files kept after GC: {kept}");
    }
}
