using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>A plain gzip image (no TOC) through the same `stargz` snapshotter: ordinary snapshots, no FUSE, it runs.</summary>
public class FallbackTests
{
    [Fact]
    public async Task PlainGzipImageWorksThroughTheStargzSnapshotterWithPullAndWithRpull()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var l1 = rig.Work.Sub("plain-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("plain-l2");
        Directory.CreateDirectory(Path.Combine(l2, "etc"));
        await File.WriteAllTextAsync(Path.Combine(l2, "etc", "motd"), "plain gzip image\n", ct);
        var image = await E2eHelpers.PushPlainAsync(rig, "e2e/plain", [l1, l2]);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);

        // 1. ctr image pull: containerd downloads and applies the layers into our (ordinary) snapshots.
        (await rig.Containerd.CtrAsync("image", "pull", "--plain-http", "--snapshotter", "stargz", image)).EnsureSuccess("ctr pull --snapshotter stargz");
        Assert.Empty(rig.FuseMounts());
        Assert.Equal(manifest.Count, (await E2eHelpers.StargzSnapshotsAsync(rig.Containerd)).Count);
        Assert.Equal("plain gzip image", (await E2eHelpers.RunAsync(rig.Containerd, image, "plain-pull", "/bin/cat", "/etc/motd")).Trim());

        // 2. From nothing again, through ctr-remote rpull: each layer is tried remotely, falls back, and is applied.
        await rig.ForgetImagesAsync(image);
        await WaitNoSnapshotsAsync(rig);
        (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess("ctr-remote rpull of a plain image");
        Assert.Empty(rig.FuseMounts());
        // The layer blobs went through containerd's content store (a normal pull), not through our layers.
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.Contains(digest, content);
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd);
        Assert.Equal(manifest.Count, snapshots.Count);
        foreach (var s in snapshots)
        {
            var info = (await rig.Containerd.CtrAsync("snapshots", "--snapshotter", "stargz", "info", s)).EnsureSuccess("ctr snapshots info").StdOut;
            Assert.DoesNotContain("remote snapshot", info);
        }
        Assert.Equal("plain gzip image", (await E2eHelpers.RunAsync(rig.Containerd, image, "plain-rpull", "/bin/cat", "/etc/motd")).Trim());
        // The daemon said why it fell back, naming the layer.
        foreach (var (digest, _) in manifest)
        {
            var line = await E2eHelpers.WaitLogLineAsync(rig.Daemon, $"layer {digest} for ", "falling back to an ordinary snapshot");
            Assert.True(line != null, $"no fallback log line for {digest}:\n{rig.Daemon.Log}");
        }
        Assert.Null(rig.Daemon.ExitCode);
    }

    internal static async Task WaitNoSnapshotsAsync(E2eRig rig, string ns = "default")
    {
        // containerd's GC removes snapshots in the background after the image is gone (bounded, generous wait).
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(90);
        List<string> left;
        while ((left = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd, ns)).Count > 0 && DateTime.UtcNow < deadline)
            await Task.Delay(500, TestContext.Current.CancellationToken);
        Assert.True(left.Count == 0, "snapshots left after GC: " + string.Join(", ", left));
    }
}
