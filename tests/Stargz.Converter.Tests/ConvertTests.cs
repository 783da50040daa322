using System.Text;
using System.Text.Json;
using Stargz.Estargz;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Converter.Tests;

/// <summary>Our converter against a real registry: what it pushes, read back and checked layer by layer.</summary>
public class ConvertTests(SourceImageFixture fixture) : IClassFixture<SourceImageFixture>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static (JsonElement Manifest, JsonElement Config) Parse(ReadOnlyMemory<byte> manifest, byte[] config)
        => (JsonDocument.Parse(manifest).RootElement.Clone(), JsonDocument.Parse(config).RootElement.Clone());

    [Fact]
    public async Task Every_converted_layer_is_eStargz_with_the_original_files_and_a_true_diffid()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var dst = ImageReference.Parse($"{f.Registry.Host}/out/esgz:layers");
        var result = await new ImageConverter(client).ConvertAsync(src, dst,
            new ConvertOptions { ChunkSize = 1 << 20, Prioritized = ["data/hello.txt"] }, Ct);

        var srcM = await client.ResolveAsync(src, null, Ct);
        var dstM = await client.ResolveAsync(dst, null, Ct);
        Assert.Equal(result.Digest, dstM.Digest);
        Assert.Equal(MediaTypes.OciManifest, dstM.MediaType);
        Assert.Equal(MediaTypes.OciConfig, dstM.Config.MediaType);
        Assert.Equal(SourceImageFixture.LayerCount, dstM.Layers.Count);
        var (_, dstCfg) = Parse(dstM.Raw, await client.FetchBlobBytesAsync(dst, dstM.Config.Digest, ct: Ct));
        var (_, srcCfg) = Parse(srcM.Raw, await client.FetchBlobBytesAsync(src, srcM.Config.Digest, ct: Ct));
        var diffIds = dstCfg.GetProperty("rootfs").GetProperty("diff_ids").EnumerateArray().Select(e => e.GetString()).ToList();
        // The rest of the config is kept: entrypoint, cmd, env.
        Assert.Equal(srcCfg.GetProperty("config").GetRawText(), dstCfg.GetProperty("config").GetRawText());

        for (var i = 0; i < SourceImageFixture.LayerCount; i++)
        {
            var l = dstM.Layers[i];
            Assert.Equal("application/vnd.oci.image.layer.v1.tar+gzip", l.MediaType);
            Assert.Equal(LayerAction.Converted, result.Manifests[0].Layers[i].Action);
            var blob = await LayerContent.DownloadAsync(client, dst, l.Digest);
            Assert.Equal(l.Size, blob.Length);

            // The reader finds the footer and TOC, the TOC digest is the annotation, every chunk verifies.
            var reader = await EstargzReader.OpenAsync(new ByteArrayBlobSource(blob), l.Annotation(LayerLabels.TocDigestAnnotation), ct: Ct);
            await reader.VerifyAllAsync(Ct);

            // The blob is a plain tar.gz whose uncompressed stream hashes to the config's diffID and has the annotated size.
            var tar = LayerContent.Decompress(blob);
            Assert.Equal(diffIds[i], LayerContent.Sha256(tar));
            Assert.Equal(diffIds[i], await reader.ComputeDiffIdAsync(Ct));
            Assert.Equal(tar.Length.ToString(System.Globalization.CultureInfo.InvariantCulture), l.Annotation(LayerLabels.UncompressedSizeAnnotation));

            // Same files (names, types, modes, owners, links, sizes, contents, mtimes) as the original layer.
            var original = LayerContent.Decompress(await LayerContent.DownloadAsync(client, src, srcM.Layers[i].Digest));
            Assert.NotEqual(LayerContent.Sha256(original), diffIds[i]); // reordered tar with a TOC: a new diffID
            Assert.Equal(LayerContent.Entries(original, false), LayerContent.Entries(tar, true));
        }

        // Layer 2: the prioritized file comes first, followed by the prefetch landmark; big.bin is in 1 MiB chunks.
        var data = await EstargzReader.OpenAsync(new ByteArrayBlobSource(await LayerContent.DownloadAsync(client, dst, dstM.Layers[1].Digest)), ct: Ct);
        Assert.NotNull(data.PrefetchLandmarkOffset);
        Assert.True(data.Lookup("data/hello.txt")!.Chunks[0].BlobOffset < data.PrefetchLandmarkOffset);
        var big = data.Lookup("data/big.bin")!;
        Assert.Equal(4, big.Chunks.Count);
        var read = new byte[f.Big.Length];
        Assert.Equal(read.Length, await data.ReadFileAsync(big, 0, read, Ct));
        Assert.Equal(f.Big, read);
        // Layers without the prioritized file say "no prefetch".
        var l1 = await EstargzReader.OpenAsync(new ByteArrayBlobSource(await LayerContent.DownloadAsync(client, dst, dstM.Layers[0].Digest)), ct: Ct);
        Assert.True(l1.HasNoPrefetchLandmark);
        // Whiteouts of layers 3 and 4 are kept as they are stored.
        var l3 = await EstargzReader.OpenAsync(new ByteArrayBlobSource(await LayerContent.DownloadAsync(client, dst, dstM.Layers[2].Digest)), ct: Ct);
        Assert.True(l3.Lookup("data/.wh.gone.txt")!.IsWhiteout);
        var l4 = await EstargzReader.OpenAsync(new ByteArrayBlobSource(await LayerContent.DownloadAsync(client, dst, dstM.Layers[3].Digest)), ct: Ct);
        Assert.True(l4.Lookup("opaque/.wh..wh..opq")!.IsOpaqueMarker);
        Assert.NotNull(l4.Lookup("opaque/new.txt"));
    }

    [Fact]
    public async Task Zstd_chunked_layers_carry_the_zstd_annotations_and_verify()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var dst = ImageReference.Parse($"{f.Registry.Host}/out/zstd:layers");
        var result = await new ImageConverter(client).ConvertAsync(src, dst, new ConvertOptions { Format = LayerFormat.ZstdChunked }, Ct);
        var m = await client.ResolveAsync(dst, null, Ct);
        var cfg = JsonDocument.Parse(await client.FetchBlobBytesAsync(dst, m.Config.Digest, ct: Ct)).RootElement;
        var diffIds = cfg.GetProperty("rootfs").GetProperty("diff_ids").EnumerateArray().Select(e => e.GetString()).ToList();
        for (var i = 0; i < m.Layers.Count; i++)
        {
            var l = m.Layers[i];
            Assert.Equal("application/vnd.oci.image.layer.v1.tar+zstd", l.MediaType);
            Assert.NotNull(l.Annotation(LayerLabels.ZstdManifestChecksumAnnotation));
            Assert.NotNull(l.Annotation(LayerLabels.ZstdManifestPositionAnnotation));
            var blob = await LayerContent.DownloadAsync(client, dst, l.Digest);
            var reader = await EstargzReader.OpenAsync(new ByteArrayBlobSource(blob), l.Annotation(LayerLabels.TocDigestAnnotation), ct: Ct);
            Assert.Equal(BlobCompression.Zstd, reader.Compression);
            await reader.VerifyAllAsync(Ct);
            var tar = LayerContent.Decompress(blob);
            Assert.Equal(diffIds[i], LayerContent.Sha256(tar));
            Assert.Equal(result.Manifests[0].Layers[i].DiffId, diffIds[i]);
            Assert.Equal(tar.Length.ToString(System.Globalization.CultureInfo.InvariantCulture), l.Annotation(LayerLabels.UncompressedSizeAnnotation));
        }
    }

    [Fact]
    public async Task Layers_already_in_eStargz_are_copied_unchanged_into_another_repository()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var first = ImageReference.Parse($"{f.Registry.Host}/out/twice:one");
        var second = ImageReference.Parse($"{f.Registry.Host}/other/twice:two");
        var converter = new ImageConverter(client);
        var one = await converter.ConvertAsync(src, first, new ConvertOptions(), Ct);
        var two = await converter.ConvertAsync(first, second, new ConvertOptions(), Ct);
        Assert.All(two.Manifests[0].Layers, l => Assert.Equal(LayerAction.CopiedAsIs, l.Action));
        Assert.Equal(one.Manifests[0].Layers.Select(l => l.Target.Digest), two.Manifests[0].Layers.Select(l => l.Target.Digest));
        Assert.Equal(one.Manifests[0].Layers.Select(l => l.DiffId), two.Manifests[0].Layers.Select(l => l.DiffId));
        // Same layers and diffIDs, same config, same manifest bytes: the second conversion is the identity.
        Assert.Equal(one.Digest, two.Digest);
        foreach (var l in two.Manifests[0].Layers)
            Assert.True(await client.BlobExistsAsync(second, l.Target.Digest, Ct));
    }

    [Fact]
    public async Task Docker_schema2_image_from_another_registry_becomes_OCI_and_copies_back()
    {
        var f = await fixture.GetAsync();
        await using var other = await LocalRegistry.StartAsync();
        var skopeo = Requires.Command("skopeo");
        (await ProcessRunner.RunAsync(skopeo, ["copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2",
            $"oci:{f.LayoutDir}:{SourceImageFixture.Tag}", $"docker://{other.Host}/src/docker:v1"], TimeSpan.FromMinutes(2)))
            .EnsureSuccess("skopeo copy --format v2s2");
        using var client = new RegistryClient();
        var src = ImageReference.Parse($"{other.Host}/src/docker:v1");
        var srcM = await client.ResolveAsync(src, null, Ct);
        Assert.Equal(MediaTypes.DockerManifest, srcM.MediaType);
        Assert.All(srcM.Layers, l => Assert.Equal("application/vnd.docker.image.rootfs.diff.tar.gzip", l.MediaType));

        // Across registries: layers are downloaded from one and pushed to the other.
        var dst = ImageReference.Parse($"{f.Registry.Host}/out/from-docker:v1");
        var res = await new ImageConverter(client).ConvertAsync(src, dst, null, Ct);
        var m = await client.ResolveAsync(dst, null, Ct);
        Assert.Equal(MediaTypes.OciManifest, m.MediaType);
        Assert.Equal(MediaTypes.OciConfig, m.Config.MediaType);
        Assert.All(m.Layers, l => Assert.Equal("application/vnd.oci.image.layer.v1.tar+gzip", l.MediaType));
        Assert.All(m.Layers, l => Assert.NotNull(l.Annotation(LayerLabels.TocDigestAnnotation)));

        // And back into the first registry: already eStargz, so the blobs travel unchanged (download + push, no mount).
        var back = ImageReference.Parse($"{other.Host}/out/back:v1");
        var res2 = await new ImageConverter(client).ConvertAsync(dst, back, null, Ct);
        Assert.All(res2.Manifests[0].Layers, l => Assert.Equal(LayerAction.CopiedAsIs, l.Action));
        Assert.Equal(res.Digest, res2.Digest);
        foreach (var l in m.Layers)
            Assert.Equal(await LayerContent.DownloadAsync(client, dst, l.Digest), await LayerContent.DownloadAsync(client, back, l.Digest));
    }

    [Fact]
    public async Task Plain_tar_and_zstd_source_layers_give_the_same_image_as_gzip_ones()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var srcM = await client.ResolveAsync(src, null, Ct);
        // The same image with layer 1 stored as a plain tar and layer 2 as tar+zstd (same tars, so the same diff_ids).
        var layers = new List<object>();
        for (var i = 0; i < srcM.Layers.Count; i++)
        {
            var l = srcM.Layers[i];
            if (i is not (0 or 1)) { layers.Add(new { mediaType = l.MediaType, digest = l.Digest, size = l.Size }); continue; }
            var tar = LayerContent.Decompress(await LayerContent.DownloadAsync(client, src, l.Digest));
            byte[] blob = tar;
            var mt = "application/vnd.oci.image.layer.v1.tar";
            if (i == 1)
            {
                using var z = new ZstdSharp.Compressor(3);
                blob = z.Wrap(tar).ToArray();
                mt = "application/vnd.oci.image.layer.v1.tar+zstd";
            }
            var d = await f.Registry.PushBlobAsync(SourceImageFixture.Repository, blob, Ct);
            layers.Add(new { mediaType = mt, digest = d, size = blob.Length });
        }
        var manifest = JsonSerializer.SerializeToUtf8Bytes(new
        {
            schemaVersion = 2,
            mediaType = MediaTypes.OciManifest,
            config = new { mediaType = srcM.Config.MediaType, digest = srcM.Config.Digest, size = srcM.Config.Size },
            layers,
        });
        await f.Registry.PushManifestAsync(SourceImageFixture.Repository, "mixed", manifest, MediaTypes.OciManifest, Ct);

        var converter = new ImageConverter(client);
        var fromGzip = await converter.ConvertAsync(src, ImageReference.Parse($"{f.Registry.Host}/out/mixed:from-gzip"), null, Ct);
        var fromMixed = await converter.ConvertAsync(ImageReference.Parse($"{f.Registry.Host}/{SourceImageFixture.Repository}:mixed"),
            ImageReference.Parse($"{f.Registry.Host}/out/mixed:from-mixed"), null, Ct);
        Assert.All(fromMixed.Manifests[0].Layers, l => Assert.Equal(LayerAction.Converted, l.Action));
        Assert.Equal(fromGzip.Manifests[0].Layers.Select(l => l.Target.Digest), fromMixed.Manifests[0].Layers.Select(l => l.Target.Digest));
        Assert.Equal(fromGzip.Digest, fromMixed.Digest);
    }

    [Fact]
    public async Task Conversion_is_reproducible()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var a = await new ImageConverter(client).ConvertAsync(src, ImageReference.Parse($"{f.Registry.Host}/out/repro:a"), new ConvertOptions(), Ct);
        var b = await new ImageConverter(client).ConvertAsync(src, ImageReference.Parse($"{f.Registry.Host}/out/repro:b"),
            new ConvertOptions { MaxParallelLayers = 1, BuilderParallelism = 1 }, Ct);
        Assert.Equal(a.Digest, b.Digest);
    }

    [Fact]
    public async Task An_index_is_narrowed_to_one_platform_or_converted_for_all()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var srcM = await client.ResolveAsync(src, null, Ct);
        // An index over the image for two platforms (the same manifest twice: layers are shared and converted once).
        var index = JsonSerializer.SerializeToUtf8Bytes(new
        {
            schemaVersion = 2,
            mediaType = MediaTypes.OciIndex,
            manifests = new object[]
            {
                new { mediaType = MediaTypes.OciManifest, digest = srcM.Digest, size = srcM.Raw.Length, platform = new { os = "linux", architecture = "arm64", variant = "v8" } },
                new { mediaType = MediaTypes.OciManifest, digest = srcM.Digest, size = srcM.Raw.Length, platform = new { os = "linux", architecture = "amd64" } },
            },
            annotations = new Dictionary<string, string> { ["org.example.note"] = "two platforms" },
        });
        await f.Registry.PushManifestAsync(SourceImageFixture.Repository, "multi", index, MediaTypes.OciIndex, Ct);
        var multi = ImageReference.Parse($"{f.Registry.Host}/{SourceImageFixture.Repository}:multi");
        var converter = new ImageConverter(client);

        var one = await converter.ConvertAsync(multi, ImageReference.Parse($"{f.Registry.Host}/out/multi:arm"),
            new ConvertOptions { Platform = Platform.Parse("linux/arm64") }, Ct);
        Assert.Equal(MediaTypes.OciManifest, one.MediaType);
        Assert.Equal("arm64", one.Manifests.Single().Platform!.Architecture);

        var all = await converter.ConvertAsync(multi, ImageReference.Parse($"{f.Registry.Host}/out/multi:all"), new ConvertOptions { AllPlatforms = true }, Ct);
        Assert.Equal(MediaTypes.OciIndex, all.MediaType);
        Assert.Equal(2, all.Manifests.Count);
        var head = await client.HeadManifestAsync(ImageReference.Parse($"{f.Registry.Host}/out/multi:all"), Ct);
        Assert.Equal(all.Digest, head.Digest);
        var arm = await client.ResolveAsync(ImageReference.Parse($"{f.Registry.Host}/out/multi:all"), Platform.Parse("linux/arm64"), Ct);
        var amd = await client.ResolveAsync(ImageReference.Parse($"{f.Registry.Host}/out/multi:all"), Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(all.Digest, arm.IndexDigest);
        Assert.Equal(arm.Layers.Select(l => l.Digest), amd.Layers.Select(l => l.Digest));
        Assert.All(arm.Layers, l => Assert.NotNull(l.Annotation(LayerLabels.TocDigestAnnotation)));
        var (bytes, _, _) = await client.FetchManifestAsync(ImageReference.Parse($"{f.Registry.Host}/out/multi:all"), all.Digest, Ct);
        Assert.Contains("two platforms", Encoding.UTF8.GetString(bytes.Span));

        var none = await Assert.ThrowsAsync<ImageConvertException>(() => converter.ConvertAsync(multi,
            ImageReference.Parse($"{f.Registry.Host}/out/multi:none"), new ConvertOptions { Platform = Platform.Parse("linux/s390x") }, Ct));
        Assert.Contains("linux/s390x", none.Message);
    }

    [Fact]
    public async Task A_broken_layer_fails_with_its_digest_and_leaves_no_temp_files()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        var src = ImageReference.Parse(f.Reference);
        var srcM = await client.ResolveAsync(src, null, Ct);
        // A manifest whose second layer claims to be tar+gzip but is random bytes, and one with an unknown media type.
        var junk = new byte[100_000];
        new Random(3).NextBytes(junk);
        var junkDigest = await f.Registry.PushBlobAsync(SourceImageFixture.Repository, junk, Ct);
        async Task<ImageReference> Push(string tag, string mediaType)
        {
            var doc = JsonDocument.Parse(srcM.Raw).RootElement;
            var m = JsonSerializer.SerializeToUtf8Bytes(new
            {
                schemaVersion = 2,
                mediaType = MediaTypes.OciManifest,
                config = JsonSerializer.Deserialize<JsonElement>(doc.GetProperty("config").GetRawText()),
                layers = doc.GetProperty("layers").EnumerateArray()
                    .Select((l, i) => i == 1 ? (object)new { mediaType, digest = junkDigest, size = junk.Length } : l.Clone()).ToArray(),
            });
            await f.Registry.PushManifestAsync(SourceImageFixture.Repository, tag, m, MediaTypes.OciManifest, Ct);
            return ImageReference.Parse($"{f.Registry.Host}/{SourceImageFixture.Repository}:{tag}");
        }
        using var work = new TempDir("convert-work");
        var converter = new ImageConverter(client);

        var bad = await Push("broken", "application/vnd.oci.image.layer.v1.tar+gzip");
        var e = await Assert.ThrowsAsync<ImageConvertException>(() =>
            converter.ConvertAsync(bad, ImageReference.Parse($"{f.Registry.Host}/out/broken:x"), new ConvertOptions { WorkDirectory = work.Path }, Ct));
        Assert.Equal(junkDigest, e.LayerDigest);
        Assert.Contains(junkDigest, e.Message);
        Assert.Empty(Directory.EnumerateFileSystemEntries(work.Path));

        var odd = await Push("odd", "application/vnd.example.not-a-layer");
        var e2 = await Assert.ThrowsAsync<ImageConvertException>(() =>
            converter.ConvertAsync(odd, ImageReference.Parse($"{f.Registry.Host}/out/broken:y"), new ConvertOptions { WorkDirectory = work.Path }, Ct));
        Assert.Equal(junkDigest, e2.LayerDigest);
        Assert.Contains("application/vnd.example.not-a-layer", e2.Message);

        // A prioritized path that is in no layer is an error too.
        var e3 = await Assert.ThrowsAsync<ImageConvertException>(() => converter.ConvertAsync(src, ImageReference.Parse($"{f.Registry.Host}/out/broken:z"),
            new ConvertOptions { Prioritized = ["no/such/file"], WorkDirectory = work.Path }, Ct));
        Assert.Contains("no/such/file", e3.Message);
        Assert.Empty(Directory.EnumerateFileSystemEntries(work.Path));

        // A source that does not exist names the reference.
        var e4 = await Assert.ThrowsAsync<ImageConvertException>(() => converter.ConvertAsync(
            ImageReference.Parse($"{f.Registry.Host}/src/missing:v1"), ImageReference.Parse($"{f.Registry.Host}/out/broken:w"), null, Ct));
        Assert.Contains("src/missing", e4.Message);
    }

    [Fact]
    public async Task Cancellation_stops_the_conversion_and_cleans_up()
    {
        var f = await fixture.GetAsync();
        using var client = new RegistryClient();
        using var work = new TempDir("convert-cancel");
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        // Cancel once a layer is being built (its temp files exist under the work dir).
        var watcher = Task.Run(async () =>
        {
            while (!cts.IsCancellationRequested)
            {
                if (Directory.EnumerateFiles(work.Path, "*", SearchOption.AllDirectories).Any()) { await cts.CancelAsync(); return; }
                await Task.Delay(1, Ct);
            }
        }, Ct);
        var dst = ImageReference.Parse($"{f.Registry.Host}/out/cancelled:x");
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => new ImageConverter(client).ConvertAsync(ImageReference.Parse(f.Reference), dst,
            new ConvertOptions { WorkDirectory = work.Path, CompressionLevel = 9, ChunkSize = 4096 }, cts.Token));
        await watcher;
        Assert.Empty(Directory.EnumerateFileSystemEntries(work.Path));
        await Assert.ThrowsAsync<NotFoundException>(() => client.ResolveAsync(dst, null, Ct));
    }
}
