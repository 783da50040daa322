using System.Diagnostics;
using Microsoft.AspNetCore.Http;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>
/// Registries that stop making progress: frozen (SIGSTOP: connections accepted, nothing answered), refusing
/// connections for a while, stalling in the middle of a body, or only slow. Each test has its own registry, since
/// freezing or stopping it would break tests sharing one.
/// </summary>
public class StallAndOutageTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static bool IsBlobGet(HttpContext c) => c.Request.Method == "GET" && c.Request.Path.Value!.Contains("/blobs/sha256:");

    /// <summary>Fast backoff, a 1 s stall watchdog and a 4 s outage window; max_retries at 2, fewer than the window allows.</summary>
    private static RegistryHostsConfig Config(TimeSpan? outage = null) => new()
    {
        Blob = new BlobOptions
        {
            MinWait = TimeSpan.FromMilliseconds(10), MaxWait = TimeSpan.FromMilliseconds(200), MaxRetries = 2,
            StallTimeout = TimeSpan.FromSeconds(1), OutageTimeout = outage ?? TimeSpan.FromSeconds(4),
            // Pushes only: pulls are never cut by it (they are watched for stalls instead).
            FetchingTimeout = TimeSpan.FromSeconds(1),
        },
    };

    private static async Task<(LocalRegistry Registry, PushedImage Image, TempDir Dir)> OwnRegistryAsync(int? port = null, string? storage = null)
    {
        Requires.Command("docker-registry");
        var dir = new TempDir("reg-stall");
        var reg = await LocalRegistry.StartAsync(storageDir: storage ?? dir.Sub("storage"), port: port);
        var img = await PushedImage.PushAsync(reg.BaseUrl, "test/stall");
        return (reg, img, dir);
    }

    [Fact]
    public async Task A_frozen_registry_fails_the_read_within_the_outage_window_after_retries_on_fresh_connections_and_serves_again_when_thawed()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        await using var __ = reg;
        using var client = new RegistryClient(Config());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var buf = new byte[10_000];
        await blob.ReadAtAsync(0, buf, Ct);

        reg.Freeze();
        try
        {
            var sw = Stopwatch.StartNew();
            var e = await Assert.ThrowsAsync<RegistryException>(async () => await blob.ReadAtAsync(500_000, buf, Ct));
            sw.Stop();
            Assert.Contains("sent nothing", e.Message);
            Assert.Contains(reg.Host, e.Message);
            Assert.Contains(img.LayerDigests[0], e.Message);
            // Abandoned after each stall and tried again on a new connection: more tries than max_retries allows for
            // other failures, within the window (4 s) plus one stall (1 s); bounded generously against a slow machine.
            Assert.True(client.StallCount >= 2, $"{client.StallCount} stalls");
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(30), $"the read failed only after {sw.Elapsed}");
        }
        finally { reg.Thaw(); }

        await blob.ReadAtAsync(500_000, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(500_000, buf.Length).ToArray(), buf);
    }

    [Fact]
    public async Task A_registry_frozen_for_a_moment_is_read_through_on_a_fresh_connection()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        await using var __ = reg;
        using var client = new RegistryClient(Config(outage: TimeSpan.FromSeconds(60)));
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        reg.Freeze();
        var read = new byte[200_000];
        Task t;
        try
        {
            t = blob.ReadAtAsync(1_000_000, read, Ct).AsTask();
            // Thawed once the read has stalled at least once.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
            while (client.StallCount == 0 && DateTime.UtcNow < deadline) await Task.Delay(50, Ct);
            Assert.True(client.StallCount > 0, "the read never stalled");
        }
        finally { reg.Thaw(); }
        await t;
        Assert.Equal(img.Layers[0].AsSpan(1_000_000, read.Length).ToArray(), read);
    }

    [Fact]
    public async Task Refused_connections_are_retried_beyond_max_retries_until_the_registry_returns()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        var port = reg.Port;
        var storage = reg.StorageDir;
        LocalRegistry? back = null;
        try
        {
            using var client = new RegistryClient(Config(outage: TimeSpan.FromSeconds(60)));
            var blob = await client.OpenBlobAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
            await reg.DisposeAsync(); // connections to its port are refused now
            var buf = new byte[50_000];
            var read = blob.ReadAtAsync(100_000, buf, Ct).AsTask();
            // Far more failed tries than max_retries (2) allows, then the registry comes back on the same port.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
            while (client.RetryCount < 6 && DateTime.UtcNow < deadline && !read.IsCompleted) await Task.Delay(20, Ct);
            Assert.False(read.IsCompleted, $"the read ended while the registry was down: {read.Exception?.InnerException?.Message}");
            back = await LocalRegistry.StartAsync(storageDir: storage, port: port);
            await read;
            Assert.Equal(img.Layers[1].AsSpan(100_000, buf.Length).ToArray(), buf);
        }
        finally
        {
            if (back != null) await back.DisposeAsync();
            else await reg.DisposeAsync();
        }
    }

    [Fact]
    public async Task Refused_connections_fail_the_read_once_the_outage_window_has_passed_without_a_byte()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        using var client = new RegistryClient(Config(outage: TimeSpan.FromSeconds(2)));
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        await reg.DisposeAsync();
        var sw = Stopwatch.StartNew();
        var e = await Assert.ThrowsAsync<RegistryException>(async () => await blob.ReadAtAsync(0, new byte[100], Ct));
        sw.Stop();
        Assert.Contains(reg.Host, e.Message);
        // Tried for the whole window (never less: a lower bound holds however slow the machine is).
        Assert.True(sw.Elapsed >= TimeSpan.FromSeconds(1.9), $"gave up after {sw.Elapsed}, before the 2 s window");
        Assert.True(client.RetryCount > 2, $"{client.RetryCount} retries");
    }

    [Fact]
    public async Task A_slow_transfer_that_keeps_moving_is_never_cut()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        await using var __ = reg;
        using var upstream = new HttpClient();
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, p) =>
        {
            if (!IsBlobGet(ctx)) return false;
            // 20 KiB every 300 ms: the whole answer takes longer than the stall timeout, the outage window and the
            // fetching timeout together, but no pause reaches the stall timeout.
            using var req = new HttpRequestMessage(HttpMethod.Get, p.Upstream + ctx.Request.Path);
            req.Headers.TryAddWithoutValidation("Range", ctx.Request.Headers.Range.ToString());
            using var resp = await upstream.SendAsync(req, ctx.RequestAborted);
            var body = await resp.Content.ReadAsByteArrayAsync(ctx.RequestAborted);
            ctx.Response.StatusCode = (int)resp.StatusCode;
            ctx.Response.ContentLength = body.Length;
            ctx.Response.Headers.ContentRange = resp.Content.Headers.ContentRange!.ToString();
            await Task.Delay(300, ctx.RequestAborted);
            for (var o = 0; o < body.Length; o += 20 << 10)
            {
                await ctx.Response.Body.WriteAsync(body.AsMemory(o, Math.Min(20 << 10, body.Length - o)), ctx.RequestAborted);
                await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
                await Task.Delay(300, ctx.RequestAborted);
            }
            return true;
        });
        using var client = new RegistryClient(Config(outage: TimeSpan.FromSeconds(2)));
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var buf = new byte[400_000]; // 20 writes: about 6 s
        await blob.ReadAtAsync(77, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(77, buf.Length).ToArray(), buf);
        Assert.Equal(1, proxy.BlobGets());
        Assert.Equal(0, client.StallCount);
    }

    [Fact]
    public async Task A_body_that_stops_halfway_is_abandoned_and_fetched_again()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        await using var __ = reg;
        using var upstream = new HttpClient();
        var first = 0;
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, p) =>
        {
            if (!IsBlobGet(ctx) || Interlocked.Increment(ref first) > 1) return false;
            using var req = new HttpRequestMessage(HttpMethod.Get, p.Upstream + ctx.Request.Path);
            req.Headers.TryAddWithoutValidation("Range", ctx.Request.Headers.Range.ToString());
            using var resp = await upstream.SendAsync(req, ctx.RequestAborted);
            var body = await resp.Content.ReadAsByteArrayAsync(ctx.RequestAborted);
            ctx.Response.StatusCode = (int)resp.StatusCode;
            ctx.Response.ContentLength = body.Length;
            ctx.Response.Headers.ContentRange = resp.Content.Headers.ContentRange!.ToString();
            await ctx.Response.Body.WriteAsync(body.AsMemory(0, body.Length / 2), ctx.RequestAborted);
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
            // Then silence, with the connection open, until the client gives up on it.
            try { await Task.Delay(Timeout.Infinite, ctx.RequestAborted); } catch (OperationCanceledException) { }
            return true;
        });
        using var client = new RegistryClient(Config());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{proxy.Host}/{img.Repository}"), img.LayerDigests[0], Ct);
        var buf = new byte[600_000];
        await blob.ReadAtAsync(5, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(5, buf.Length).ToArray(), buf);
        Assert.Equal(2, proxy.BlobGets());
        Assert.Equal(1, client.StallCount);
    }

    [Fact]
    public async Task A_stalled_mirror_gives_way_to_the_next_endpoint()
    {
        var (reg, img, dir) = await OwnRegistryAsync();
        using var _ = dir;
        await using var __ = reg;
        await using var mirror = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, _) =>
        {
            if (!IsBlobGet(ctx)) return false;
            try { await Task.Delay(Timeout.Infinite, ctx.RequestAborted); } catch (OperationCanceledException) { }
            return true;
        });
        var cfg = Config();
        cfg.Set(reg.Host, new HostConfig { Mirrors = [new EndpointConfig { Host = mirror.Host, PlainHttp = true }] });
        using var client = new RegistryClient(cfg);
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{reg.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        Assert.Equal(mirror.Host, blob.Host); // the mirror answers HEAD
        var buf = new byte[1234];
        await blob.ReadAtAsync(42, buf, Ct);
        Assert.Equal(img.Layers[1].AsSpan(42, buf.Length).ToArray(), buf);
        Assert.Equal(reg.Host, blob.Host);
        Assert.Equal(1, mirror.BlobGets());
        Assert.Equal(1, client.StallCount);
    }
}
