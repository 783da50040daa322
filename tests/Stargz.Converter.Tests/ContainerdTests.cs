using System.Security.Cryptography;
using Stargz.Estargz;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Converter.Tests;

/// <summary>
/// What our converter pushes, consumed by the real tools: containerd 1.6 (stock overlayfs snapshotter, runc) pulls and
/// runs it — which checks every diffID in the config against the unpacked layers — and the reference's
/// <c>ctr-remote image get-toc-digest</c> parses every blob and finds the TOC digest we annotated.
/// </summary>
public class ContainerdTests(SourceImageFixture fixture) : IClassFixture<SourceImageFixture>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    /// <summary>A user's look at the image: files, contents, links, modes, whiteouts applied.</summary>
    private const string Script =
        "cat /data/hello.txt; readlink /data/link-to-hello; stat -c '%n %a %h %s' /data/hello.txt /data/hard-hello /data/empty /data/sub/deep.txt; " +
        "sha256sum /data/big.bin /bin/busybox; ls -a /data /opaque; test -e /data/gone.txt && echo GONE-STILL-THERE; true";

    /// <summary>
    /// Runs <see cref="Script"/> in a container of <paramref name="image"/> and returns what it printed. The script writes
    /// into a file on a bind mount rather than to ctr's stdout: containerd 1.6's ctr can lose the tail of a short-lived
    /// container's stdout (seen once in CI: the output stopped after the stat lines while the run succeeded).
    /// </summary>
    private static async Task<string> RunAsync(LocalContainerd ctd, string image, string id)
    {
        (await ctd.CtrAsync("image", "pull", "--plain-http", image)).EnsureSuccess($"ctr image pull {image}");
        using var outDir = new TempDir("ctr-out-" + id);
        (await ctd.CtrAsync("run", "--rm", "--mount", $"type=bind,src={outDir.Path},dst=/out,options=rbind:rw", image, id,
            "/bin/sh", "-c", "{ " + Script + "; } > /out/stdout")).EnsureSuccess($"ctr run {image}");
        return await File.ReadAllTextAsync(Path.Combine(outDir.Path, "stdout"), Ct);
    }

    private async Task CheckAsync(LayerFormat format, string tag)
    {
        Requires.Root();
        Requires.Command("containerd");
        Requires.Command("ctr-remote");
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var dst = $"{f.Registry.Host}/out/run:{tag}";
        var result = await new ImageConverter(client).ConvertAsync(ImageReference.Parse(f.Reference), ImageReference.Parse(dst),
            new ConvertOptions { Format = format, ChunkSize = 1 << 20, Prioritized = ["bin/busybox"] }, Ct);

        await using var ctd = await LocalContainerd.StartAsync();
        var converted = await RunAsync(ctd, dst, "converted");
        var original = await RunAsync(ctd, f.Reference, "original");

        // The converted image shows exactly what the original shows.
        Assert.Equal(original, converted);
        var lines = converted.Split('\n');
        Assert.Equal(SourceImageFixture.Hello, lines[0]);
        Assert.Equal("hello.txt", lines[1]);
        Assert.Contains("/data/hello.txt 640 2 ", converted);
        Assert.Contains(System.Convert.ToHexStringLower(SHA256.HashData(f.Big)) + "  /data/big.bin", converted);
        Assert.DoesNotContain("GONE-STILL-THERE", converted);
        Assert.DoesNotContain("gone.txt", converted);
        Assert.DoesNotContain("old.txt", converted);
        Assert.Contains("new.txt", converted);
        // The image's default command (entrypoint + cmd from the rewritten config) works too.
        var dflt = (await ctd.CtrAsync("run", "--rm", dst, "default-cmd")).EnsureSuccess("ctr run with the default command");
        Assert.Equal(SourceImageFixture.Hello, dflt.StdOut.Trim());

        // The reference's parser reads every layer blob we built from containerd's content store.
        foreach (var layer in result.Manifests.Single().Layers)
        {
            string[] args = format == LayerFormat.ZstdChunked
                ? ["image", "get-toc-digest", "--zstdchunked", layer.Target.Digest]
                : ["image", "get-toc-digest", layer.Target.Digest];
            var toc = (await ctd.CtrRemoteAsync(args)).EnsureSuccess($"ctr-remote get-toc-digest {layer.Target.Digest}").StdOut.Trim();
            Assert.Equal(layer.Target.Annotation(LayerLabels.TocDigestAnnotation), toc);
        }
    }

    [Fact]
    public Task EStargz_image_converted_by_us_runs_on_containerd_and_ctr_remote_reads_every_toc()
        => CheckAsync(LayerFormat.Estargz, "esgz");

    [Fact]
    public Task Zstd_chunked_image_converted_by_us_runs_on_containerd_and_ctr_remote_reads_every_toc()
        => CheckAsync(LayerFormat.ZstdChunked, "zstd");

    [Fact]
    public async Task Python_image_of_three_layers_converted_by_us_runs_its_interpreter_on_containerd()
    {
        Requires.Root();
        Requires.Command("containerd");
        Requires.Command("ctr-remote");
        var f = await fixture.GetAsync();
        using var work = new TempDir("convert-py");
        var layers = TestImages.WritePythonLayers(work.Path, dataMegabytes: 8);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", layers);
        await TestImages.PushAsync(layout, "v1", f.Registry.Host, "src/python:v1");
        using var client = new RegistryClient();
        var dst = $"{f.Registry.Host}/out/python:esgz";
        var result = await new ImageConverter(client).ConvertAsync(ImageReference.Parse($"{f.Registry.Host}/src/python:v1"), ImageReference.Parse(dst),
            new ConvertOptions { Prioritized = ["/usr/bin/python3.11", "/usr/lib/python3.11/json/__init__.py"] }, Ct);
        Assert.Equal(3, result.Manifests.Single().Layers.Count);

        await using var ctd = await LocalContainerd.StartAsync();
        (await ctd.CtrAsync("image", "pull", "--plain-http", dst)).EnsureSuccess("ctr pull");
        var run = (await ctd.CtrAsync("run", "--rm", dst, "py", "/usr/bin/python3", "-c",
            "import json, hashlib; print(json.dumps({'sha': hashlib.sha256(open('/data/message.txt','rb').read()).hexdigest()[:12]}))"))
            .EnsureSuccess("ctr run python3");
        var expected = System.Convert.ToHexStringLower(SHA256.HashData(await File.ReadAllBytesAsync(Path.Combine(layers[2], "data", "message.txt"), Ct)))[..12];
        Assert.Equal($"{{\"sha\": \"{expected}\"}}", run.StdOut.Trim());
        foreach (var layer in result.Manifests.Single().Layers)
        {
            var toc = (await ctd.CtrRemoteAsync("image", "get-toc-digest", layer.Target.Digest)).EnsureSuccess("get-toc-digest").StdOut.Trim();
            Assert.Equal(layer.TocDigest, toc);
        }
    }

    [Fact]
    public async Task Image_converted_by_ctr_remote_is_copied_as_is_by_our_converter()
    {
        Requires.Root();
        Requires.Command("containerd");
        Requires.Command("ctr-remote");
        var f = await fixture.GetAsync();
        await using var ctd = await LocalContainerd.StartAsync();
        var byRef = $"{f.Registry.Host}/out/byref:esgz";
        await ctd.ConvertWithReferenceAsync(f.Reference, byRef);
        using var client = new RegistryClient();
        var dst = $"{f.Registry.Host}/out/byref-copy:esgz";
        var result = await new ImageConverter(client).ConvertAsync(ImageReference.Parse(byRef), ImageReference.Parse(dst), null, Ct);
        var refM = await client.ResolveAsync(ImageReference.Parse(byRef), null, Ct);
        Assert.All(result.Manifests.Single().Layers, l => Assert.Equal(LayerAction.CopiedAsIs, l.Action));
        Assert.Equal(refM.Layers.Select(l => l.Digest), result.Manifests.Single().Layers.Select(l => l.Target.Digest));
        Assert.Equal(refM.Layers.Select(l => l.Annotation(LayerLabels.TocDigestAnnotation)), result.Manifests.Single().Layers.Select(l => l.TocDigest));
        var output = await RunAsync(ctd, dst, "copied");
        Assert.StartsWith(SourceImageFixture.Hello + "\n", output);
        Assert.Equal(await RunAsync(ctd, f.Reference, "original"), output);
    }
}
