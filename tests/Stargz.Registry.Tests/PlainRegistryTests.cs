using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>Against a real docker-registry over plain HTTP on 127.0.0.1.</summary>
public class PlainRegistryTests(SharedRegistry shared) : IClassFixture<SharedRegistry>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Resolve_index_selects_platform_and_keeps_annotations()
    {
        var (reg, img) = await shared.GetAsync();
        using var client = new RegistryClient();
        var r = ImageReference.Parse($"{reg.Host}/{img.Repository}:{img.Tag}");

        var amd = await client.ResolveAsync(r, Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(img.AmdManifest, amd.Digest);
        Assert.Equal(img.IndexDigest, amd.IndexDigest);
        Assert.Equal(MediaTypes.OciManifest, amd.MediaType);
        Assert.Equal(img.ConfigDigest, amd.Config.Digest);
        Assert.Equal(img.LayerDigests, amd.Layers.Select(l => l.Digest).ToArray());
        Assert.Equal(img.Layers.Select(l => (long)l.Length).ToArray(), amd.Layers.Select(l => l.Size).ToArray());
        Assert.Equal($"sha256:{1:x64}", amd.Layers[1].Annotation(PushedImage.TocAnnotation));
        Assert.Equal("amd64", amd.Annotations!["org.example.arch"]);
        Assert.Equal("amd64", amd.Platform!.Architecture);

        var arm = await client.ResolveAsync(r, Platform.Parse("linux/arm64"), Ct);
        Assert.Equal(img.ArmManifest, arm.Digest);

        var none = await Assert.ThrowsAsync<NotFoundException>(() => client.ResolveAsync(r, Platform.Parse("linux/s390x"), Ct));
        Assert.Contains("linux/s390x", none.Message);

        // A plain manifest by digest, and HEAD giving the digest of a tag.
        var byDigest = await client.ResolveAsync(r.WithDigest(img.ArmManifest), null, Ct);
        Assert.Equal(img.ArmManifest, byDigest.Digest);
        Assert.Null(byDigest.IndexDigest);
        var head = await client.HeadManifestAsync(r, Ct);
        Assert.Equal(img.IndexDigest, head.Digest);
        Assert.Equal(MediaTypes.OciIndex, head.MediaType);

        var cfg = await client.FetchBlobBytesAsync(r, img.ConfigDigest, ct: Ct);
        Assert.Contains("\"amd64\"", System.Text.Encoding.UTF8.GetString(cfg));
    }

    [Fact]
    public async Task Docker_schema2_manifest_list_and_size_limit()
    {
        var (reg, img) = await shared.GetAsync();
        using var http = new HttpClient();
        using var fetcher = new RegistryClient();
        var cfgBytes = await fetcher.FetchBlobBytesAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.ConfigDigest, ct: Ct);
        var manifest = System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(new
        {
            schemaVersion = 2, mediaType = MediaTypes.DockerManifest,
            config = new { mediaType = MediaTypes.DockerConfig, digest = img.ConfigDigest, size = cfgBytes.Length },
            layers = img.LayerDigests.Select((d, i) => new { mediaType = "application/vnd.docker.image.rootfs.diff.tar.gzip", digest = d, size = img.Layers[i].Length }).ToArray(),
        });
        // The layers must exist in this repository too: push the same bytes.
        foreach (var l in img.Layers) await LocalRegistry.PushBlobAsync(http, reg.BaseUrl, "test/docker", l, Ct);
        await LocalRegistry.PushBlobAsync(http, reg.BaseUrl, "test/docker", cfgBytes, Ct);
        var md = await LocalRegistry.PushManifestAsync(http, reg.BaseUrl, "test/docker", "m", manifest, MediaTypes.DockerManifest, Ct);
        var list = System.Text.Json.JsonSerializer.SerializeToUtf8Bytes(new
        {
            schemaVersion = 2, mediaType = MediaTypes.DockerManifestList,
            manifests = new[] { new { mediaType = MediaTypes.DockerManifest, digest = md, size = manifest.Length, platform = new { os = "linux", architecture = "amd64" } } },
        });
        var ld = await LocalRegistry.PushManifestAsync(http, reg.BaseUrl, "test/docker", "list", list, MediaTypes.DockerManifestList, Ct);

        using var client = new RegistryClient();
        var m = await client.ResolveAsync(ImageReference.Parse($"{reg.Host}/test/docker:list"), Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(md, m.Digest);
        Assert.Equal(ld, m.IndexDigest);
        Assert.Equal(MediaTypes.DockerManifest, m.MediaType);
        Assert.Equal(img.LayerDigests, m.Layers.Select(l => l.Digest).ToArray());
        Assert.Equal(manifest, m.Raw.ToArray());

        var small = new RegistryHostsConfig();
        small.Blob = small.Blob with { MaxManifestBytes = 200 };
        using var limited = new RegistryClient(small);
        var e = await Assert.ThrowsAsync<RegistryException>(() => limited.ResolveAsync(ImageReference.Parse($"{reg.Host}/test/docker:m"), null, Ct));
        Assert.Contains("more than the 200", e.Message);
    }

    [Fact]
    public async Task Missing_things_raise_NotFound_with_host_and_reference()
    {
        var (reg, img) = await shared.GetAsync();
        using var client = new RegistryClient();
        var missingTag = ImageReference.Parse($"{reg.Host}/{img.Repository}:nope");
        var e = await Assert.ThrowsAsync<NotFoundException>(() => client.ResolveAsync(missingTag, null, Ct));
        Assert.Contains(reg.Host, e.Message);
        Assert.Contains("nope", e.Message);
        var missingBlob = "sha256:" + new string('e', 64);
        var b = await Assert.ThrowsAsync<NotFoundException>(() => client.OpenBlobAsync(missingTag, missingBlob, Ct));
        Assert.Contains(missingBlob, b.Message);
        Assert.Equal(reg.Host, b.Host);
    }

    [Fact]
    public async Task Ranged_read_equals_curl_r()
    {
        var (reg, img) = await shared.GetAsync();
        var curl = Requires.Command("curl");
        using var client = new RegistryClient();
        var repo = ImageReference.Parse($"{reg.Host}/{img.Repository}");
        var blob = await client.OpenBlobAsync(repo, img.LayerDigests[0], Ct);
        Assert.Equal(img.Layers[0].Length, blob.Size);
        using var dir = new TempDir("curl");
        foreach (var (from, len) in new (long, int)[] { (0, 1), (12345, 4096), (blob.Size - 777, 777), (1_000_000, 65537) })
        {
            var mine = new byte[len];
            await blob.ReadAtAsync(from, mine, Ct);
            var outFile = Path.Combine(dir.Path, $"r{from}");
            (await ProcessRunner.RunAsync(curl, ["-sSf", "-r", $"{from}-{from + len - 1}", "-o", outFile,
                $"{reg.BaseUrl}/v2/{img.Repository}/blobs/{img.LayerDigests[0]}"], TimeSpan.FromSeconds(30))).EnsureSuccess("curl -r");
            Assert.Equal(await File.ReadAllBytesAsync(outFile, Ct), mine);
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => { _ = blob.ReadAtAsync(blob.Size - 1, new byte[2], Ct); });
        Assert.True(blob.BytesFetched >= 1 + 4096 + 777 + 65537);
    }

    [Fact]
    public async Task Hundred_scattered_ranges_cost_one_request()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl);
        using var client = new RegistryClient();
        var repo = ImageReference.Parse($"{proxy.Host}/{img.Repository}");
        var blob = await client.OpenBlobAsync(repo, img.LayerDigests[0], Ct);
        var rnd = new Random(7);
        var ranges = new List<BlobRange>();
        for (var i = 0; i < 100; i++)
        {
            // Scattered, unordered, some overlapping and adjacent.
            long off = i % 10 == 9 ? ranges[^1].Offset + 10 : rnd.NextInt64(0, blob.Size - 5000);
            ranges.Add(new BlobRange(off, new byte[rnd.Next(1, 5000)]));
        }
        var before = proxy.BlobGets();
        await blob.ReadRangesAsync(ranges, Ct);
        Assert.Equal(1, proxy.BlobGets() - before);
        var multi = proxy.Seen.Last(s => s.Method == "GET");
        Assert.Contains(",", multi.Range);
        foreach (var r in ranges)
            Assert.True(img.Layers[0].AsSpan((int)r.Offset, r.Destination.Length).SequenceEqual(r.Destination.Span), $"range at {r.Offset}");
    }

    [Fact]
    public async Task Many_ranges_are_split_into_batches_of_the_configured_size()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl);
        var cfg = new RegistryHostsConfig();
        cfg.Blob = cfg.Blob with { MaxRangesPerRequest = 10 };
        using var client = new RegistryClient(cfg);
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var ranges = new List<BlobRange>();
        for (var i = 0; i < 35; i++) ranges.Add(new BlobRange(i * 40_000L + i, new byte[100 + i]));
        await blob.ReadRangesAsync(ranges, Ct);
        Assert.Equal(4, proxy.BlobGets());
        foreach (var r in ranges)
            Assert.True(img.Layers[0].AsSpan((int)r.Offset, r.Destination.Length).SequenceEqual(r.Destination.Span), $"range at {r.Offset}");
    }

    [Fact]
    public async Task Concurrent_identical_reads_share_one_request()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl);
        // Hold the first blob GET briefly so all readers are surely concurrent.
        var release = new TaskCompletionSource();
        proxy.Hook = async (ctx, p) =>
        {
            if (ctx.Request.Method == "GET" && ctx.Request.Path.Value!.Contains("/blobs/")) await release.Task;
            return false;
        };
        using var client = new RegistryClient();
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        // A second handle on the same blob (as another layer reader would open) shares the flight too.
        var blob2 = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        var bufs = Enumerable.Range(0, 20).Select(_ => new byte[10000]).ToArray();
        var reads = bufs.Select((b, i) => (i % 2 == 0 ? blob : blob2).ReadAtAsync(5000, b, Ct).AsTask()).ToArray();
        await Task.Delay(300, Ct);
        release.SetResult();
        await Task.WhenAll(reads);
        Assert.Equal(1, proxy.BlobGets(img.LayerDigests[1]));
        foreach (var b in bufs) Assert.Equal(img.Layers[1].AsSpan(5000, 10000).ToArray(), b);
        // A different range is a different request.
        await blob.ReadAtAsync(5001, new byte[10], Ct);
        Assert.Equal(2, proxy.BlobGets(img.LayerDigests[1]));
    }

    [Fact]
    public async Task An_unshared_read_reports_its_leading_bytes_as_they_arrive()
    {
        var (reg, img) = await shared.GetAsync();
        using var client = new RegistryClient();
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        const int Length = MappedMemory.UseFrom + 4321;
        var expected = img.Layers[0].AsSpan(100, Length).ToArray();
        var buf = new byte[Length];
        var reported = new List<int>();
        // Each report: the count only grows, and that many leading bytes are already the range's bytes.
        await blob.ReadAtUnsharedAsync(100, buf, Ct, n =>
        {
            if (reported.Count > 0) Assert.True(n > reported[^1], $"{n} after {reported[^1]}");
            Assert.True(buf.AsSpan(0, n).SequenceEqual(expected.AsSpan(0, n)), $"first {n} bytes");
            reported.Add(n);
        });
        Assert.Equal(Length, reported[^1]);
        Assert.True(reported.Count >= 2, "a range of megabytes reported only once it had all come");
        Assert.Equal(expected, buf);
    }

    [Fact]
    public async Task Concurrent_identical_reads_of_a_range_of_megabytes_share_one_request_in_mapped_memory()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl);
        var release = new TaskCompletionSource();
        proxy.Hook = async (ctx, p) =>
        {
            if (ctx.Request.Method == "GET" && ctx.Request.Path.Value!.Contains("/blobs/")) await release.Task;
            return false;
        };
        using var client = new RegistryClient();
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        // At least MappedMemory.UseFrom: the shared flight's buffer is mapped, and unmapped after the last reader.
        const int Length = MappedMemory.UseFrom + 4321;
        var bufs = Enumerable.Range(0, 4).Select(_ => new byte[Length]).ToArray();
        var reads = bufs.Select(b => blob.ReadAtAsync(100, b, Ct).AsTask()).ToArray();
        // One more reader that gives up while the flight runs: the others still get their bytes.
        using var gaveUp = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        var cancelled = blob.ReadAtAsync(100, new byte[Length], gaveUp.Token).AsTask();
        await Task.Delay(300, Ct);
        gaveUp.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => cancelled);
        release.SetResult();
        await Task.WhenAll(reads);
        Assert.Equal(1, proxy.BlobGets(img.LayerDigests[0]));
        foreach (var b in bufs) Assert.Equal(img.Layers[0].AsSpan(100, Length).ToArray(), b);
        // The flight is over: the same range again is a new request, with the same bytes.
        var again = new byte[Length];
        await blob.ReadAtAsync(100, again, Ct);
        Assert.Equal(2, proxy.BlobGets(img.LayerDigests[0]));
        Assert.Equal(bufs[0], again);
    }

    [Fact]
    public async Task Sequential_reads_reuse_one_connection()
    {
        var (reg, img) = await shared.GetAsync();
        var connections = new System.Collections.Concurrent.ConcurrentDictionary<string, int>();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, (ctx, _) =>
        {
            connections.AddOrUpdate(ctx.Connection.Id, 1, (_, v) => v + 1);
            return Task.FromResult(false);
        });
        using var client = new RegistryClient();
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var buf = new byte[2048];
        for (var i = 0; i < 20; i++) await blob.ReadAtAsync(i * 4096, buf, Ct);
        Assert.Single(connections);
        Assert.Equal(21, connections.Values.Single());
        Assert.Equal(21, client.RequestCount);
        Assert.Equal(20 * 2048, client.BytesFetched);
    }

    [Fact]
    public async Task Cancellation_stops_a_read()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl);
        proxy.Hook = async (ctx, p) =>
        {
            if (ctx.Request.Method != "GET") return false;
            try { await Task.Delay(Timeout.Infinite, ctx.RequestAborted); } catch (OperationCanceledException) { }
            return true;
        };
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(300));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await blob.ReadAtAsync(0, new byte[100], cts.Token));
    }
}
