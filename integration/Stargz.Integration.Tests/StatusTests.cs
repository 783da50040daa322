using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// `stargz status` against the real daemon, containerd and registry: the bytes it reports fetched are the bytes the
/// registry was asked for (the counting proxy's log of blob ranges), and a layer that falls back shows why, in status
/// and in the daemon's metrics.
/// </summary>
public class StatusTests
{
    private static async Task<JsonDocument> StatusJsonAsync(LocalDaemon daemon)
    {
        var r = (await StargzCli.RunAsync(["status", "--address", daemon.Socket, "--json"])).EnsureSuccess("stargz status --json");
        return JsonDocument.Parse(r.StdOut);
    }

    /// <summary>(start, end) of every range in a "GET PATH bytes=a-b,c-d" line of the proxy's log.</summary>
    private static IEnumerable<(long Start, long End)> Ranges(string logLine)
    {
        var m = Regex.Match(logLine, @"bytes=(\S+)$");
        if (!m.Success) yield break;
        foreach (var r in m.Groups[1].Value.Split(','))
        {
            var dash = r.IndexOf('-');
            yield return (long.Parse(r[..dash], CultureInfo.InvariantCulture), long.Parse(r[(dash + 1)..], CultureInfo.InvariantCulture));
        }
    }

    /// <summary>
    /// Bytes of blob <paramref name="digest"/> the log shows asked for as chunks: every range, less the reads of the
    /// blob's tail (footer and TOC, at mount; they end at its last byte) and the one-byte health checks (bytes=0-0).
    /// </summary>
    private static long ChunkBytesAsked(List<string> log, string digest, long size)
    {
        long asked = 0;
        foreach (var line in log)
        {
            if (!line.StartsWith("GET ", StringComparison.Ordinal) || !line.Contains("/blobs/" + digest, StringComparison.Ordinal)) continue;
            Assert.Contains("bytes=", line); // never a whole-blob download
            foreach (var (start, end) in Ranges(line))
                if (end != size - 1 && !(start == 0 && end == 0)) asked += end - start + 1;
        }
        return asked;
    }

    [Fact]
    public async Task StatusJsonAfterALazyPullMatchesTheBytesTheRegistryWasAskedFor()
    {
        var ct = TestContext.Current.CancellationToken;
        // On demand only (no prefetch, no background fetch), and one range per request so that the registry's log
        // reads as exactly what was fetched.
        await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 30, extraToml: "force_single_range_mode = true");
        var img = await rig.PushImageAsync("status/app", new Dictionary<string, int> { ["a.bin"] = 700, ["b.bin"] = 300 }, seed: 19);
        await using var proxy = new CountingProxy(rig.RegistryHost);
        var image = img.Estargz.Replace(rig.RegistryHost, proxy.Host, StringComparison.Ordinal);
        await rig.RpullAsync(image);
        Assert.Equal(img.Sha256["a.bin"], await rig.Sha256InContainerAsync(image, "status-read", "a.bin"));

        using var doc = await StatusJsonAsync(rig.Daemon);
        var layers = doc.RootElement.GetProperty("layers").EnumerateArray().ToList();
        Assert.Equal(2, layers.Count);
        Assert.Empty(doc.RootElement.GetProperty("fallbacks").EnumerateArray());
        List<string> log;
        lock (proxy.Log) log = [.. proxy.Log];
        long totalFetched = 0;
        int allCached = 0, allTotal = 0;
        foreach (var l in layers)
        {
            var digest = l.GetProperty("layerDigest").GetString()!;
            Assert.Equal(image, l.GetProperty("imageReference").GetString());
            Assert.Equal("serving", l.GetProperty("state").GetString());
            Assert.False(string.IsNullOrEmpty(l.GetProperty("snapshotKey").GetString()));
            var size = l.GetProperty("size").GetInt64();
            Assert.True(size > 0, $"layer {digest}: size {size}");
            var asked = ChunkBytesAsked(log, digest, size);
            var fetched = l.GetProperty("fetchedBytes").GetInt64();
            Assert.True(asked == fetched, $"layer {digest}: status says {fetched} bytes fetched, the registry was asked for {asked}:\n{string.Join('\n', log)}");
            Assert.Equal(fetched, l.GetProperty("fetchedOnDemandBytes").GetInt64());
            Assert.Equal(0, l.GetProperty("fetchedPrefetchBytes").GetInt64());
            Assert.Equal(0, l.GetProperty("fetchedBackgroundBytes").GetInt64());
            var total = l.GetProperty("chunksTotal").GetInt32();
            var cached = l.GetProperty("chunksCached").GetInt32();
            Assert.True(total > 0 && cached > 0 && cached <= total, $"layer {digest}: {cached} of {total} chunks cached");
            (allCached, allTotal) = (allCached + cached, allTotal + total);
            totalFetched += fetched;
        }
        Assert.True(allCached < allTotal, $"every chunk cached ({allCached}) although b.bin was never read");
        // The container read a.bin (700 KiB of random bytes) and the busybox files it ran: all came on demand.
        Assert.True(totalFetched > 700 * 1024, $"only {totalFetched} bytes fetched");

