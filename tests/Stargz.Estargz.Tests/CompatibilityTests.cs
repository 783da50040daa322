using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.Json;
using Stargz.TestSupport;

namespace Stargz.Estargz.Tests;

/// <summary>One registry + containerd shared by the compatibility tests, started on first use.</summary>
public sealed class ReferenceToolsFixture : IAsyncLifetime
{
    private readonly SemaphoreSlim _lock = new(1, 1);
    public LocalRegistry? Registry { get; private set; }
    public LocalContainerd? Containerd { get; private set; }
    public TempDir Work { get; } = new("estargz-compat");
    public string? TreeDir { get; private set; }

    public async Task<(LocalRegistry, LocalContainerd, string Tree)> GetAsync()
    {
        Requires.Root();
        foreach (var c in new[] { "ctr-remote", "ctr", "containerd", "docker-registry", "umoci", "skopeo", "tar" }) Requires.Command(c);
        await _lock.WaitAsync(TestContext.Current.CancellationToken);
        try
        {
            TreeDir ??= await MakeTreeAsync(Work.Sub("tree"));
            Registry ??= await LocalRegistry.StartAsync();
            Containerd ??= await LocalContainerd.StartAsync();
            return (Registry, Containerd, TreeDir);
        }
        finally { _lock.Release(); }
    }

    /// <summary>A tree with what layers hold: nested dirs, a file spanning several 4 MiB chunks, empty and small
    /// files, an executable, a setuid file, other owners, symlinks, a hardlink, long and non-ASCII names (umoci refuses .wh. files in a layer dir).</summary>
    private static async Task<string> MakeTreeAsync(string root)
    {
        var rng = new Random(42);
        void Write(string rel, byte[] data, int mode = 0x1a4)
        {
            var p = Path.Combine(root, rel);
            Directory.CreateDirectory(Path.GetDirectoryName(p)!);
            File.WriteAllBytes(p, data);
            File.SetUnixFileMode(p, (UnixFileMode)mode);
        }
        var big = new byte[9 * 1024 * 1024 + 12345];
        rng.NextBytes(big);
        Write("usr/lib/big.bin", big);
        Write("usr/bin/tool", RandomNumberGenerator.GetBytes(70_000), 0x1ed);
        Write("usr/bin/suid", "#!/bin/sh\n"u8.ToArray(), 0x9ed);
        Write("etc/empty", []);
        Write("etc/hostname", "stargz\n"u8.ToArray());
        Write("etc/" + new string('n', 130) + ".conf", "long name\n"u8.ToArray());
        Write("etc/ünïcødé.txt", "utf8 name\n"u8.ToArray(), 0x180);
        Write("var/lib/owned", "owned by 1234:5678\n"u8.ToArray());
        var text = new byte[300_000];
        for (int i = 0; i < text.Length; i++) text[i] = (byte)("the quick brown fox "[i % 20]);
        Write("usr/share/doc/text", text);
        Directory.CreateDirectory(Path.Combine(root, "empty/dir"));
        File.CreateSymbolicLink(Path.Combine(root, "usr/bin/link"), "tool");
        File.CreateSymbolicLink(Path.Combine(root, "dangling"), "/no/such/target");
        Assert.Equal(0, link(Path.Combine(root, "usr/lib/big.bin"), Path.Combine(root, "usr/lib/big.hardlink")));
        (await ProcessRunner.RunAsync("chown", ["-h", "1234:5678", Path.Combine(root, "var/lib/owned"), Path.Combine(root, "usr/bin/link")])).EnsureSuccess("chown");
        // Whole-second times: the TOC keeps seconds.
        (await ProcessRunner.RunAsync("sh", ["-c", $"find '{root}' -mindepth 1 -exec touch -h -d @1700000000 {{}} +"])).EnsureSuccess("touch");
        return root;
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int link(string oldpath, string newpath);

    public ValueTask InitializeAsync() => ValueTask.CompletedTask;

    public async ValueTask DisposeAsync()
    {
        if (Containerd != null) await Containerd.DisposeAsync();
        if (Registry != null) await Registry.DisposeAsync();
        Work.Dispose();
    }
}

/// <summary>
/// Compatibility both ways with the reference: blobs converted by ctr-remote (eStargz and zstd:chunked) are read,
/// verified and extracted by us to exactly the original tree; blobs we build are parsed by ctr-remote get-toc-digest.
/// </summary>
public class CompatibilityTests(ReferenceToolsFixture fx) : IClassFixture<ReferenceToolsFixture>
{
    private static readonly HttpClient Http = new();

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task ReferenceConvertedLayer_IsReadVerifiedAndExtractedToTheOriginalTree(bool zstdChunked)
    {
        var ct = TestContext.Current.CancellationToken;
        var (registry, ctd, tree) = await fx.GetAsync();
        var tag = zstdChunked ? "zstd" : "gzip";
        var layout = Path.Combine(fx.Work.Path, "oci-" + tag);
        await TestImages.BuildAsync(layout, "v1", [tree]);
        await TestImages.PushAsync(layout, "v1", registry.Host, $"compat/{tag}:v1");
        var dst = $"{registry.Host}/compat/{tag}:esgz";
        await ctd.ConvertWithReferenceAsync($"{registry.Host}/compat/{tag}:v1", dst, zstdChunked);

        var (layer, diffId) = await FirstLayerAsync(registry.Host, $"compat/{tag}", "esgz", ct);
        var blob = await Http.GetByteArrayAsync($"http://{registry.Host}/v2/compat/{tag}/blobs/{layer.GetProperty("digest").GetString()}", ct);
        Assert.Equal(layer.GetProperty("digest").GetString(), TreeModel.Sha256(blob));
        var tocDigest = layer.GetProperty("annotations").GetProperty(LayerLabels.TocDigestAnnotation).GetString();
        Assert.NotNull(tocDigest);

        var reader = await EstargzReader.OpenAsync(new ByteArrayBlobSource(blob), tocDigest, null, ct);
        Assert.Equal(zstdChunked ? BlobCompression.Zstd : BlobCompression.Gzip, reader.Compression);
        Assert.True(reader.Lookup("usr/lib/big.bin")!.Chunks.Count >= 3);
        await reader.VerifyAllAsync(ct);
        Assert.Equal(diffId, await reader.ComputeDiffIdAsync(ct));

        // Random access to the middle of the big file, against the original.
        var original = await File.ReadAllBytesAsync(Path.Combine(tree, "usr/lib/big.bin"), ct);
        var buf = new byte[4096];
        Assert.Equal(4096, await reader.ReadFileAsync(reader.Lookup("usr/lib/big.bin")!, 5_000_000, buf, ct));
        Assert.True(original.AsSpan(5_000_000, 4096).SequenceEqual(buf));

        var outDir = Path.Combine(fx.Work.Path, "extract-" + tag);
        await EstargzExtractor.ExtractAsync(reader, outDir, null, ct);
        var want = await DescribeTreeAsync(tree);
        Assert.Contains("usr/bin/suid f 4755 0:0 1700000000 1 sha256:", want);
        Assert.Contains("usr/lib/big.hardlink f 644 0:0 1700000000 2 sha256:", want);
        Assert.Contains("var/lib/owned f 644 1234:5678", want);
        Assert.Contains("usr/bin/link l 777 1234:5678 1700000000 1 tool", want);
        Assert.Equal(want, await DescribeTreeAsync(outDir, ignoreLandmarks: true));
    }

