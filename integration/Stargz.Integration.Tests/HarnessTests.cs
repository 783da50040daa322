using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The harness itself on real parts: an image built from local files, pushed to a real registry, converted by the
/// reference ctr-remote, and run by a real containerd + runc with its stock overlayfs snapshotter. Everything the
/// lazy-pull tests compare against rests on this.
/// </summary>
public class HarnessTests
{
    [Fact]
    public async Task BusyboxImageBuiltFromLocalFilesRunsOnRealContainerd()
    {
        Requires.Root();
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("harness");
        var rootfs = work.Sub("layer1");
        TestImages.WriteBusybox(rootfs);
        var layer2 = work.Sub("layer2");
        Directory.CreateDirectory(Path.Combine(layer2, "data"));
        await File.WriteAllTextAsync(Path.Combine(layer2, "data", "hello.txt"), "hello from layer 2\n", TestContext.Current.CancellationToken);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [rootfs, layer2], entrypoint: ["/bin/cat"], cmd: ["/data/hello.txt"]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "harness/busybox:v1");

        await using var ctd = await LocalContainerd.StartAsync();
        var src = $"{registry.Host}/harness/busybox:v1";
        var dst = $"{registry.Host}/harness/busybox:esgz";
        await ctd.ConvertWithReferenceAsync(src, dst);

        var run = await ctd.CtrAsync("run", "--rm", src, "harness-run", "/bin/cat", "/data/hello.txt");
        run.EnsureSuccess("ctr run");
        Assert.Equal("hello from layer 2", run.StdOut.Trim());

        // The converted image's layers carry the TOC digest annotation the snapshotter relies on.
        var manifest = await ctd.CtrAsync("content", "get", await ManifestDigest(ctd, dst));
        Assert.Contains("containerd.io/snapshot/stargz/toc.digest", manifest.StdOut);
    }

    private static async Task<string> ManifestDigest(LocalContainerd ctd, string image)
    {
        var ls = (await ctd.CtrAsync("images", "ls")).EnsureSuccess("ctr images ls").StdOut;
        foreach (var line in ls.Split('\n'))
        {
            var cols = line.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (cols.Length > 2 && cols[0] == image) return cols[2];
        }
        throw new InvalidOperationException($"image {image} not found in:\n{ls}");
    }
}
