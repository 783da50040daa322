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

    [Fact]
    public async Task PythonImageOfThreeLayersRunsItsInterpreterOnRealContainerd()
    {
        Requires.Root();
        var ct = TestContext.Current.CancellationToken;
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("harness-py");
        var layers = TestImages.WritePythonLayers(work.Path, dataMegabytes: 8);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", layers);
        await TestImages.PushAsync(layout, "v1", registry.Host, "harness/python:v1");
        await using var ctd = await LocalContainerd.StartAsync();
        var src = $"{registry.Host}/harness/python:v1";
        (await ctd.CtrAsync("image", "pull", "--plain-http", src)).EnsureSuccess("ctr pull");
        var run = await ctd.CtrAsync("run", "--rm", src, "harness-py", "/usr/bin/python3", "-c",
            "import json, hashlib; print(json.dumps({'sha': hashlib.sha256(open('/data/message.txt','rb').read()).hexdigest()[:12]}))");
        run.EnsureSuccess("ctr run python3");
        var expected = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(
            await File.ReadAllBytesAsync(Path.Combine(layers[2], "data", "message.txt"), ct)))[..12];
        Assert.Equal($"{{\"sha\": \"{expected}\"}}", run.StdOut.Trim());
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