    [Theory]
    [InlineData(BlobCompression.Gzip)]
    [InlineData(BlobCompression.Zstd)]
    public async Task OurLayer_IsParsedByTheReference_GetTocDigestAndDumpToc(BlobCompression compression)
    {
        var ct = TestContext.Current.CancellationToken;
        var (_, ctd, tree) = await fx.GetAsync();
        var tar = Path.Combine(fx.Work.Path, $"ours-{compression}.tar");
        (await ProcessRunner.RunAsync("tar", ["--numeric-owner", "-C", tree, "-cf", tar, "."])).EnsureSuccess("tar");
        var blobPath = Path.Combine(fx.Work.Path, $"ours-{compression}.blob");
        BuildResult r;
        await using (var input = File.OpenRead(tar))
        await using (var output = File.Create(blobPath))
            r = await EstargzBuilder.BuildAsync(input, output, new BuildOptions { Compression = compression, Prioritized = ["usr/bin/tool"] }, ct);
        var digest = TreeModel.Sha256(await File.ReadAllBytesAsync(blobPath, ct));

        (await ProcessRunner.RunAsync("sh", ["-c", $"ctr -a '{ctd.Socket}' -n {ctd.Namespace} content ingest --expected-digest {digest} ours-{compression} < '{blobPath}'"]))
            .EnsureSuccess("ctr content ingest");
        var flags = compression == BlobCompression.Zstd ? new[] { "--zstdchunked" } : [];
        var got = (await ctd.CtrRemoteAsync(["image", "get-toc-digest", .. flags, digest])).EnsureSuccess("get-toc-digest").StdOut.Trim();
        Assert.Equal(r.TocDigest, got);

        var dumped = (await ctd.CtrRemoteAsync(["image", "get-toc-digest", "--dump-toc", .. flags, digest])).EnsureSuccess("get-toc-digest --dump-toc").StdOut;
        var theirs = Toc.Parse(System.Text.Encoding.UTF8.GetBytes(dumped));
        Assert.Equal(r.Toc.Version, theirs.Version);
        Assert.Equal(r.Toc.Entries.Count, theirs.Entries.Count);
        for (int i = 0; i < theirs.Entries.Count; i++)
        {
            var (a, b) = (r.Toc.Entries[i], theirs.Entries[i]);
            Assert.Equal((a.Name, a.Type, a.Size, a.Offset, a.ChunkOffset, a.ChunkSize, a.ChunkDigest, a.Digest, a.Mode, a.Uid, a.Gid, a.LinkName, a.ModTime),
                (b.Name, b.Type, b.Size, b.Offset, b.ChunkOffset, b.ChunkSize, b.ChunkDigest, b.Digest, b.Mode, b.Uid, b.Gid, b.LinkName, b.ModTime));
        }
        Assert.Contains(theirs.Entries, e => e.Name == LayerLabels.PrefetchLandmark);
        // And our own reader agrees with the tree.
        using var src = new FileBlobSource(blobPath);
        var reader = await EstargzReader.OpenAsync(src, got, null, ct);
        await reader.VerifyAllAsync(ct);
        var outDir = Path.Combine(fx.Work.Path, $"ours-extract-{compression}");
        await EstargzExtractor.ExtractAsync(reader, outDir, null, ct);
        Assert.Equal(await DescribeTreeAsync(tree), await DescribeTreeAsync(outDir, ignoreLandmarks: true));
    }

