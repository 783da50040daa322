using Stargz.Cri.V1;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The CRI client against containerd's real CRI plugin with its stock overlayfs snapshotter: the kubelet path the
/// stargz CRI tests build on (image pulled through CRI, then run with ctr in the k8s.io namespace).
/// </summary>
public class CriBaselineTests
{
    [Fact]
    public async Task PullImageThroughCriThenRunItWithCtr()
    {
        Requires.Root();
        var ct = TestContext.Current.CancellationToken;
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("cri");
        var rootfs = work.Sub("l1");
        TestImages.WriteBusybox(rootfs);
        await File.WriteAllTextAsync(Path.Combine(rootfs, "etc", "motd"), "pulled through CRI\n", ct);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [rootfs]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "cri/busybox:v1");

        await using var ctd = await LocalContainerd.StartAsync(enableCri: true, criSnapshotter: "overlayfs");
        using var cri = new CriClient(ctd.Socket);
        var version = await cri.Runtime.VersionAsync(new VersionRequest { Version = "v1" }, cancellationToken: ct);
        Assert.Equal("containerd", version.RuntimeName);

        var image = $"{registry.Host}/cri/busybox:v1";
        var pulled = await cri.Images.PullImageAsync(new PullImageRequest { Image = new ImageSpec { Image = image } }, cancellationToken: ct);
        Assert.StartsWith("sha256:", pulled.ImageRef);
        var status = await cri.Images.ImageStatusAsync(new ImageStatusRequest { Image = new ImageSpec { Image = image } }, cancellationToken: ct);
        Assert.Contains(image, status.Image.RepoTags);

        var run = await ctd.CtrInNamespaceAsync("k8s.io", "run", "--rm", "--snapshotter", "overlayfs", image, "cri-baseline", "/bin/cat", "/etc/motd");
        run.EnsureSuccess("ctr run of the CRI-pulled image");
        Assert.Equal("pulled through CRI", run.StdOut.Trim());
    }
}
