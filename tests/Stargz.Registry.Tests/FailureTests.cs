using System.Collections.Concurrent;
using System.Net;
using Microsoft.AspNetCore.Http;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>Faulty servers in front of a real registry: 5xx, cut connections, redirects, dead mirrors, no multi-range.</summary>
public class FailureTests(SharedRegistry shared) : IClassFixture<SharedRegistry>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static bool IsBlobGet(HttpContext c) => c.Request.Method == "GET" && c.Request.Path.Value!.Contains("/blobs/sha256:");

    [Fact]
    public async Task Registry_answering_500_twice_then_206_is_retried()
    {
        var (reg, img) = await shared.GetAsync();
        var failures = 0;
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, _) =>
        {
            if (!IsBlobGet(ctx) || Interlocked.Increment(ref failures) > 2) return false;
            ctx.Response.StatusCode = 500;
            await ctx.Response.WriteAsync("injected failure");
            return true;
        });
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var buf = new byte[70_000];
        await blob.ReadAtAsync(123_456, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(123_456, buf.Length).ToArray(), buf);
        Assert.Equal(3, proxy.BlobGets());
        Assert.All(proxy.Seen.Where(s => s.Method == "GET"), s => Assert.Equal("bytes=123456-193455", s.Range));
    }

    [Fact]
    public async Task Too_many_requests_is_retried_after_the_servers_delay()
    {
        var (reg, img) = await shared.GetAsync();
        var n = 0;
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, (ctx, _) =>
        {
            if (!IsBlobGet(ctx) || Interlocked.Increment(ref n) > 1) return Task.FromResult(false);
            ctx.Response.StatusCode = 429;
            ctx.Response.Headers.RetryAfter = "1";
            return Task.FromResult(true);
        });
        var cfg = SharedRegistry.FastRetries();
        cfg.Blob = cfg.Blob with { MaxWait = TimeSpan.FromSeconds(5) };
        using var client = new RegistryClient(cfg);
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        var buf = new byte[321];
        await blob.ReadAtAsync(3, buf, Ct);
        Assert.Equal(img.Layers[1].AsSpan(3, 321).ToArray(), buf);
        Assert.Equal(2, proxy.BlobGets());
    }

    [Fact]
    public async Task Retries_give_up_with_status_host_and_digest()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, (ctx, _) =>
        {
            if (!IsBlobGet(ctx)) return Task.FromResult(false);
            ctx.Response.StatusCode = 503;
            return Task.FromResult(true);
        });
        var cfg = SharedRegistry.FastRetries();
        cfg.Blob = cfg.Blob with { MaxRetries = 2 };
        using var client = new RegistryClient(cfg);
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var e = await Assert.ThrowsAsync<RegistryException>(async () => await blob.ReadAtAsync(0, new byte[10], Ct));
        Assert.Equal(HttpStatusCode.ServiceUnavailable, e.StatusCode);
        Assert.Contains(proxy.Host, e.Message);
        Assert.Contains(img.LayerDigests[0], e.Message);
        Assert.Equal(3, proxy.BlobGets());
    }

    [Fact]
    public async Task Connection_cut_mid_body_is_retried()
    {
        var (reg, img) = await shared.GetAsync();
        var cut = 0;
        using var upstream = new HttpClient();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, p) =>
        {
            if (!IsBlobGet(ctx) || Interlocked.Increment(ref cut) > 1) return false;
            // Announce the whole range, send half of it, then drop the connection.
            using var req = new HttpRequestMessage(HttpMethod.Get, p.Upstream + ctx.Request.Path);
            req.Headers.TryAddWithoutValidation("Range", ctx.Request.Headers.Range.ToString());
            using var resp = await upstream.SendAsync(req, Ct);
            var body = await resp.Content.ReadAsByteArrayAsync(Ct);
            ctx.Response.StatusCode = (int)resp.StatusCode;
            ctx.Response.ContentLength = body.Length;
            ctx.Response.Headers.ContentRange = resp.Content.Headers.ContentRange!.ToString();
            await ctx.Response.Body.WriteAsync(body.AsMemory(0, body.Length / 2), Ct);
            await ctx.Response.Body.FlushAsync(Ct);
            ctx.Abort();
            return true;
        });
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var buf = new byte[600_000];
        await blob.ReadAtAsync(1000, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(1000, buf.Length).ToArray(), buf);
        Assert.Equal(2, proxy.BlobGets());
    }

    [Fact]
    public async Task Redirect_url_is_kept_until_it_fails_then_resolved_again()
    {
        var (reg, img) = await shared.GetAsync();
        using var upstream = new HttpClient();
        var valid = new ConcurrentDictionary<string, bool>();
        var storageGets = new ConcurrentQueue<(string Token, bool Auth)>();
        // The storage backend: serves blob bytes (ranges included) for URLs carrying a valid token.
        await using var storage = await TestHttpServer.StartAsync(async ctx =>
        {
            var parts = ctx.Request.Path.Value!.Split('/', StringSplitOptions.RemoveEmptyEntries); // storage/TOKEN/DIGEST
            storageGets.Enqueue((parts[1], ctx.Request.Headers.Authorization.Count > 0));
            if (!valid.ContainsKey(parts[1])) { ctx.Response.StatusCode = 403; return; }
            using var req = new HttpRequestMessage(HttpMethod.Get, $"{reg.BaseUrl}/v2/{img.Repository}/blobs/{parts[2]}");
            req.Headers.TryAddWithoutValidation("Range", ctx.Request.Headers.Range.ToString());
            using var resp = await upstream.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, ctx.RequestAborted);
            ctx.Response.StatusCode = (int)resp.StatusCode;
            foreach (var h in resp.Content.Headers) ctx.Response.Headers[h.Key] = h.Value.ToArray();
            await resp.Content.CopyToAsync(ctx.Response.Body, ctx.RequestAborted);
        });
        var current = "t1";
        valid[current] = true;
        await using var front = await RegistryProxy.StartAsync(reg.BaseUrl, (ctx, _) =>
        {
            if (!IsBlobGet(ctx)) return Task.FromResult(false);
            var digest = ctx.Request.Path.Value![(ctx.Request.Path.Value!.LastIndexOf('/') + 1)..];
            ctx.Response.StatusCode = 307;
            ctx.Response.Headers.Location = $"{storage.BaseUrl}/storage/{current}/{digest}";
            return Task.FromResult(true);
        });
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{front.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var layer = img.Layers[0];

        var a = new byte[4000];
        await blob.ReadAtAsync(10, a, Ct);
        Assert.Equal(layer.AsSpan(10, 4000).ToArray(), a);
        Assert.Equal(1, front.BlobGets());
        Assert.Contains("/storage/t1/", blob.RedirectUrl);

        // Further reads, single and multi-range, go straight to the storage URL.
        await blob.ReadAtAsync(50_000, a, Ct);
        var ranges = new[] { new BlobRange(0, new byte[100]), new BlobRange(900_000, new byte[3000]), new BlobRange(500_000, new byte[10]) };
        await blob.ReadRangesAsync(ranges, Ct);
        Assert.Equal(layer.AsSpan(50_000, 4000).ToArray(), a);
        foreach (var r in ranges) Assert.Equal(layer.AsSpan((int)r.Offset, r.Destination.Length).ToArray(), r.Destination.ToArray());
        Assert.Equal(1, front.BlobGets());
        Assert.Equal(3, storageGets.Count);

        // The storage URL expires: the next read fails there once, asks the registry again and uses the new URL.
        valid.TryRemove("t1", out _);
        current = "t2";
        valid["t2"] = true;
        await blob.ReadAtAsync(777, a, Ct);
        Assert.Equal(layer.AsSpan(777, 4000).ToArray(), a);
        Assert.Equal(2, front.BlobGets());
        Assert.Contains("/storage/t2/", blob.RedirectUrl);
        Assert.DoesNotContain(storageGets, g => g.Auth);

        // Check() works through the redirect and refreshes it when the storage URL has gone.
        valid.TryRemove("t2", out _);
        current = "t3";
        valid["t3"] = true;
        await blob.CheckAsync(Ct);
        Assert.Contains("/storage/t3/", blob.RedirectUrl);
    }

    [Fact]
    public async Task Dead_mirror_first_then_live_mirror_then_origin()
    {
        var (reg, img) = await shared.GetAsync();
        await using var mirror = await RegistryProxy.StartAsync(reg.BaseUrl);
        await using var origin = await RegistryProxy.StartAsync(reg.BaseUrl);
        var dead = $"127.0.0.1:{LocalRegistry.FreePort()}";
        var reference = ImageReference.Parse($"{origin.Host}/{img.Repository}:{img.Tag}");

        var cfg = SharedRegistry.FastRetries();
        cfg.Set(origin.Host, new HostConfig { Mirrors = [new EndpointConfig { Host = dead }, new EndpointConfig { Host = mirror.Host, PlainHttp = true }] });
        using (var client = new RegistryClient(cfg))
        {
            var m = await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
            Assert.Equal(img.AmdManifest, m.Digest);
            Assert.Equal(mirror.Host, m.ServedBy);
            var blob = await client.OpenBlobAsync(reference, img.LayerDigests[1], Ct);
            Assert.Equal(mirror.Host, blob.Host);
            var buf = new byte[1234];
            await blob.ReadAtAsync(42, buf, Ct);
            Assert.Equal(img.Layers[1].AsSpan(42, 1234).ToArray(), buf);
            Assert.Equal(1, mirror.BlobGets());
            Assert.Empty(origin.Seen);
        }

        // Only a dead mirror: the origin serves.
        var cfg2 = SharedRegistry.FastRetries();
        cfg2.Set(origin.Host, new HostConfig { Mirrors = [new EndpointConfig { Host = dead }] });
        using (var client = new RegistryClient(cfg2))
        {
            var blob = await client.OpenBlobAsync(reference, img.LayerDigests[1], Ct);
            Assert.Equal(origin.Host, blob.Host);
            var buf = new byte[99];
            await blob.ReadAtAsync(7, buf, Ct);
            Assert.Equal(img.Layers[1].AsSpan(7, 99).ToArray(), buf);
        }

        // A mirror that is up but lacks the image (404) also falls back to the origin.
        await using var emptyMirror = await RegistryProxy.StartAsync(reg.BaseUrl, (ctx, _) => { ctx.Response.StatusCode = 404; return Task.FromResult(true); });
        var cfg3 = SharedRegistry.FastRetries();
        cfg3.Set(origin.Host, new HostConfig { Mirrors = [new EndpointConfig { Host = emptyMirror.Host }] });
        using (var client = new RegistryClient(cfg3))
        {
            var m = await client.ResolveAsync(reference, Platform.Parse("linux/arm64"), Ct);
            Assert.Equal(img.ArmManifest, m.Digest);
            Assert.Equal(origin.Host, m.ServedBy);
            Assert.NotEmpty(emptyMirror.Seen);
        }
    }

    [Fact]
    public async Task Host_without_multi_range_falls_back_to_single_ranges_and_is_remembered()
    {
        var (reg, img) = await shared.GetAsync();
        using var upstream = new HttpClient();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, p) =>
        {
            if (!IsBlobGet(ctx) || !ctx.Request.Headers.Range.ToString().Contains(',')) return false;
            // Like some storage backends: a multi-range request gets the whole blob with 200.
            ctx.Request.Headers.Remove("Range");
            await p.ForwardAsync(ctx);
            return true;
        });
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        BlobRange[] Ranges() => [new(5, new byte[10]), new(300_000, new byte[20_000]), new(1_400_000, new byte[99_999]), new(310_000, new byte[20_000])];
        var first = Ranges();
        await blob.ReadRangesAsync(first, Ct);
        foreach (var r in first) Assert.Equal(img.Layers[0].AsSpan((int)r.Offset, r.Destination.Length).ToArray(), r.Destination.ToArray());
        var multiSeen = proxy.Seen.Count(s => s.Range?.Contains(',') == true);
        Assert.Equal(1, multiSeen);

        proxy.Reset();
        var second = Ranges();
        await blob.ReadRangesAsync(second, Ct);
        foreach (var r in second) Assert.Equal(img.Layers[0].AsSpan((int)r.Offset, r.Destination.Length).ToArray(), r.Destination.ToArray());
        Assert.DoesNotContain(proxy.Seen, s => s.Range?.Contains(',') == true);
        // Overlapping 300000.. and 310000.. ranges are merged: three requests, not four.
        Assert.Equal(3, proxy.BlobGets());
    }

    [Fact]
    public async Task Tampered_manifest_is_rejected_by_digest()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, _) =>
        {
            if (ctx.Request.Method != "GET" || !ctx.Request.Path.Value!.Contains("/manifests/sha256:")) return false;
            ctx.Response.ContentType = MediaTypes.OciManifest;
            await ctx.Response.WriteAsync("""{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:00","size":1},"layers":[]}""");
            return true;
        });
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var e = await Assert.ThrowsAsync<DigestMismatchException>(() =>
            client.ResolveAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}:{img.Tag}"), Platform.Parse("linux/amd64"), Ct));
        Assert.Contains(img.AmdManifest, e.Message);
        Assert.Contains(proxy.Host, e.Message);
    }

    [Fact]
    public async Task Stalled_server_hits_the_request_timeout()
    {
        var (reg, img) = await shared.GetAsync();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, _) =>
        {
            if (!IsBlobGet(ctx)) return false;
            try { await Task.Delay(Timeout.Infinite, ctx.RequestAborted); } catch (OperationCanceledException) { }
            return true;
        });
        var cfg = SharedRegistry.FastRetries();
        cfg.Blob = cfg.Blob with { MaxRetries = 1 };
        cfg.Set(proxy.Host, new HostConfig { Origin = new EndpointConfig { Host = proxy.Host, RequestTimeout = TimeSpan.FromMilliseconds(500) } });
        using var client = new RegistryClient(cfg);
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var e = await Assert.ThrowsAsync<RegistryException>(async () => await blob.ReadAtAsync(0, new byte[10], Ct));
        Assert.Contains("timed out", e.Message);
        Assert.Contains(proxy.Host, e.Message);
        Assert.Equal(2, proxy.BlobGets());
    }
}