    [Theory]
    [InlineData(BlobCompression.Gzip)]
    [InlineData(BlobCompression.Zstd)]
    public async Task OurLayer_InAnImage_IsPulledUnpackedAndRunByContainerd(BlobCompression compression)
    {
        var ct = TestContext.Current.CancellationToken;
        var (registry, ctd, _) = await fx.GetAsync();
        Requires.Command("runc");
        var rootfs = fx.Work.Sub($"run-rootfs-{compression}");
        TestImages.WriteBusybox(rootfs);
        Directory.CreateDirectory(Path.Combine(rootfs, "data"));
        await File.WriteAllTextAsync(Path.Combine(rootfs, "data/hello.txt"), $"hello from our {compression} layer\n", ct);
        var tar = Path.Combine(fx.Work.Path, $"run-{compression}.tar");
        (await ProcessRunner.RunAsync("tar", ["--numeric-owner", "-C", rootfs, "-cf", tar, "."])).EnsureSuccess("tar");

        // An OCI layout holding one image whose only layer is our blob.
        var layout = fx.Work.Sub($"run-layout-{compression}");
        var blobs = Directory.CreateDirectory(Path.Combine(layout, "blobs", "sha256")).FullName;
        var tmpBlob = Path.Combine(layout, "layer.tmp");
        BuildResult r;
        await using (var input = File.OpenRead(tar))
        await using (var output = File.Create(tmpBlob))
            r = await EstargzBuilder.BuildAsync(input, output, new BuildOptions { Compression = compression, Prioritized = ["bin/cat", "data/hello.txt"] }, ct);
        var layerDigest = TreeModel.Sha256(await File.ReadAllBytesAsync(tmpBlob, ct));
        File.Move(tmpBlob, Path.Combine(blobs, layerDigest[7..]));
        string Put(string json)
        {
            var bytes = System.Text.Encoding.UTF8.GetBytes(json);
            var d = TreeModel.Sha256(bytes);
            File.WriteAllBytes(Path.Combine(blobs, d[7..]), bytes);
            return $"\"digest\":\"{d}\",\"size\":{bytes.Length}";
        }
        var config = Put($$$"""{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["/bin/cat","/data/hello.txt"]},"rootfs":{"type":"layers","diff_ids":["{{{r.DiffId}}}"]}}""");
        var mediaType = compression == BlobCompression.Gzip ? "application/vnd.oci.image.layer.v1.tar+gzip" : "application/vnd.oci.image.layer.v1.tar+zstd";
        var manifest = Put($$$"""
            {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
             "config":{"mediaType":"application/vnd.oci.image.config.v1+json",{{{config}}}},
             "layers":[{"mediaType":"{{{mediaType}}}","digest":"{{{layerDigest}}}","size":{{{r.Size}}},
               "annotations":{"{{{LayerLabels.TocDigestAnnotation}}}":"{{{r.TocDigest}}}","{{{LayerLabels.UncompressedSizeAnnotation}}}":"{{{r.UncompressedSize}}}"}}]}
            """);
        await File.WriteAllTextAsync(Path.Combine(layout, "oci-layout"), """{"imageLayoutVersion":"1.0.0"}""", ct);
        await File.WriteAllTextAsync(Path.Combine(layout, "index.json"), $$$"""
            {"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",{{{manifest}}},"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}
            """, ct);
        var name = $"ours/run-{compression.ToString().ToLowerInvariant()}:v1";
        await TestImages.PushAsync(layout, "v1", registry.Host, name);

        // containerd pulls it, checks the diffID while unpacking with its stock snapshotter, and runc runs from it.
        var image = $"{registry.Host}/{name}";
        (await ctd.CtrAsync("image", "pull", "--plain-http", image)).EnsureSuccess("ctr pull");
        var run = (await ctd.CtrAsync("run", "--rm", image, $"ours-{compression}", "/bin/cat", "/data/hello.txt")).EnsureSuccess("ctr run");
        Assert.Equal($"hello from our {compression} layer", run.StdOut.Trim());
        var tocOfPulled = (await ctd.CtrRemoteAsync(["image", "get-toc-digest", .. (compression == BlobCompression.Zstd ? new[] { "--zstdchunked" } : []), layerDigest])).EnsureSuccess("get-toc-digest");
        Assert.Equal(r.TocDigest, tocOfPulled.StdOut.Trim());
    }

