using Stargz.Cri.V1;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The kubelet path: containerd's CRI plugin with `stargz` as its snapshotter. A CRI PullImage of an eStargz image
/// passes the containerd.io/snapshot/cri.* labels, so our daemon mounts every layer lazily and containerd never
/// downloads a layer blob; the image then runs with ctr in the k8s.io namespace.
/// </summary>
public class CriTests
{
    [Fact]
    public async Task CriPullImageMountsLayersLazilyAndTheImageRuns()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync(enableCri: true);
        var l1 = rig.Work.Sub("cri-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("cri-l2");
        Directory.CreateDirectory(Path.Combine(l2, "etc"));
        await File.WriteAllTextAsync(Path.Combine(l2, "etc", "motd"), "pulled lazily through CRI\n", ct);
        var image = await rig.PushEstargzAsync("e2e/cri", [l1, l2]);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);

        using var cri = new CriClient(rig.Containerd.Socket);
        var pulled = await cri.Images.PullImageAsync(new PullImageRequest { Image = new ImageSpec { Image = image } }, cancellationToken: ct);
        Assert.StartsWith("sha256:", pulled.ImageRef);

        // Every layer is one of our FUSE mounts, and no layer blob is in containerd's content store (k8s.io).
        var mounts = rig.FuseMounts().Count;
        Assert.True(manifest.Count == mounts, $"{mounts} FUSE mounts for {manifest.Count} layers; daemon:\n{Tail(rig.Daemon.Log)}");
        var content = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "content", "ls", "-q")).EnsureSuccess("ctr -n k8s.io content ls").StdOut;
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd, "k8s.io");
        Assert.Equal(manifest.Count, snapshots.Count);
        // The labels that made it work came from CRI (not from ctr-remote).
        var info = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "snapshots", "--snapshotter", "stargz", "info", snapshots[0])).EnsureSuccess("snapshots info").StdOut;
        Assert.Contains("containerd.io/snapshot/cri.layer-digest", info);
        Assert.Contains("remote snapshot", info);

        var run = await rig.Containerd.CtrInNamespaceAsync("k8s.io", "run", "--rm", "--snapshotter", "stargz", image, "cri-lazy", "/bin/cat", "/etc/motd");
        run.EnsureSuccess("ctr -n k8s.io run of the CRI-pulled image");
        Assert.Equal("pulled lazily through CRI", run.StdOut.Trim());
    }

    private static string Tail(string log) => log.Length <= 6000 ? log : log[^6000..];
}