        // After b.bin is read too, the numbers grow by what the registry was asked for again.
        proxy.ResetCounts();
        Assert.Equal(img.Sha256["b.bin"], await rig.Sha256InContainerAsync(image, "status-read-b", "b.bin"));
        using var doc2 = await StatusJsonAsync(rig.Daemon);
        long grown = 0, askedAgain = 0;
        lock (proxy.Log) log = [.. proxy.Log];
        foreach (var l in doc2.RootElement.GetProperty("layers").EnumerateArray())
        {
            grown += l.GetProperty("fetchedBytes").GetInt64();
            askedAgain += ChunkBytesAsked(log, l.GetProperty("layerDigest").GetString()!, l.GetProperty("size").GetInt64());
        }
        Assert.Equal(askedAgain, grown - totalFetched);
        Assert.True(askedAgain >= 300 * 1024, $"reading b.bin asked the registry for {askedAgain} bytes");
    }

    [Fact]
    public async Task AFallbackShowsItsReasonInStatusAndInMetrics()
    {
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("status/plain", new Dictionary<string, int> { ["a.bin"] = 64 }, seed: 7);
        var manifest = await DaemonMetrics.ManifestLayersAsync(rig.RegistryHost, "status/plain", "v1");
        // The plain gzip image through rpull: every layer is tried remotely, has no TOC digest (not eStargz), and is downloaded.
        await rig.RpullAsync(img.Plain);
        Assert.Empty(rig.FuseMountIds());

        using var doc = await StatusJsonAsync(rig.Daemon);
        Assert.Empty(doc.RootElement.GetProperty("layers").EnumerateArray());
        var fallbacks = doc.RootElement.GetProperty("fallbacks").EnumerateArray().ToList();
        foreach (var (digest, _) in manifest)
        {
            var f = fallbacks.Single(x => x.GetProperty("layerDigest").GetString() == digest);
            Assert.Equal("no_toc_digest", f.GetProperty("reason").GetString());
            Assert.Equal(img.Plain, f.GetProperty("imageReference").GetString());
            Assert.Contains("has no TOC digest label", f.GetProperty("message").GetString());
        }
        Assert.Equal(manifest.Count, fallbacks.Count);

        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
        var metrics = await http.GetStringAsync($"http://127.0.0.1:{rig.MetricsPort}/metrics", TestContext.Current.CancellationToken);
        Assert.Matches(new Regex($"^stargz_fallbacks_total\\{{reason=\"no_toc_digest\"\\}} {manifest.Count}$", RegexOptions.Multiline), metrics);
        Assert.Matches(new Regex("^stargz_fallbacks_total\\{reason=\"registry_error\"\\} 0$", RegexOptions.Multiline), metrics);
        // Logged once per layer, with the reason.
        foreach (var (digest, _) in manifest)
        {
            var lines = rig.Daemon.Log.Split('\n').Where(l => l.Contains($"layer {digest} for ", StringComparison.Ordinal)
                && l.Contains("falling back to an ordinary snapshot (no_toc_digest)", StringComparison.Ordinal)).ToList();
            Assert.True(lines.Count >= 1, $"no fallback log line for {digest}:\n{rig.Daemon.Log}");
        }
    }

    [Fact]
    public async Task ALayerWhoseRegistryIsGoneShowsUnavailableSinceWithTheErrorThenServingAgain()
    {
        // Every Prepare checks the layers below it (check_always), so the outage is seen at the next container start.
        await using var rig = await OutageRig.StartAsync(extraToml: "check_always = true");
        var img = await rig.PushImageAsync("status/outage", new Dictionary<string, int> { ["a.bin"] = 128 }, seed: 3);
        await rig.RpullAsync(img.Estargz);
        await rig.StopRegistryAsync();
        var before = DateTime.UtcNow;
        var failed = await rig.RunAsync(img.Estargz, "status-outage", "true");
        Assert.NotEqual(0, failed.ExitCode);

        using (var doc = await StatusJsonAsync(rig.Daemon))
        {
            var down = doc.RootElement.GetProperty("layers").EnumerateArray()
                .Where(l => l.GetProperty("state").GetString() == "unavailable").ToList();
            Assert.NotEmpty(down);
            foreach (var l in down)
            {
                Assert.True(l.GetProperty("unavailableSince").GetDateTime().ToUniversalTime() >= before.AddSeconds(-1));
                Assert.False(string.IsNullOrEmpty(l.GetProperty("lastError").GetString()));
            }
        }

        await rig.StartRegistryAsync();
        (await rig.RunUntilItSucceedsAsync(img.Estargz, "status-back", "true", TimeSpan.FromSeconds(90))).EnsureSuccess("run after the registry is back");
        using var again = await StatusJsonAsync(rig.Daemon);
        foreach (var l in again.RootElement.GetProperty("layers").EnumerateArray())
        {
            Assert.Equal("serving", l.GetProperty("state").GetString());
            Assert.Equal(JsonValueKind.Null, l.GetProperty("unavailableSince").ValueKind);
        }
    }
}