    private static async Task<(JsonElement Layer, string DiffId)> FirstLayerAsync(string host, string repo, string tag, CancellationToken ct)
    {
        var manifest = await GetJsonAsync($"http://{host}/v2/{repo}/manifests/{tag}", ct);
        if (manifest.TryGetProperty("manifests", out var list))
            manifest = await GetJsonAsync($"http://{host}/v2/{repo}/manifests/{list[0].GetProperty("digest").GetString()}", ct);
        var config = await GetJsonAsync($"http://{host}/v2/{repo}/blobs/{manifest.GetProperty("config").GetProperty("digest").GetString()}", ct);
        return (manifest.GetProperty("layers")[0], config.GetProperty("rootfs").GetProperty("diff_ids")[0].GetString()!);
    }

    private static async Task<JsonElement> GetJsonAsync(string url, CancellationToken ct)
    {
        using var req = new HttpRequestMessage(HttpMethod.Get, url);
        foreach (var t in new[] { "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                     "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json" })
            req.Headers.Accept.Add(new MediaTypeWithQualityHeaderValue(t));
        using var resp = await Http.SendAsync(req, ct);
        resp.EnsureSuccessStatusCode();
        return JsonDocument.Parse(await resp.Content.ReadAsStringAsync(ct)).RootElement.Clone();
    }

    /// <summary>One line per entry: path, type, mode, owner, mtime, link count, size and sha256 (files), target (symlinks).</summary>
    public static async Task<string> DescribeTreeAsync(string dir, bool ignoreLandmarks = false)
    {
        var res = (await ProcessRunner.RunAsync("find", [dir, "-mindepth", "1", "-printf", "%P\t%y\t%m\t%U:%G\t%T@\t%n\t%l\n"])).EnsureSuccess("find");
        var lines = new List<string>();
        foreach (var line in res.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            var f = line.Split('\t');
            if (ignoreLandmarks && f[0] is LayerLabels.PrefetchLandmark or LayerLabels.NoPrefetchLandmark) continue;
            var mtime = f[4].Split('.')[0];
            var extra = f[1] == "f" ? TreeModel.Sha256(await File.ReadAllBytesAsync(Path.Combine(dir, f[0]))) : f[6];
            var nlink = f[1] == "d" ? "" : f[5];
            lines.Add($"{f[0]} {f[1]} {f[2]} {f[3]} {(f[1] == "d" ? "" : mtime)} {nlink} {extra}");
        }
        lines.Sort(StringComparer.Ordinal);
        return string.Join("\n", lines);
    }
}
