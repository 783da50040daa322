using System.Security.Cryptography;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// 20 concurrent `ctr-remote image rpull` processes of one eStargz image against one containerd: all succeed, each
/// layer is mounted once, and no byte range of any blob is asked of the registry twice (a counting proxy sits between
/// the registry and everyone else).
/// </summary>
public class DuplicateTests
{
    [Fact]
    public async Task TwentyConcurrentRpullsMountEachLayerOnceAndFetchEachRangeOnce()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var l1 = rig.Work.Sub("dup-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("dup-l2");
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        var rng = new Random(20);
        for (int i = 0; i < 8; i++)
        {
            var b = new byte[1 << 20];
            rng.NextBytes(b);
            await File.WriteAllBytesAsync(Path.Combine(l2, "data", $"blob-{i}.bin"), b, ct);
        }
        await File.WriteAllTextAsync(Path.Combine(l2, "data", "message.txt"), "pulled twenty times\n", ct);
        var direct = await rig.PushEstargzAsync("e2e/dup", [l1, l2]);

        await using var proxy = new CountingProxy(rig.Registry.Host);
        var image = direct.Replace(rig.Registry.Host, proxy.Host, StringComparison.Ordinal);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, direct);

        var pulls = Enumerable.Range(0, 20).Select(_ => rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).ToList();
        var results = await Task.WhenAll(pulls);
        for (int i = 0; i < results.Length; i++) results[i].EnsureSuccess($"rpull #{i}");

        // Each layer mounted exactly once, and no layer blob went into containerd's content store.
        Assert.Equal(manifest.Count, rig.FuseMounts().Count);
        Assert.Equal(manifest.Count, (double)await rig.MetricAsync("stargz_layers_mounted"));
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);

        var output = await E2eHelpers.RunAsync(rig.Containerd, image, "dup-run", "/bin/sha256sum", "/data/message.txt", "/data/blob-3.bin");
        var want = string.Join("\n",
            $"{Sha(Path.Combine(l2, "data", "message.txt"))}  /data/message.txt",
            $"{Sha(Path.Combine(l2, "data", "blob-3.bin"))}  /data/blob-3.bin");
        Assert.Equal(want, output.Trim());

        // Each range of each layer blob was asked for once at most; layers were never downloaded whole.
        List<string> log;
        lock (proxy.Log) log = proxy.Log.ToList();
        var seen = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var line in log)
        {
            var parts = line.Split(' ', 3);
            if (parts[0] != "GET" || !parts[1].Contains("/blobs/", StringComparison.Ordinal)) continue;
            var blob = parts[1][(parts[1].LastIndexOf('/') + 1)..];
            if (!manifest.Any(l => l.Digest == blob)) continue;
            Assert.True(parts.Length == 3 && parts[2].StartsWith("bytes=", StringComparison.Ordinal), $"a layer blob was fetched whole: {line}");
            foreach (var r in parts[2]["bytes=".Length..].Split(',', StringSplitOptions.TrimEntries))
            {
                var key = blob + " " + r;
                seen[key] = seen.GetValueOrDefault(key) + 1;
            }
        }
        Assert.NotEmpty(seen);
        var twice = seen.Where(kv => kv.Value > 1).Select(kv => $"{kv.Key} x{kv.Value}").ToList();
        Assert.True(twice.Count == 0, "ranges fetched more than once: " + string.Join("; ", twice));
        var fetched = await rig.MetricAsync("stargz_layer_fetched_bytes");
        Assert.True(fetched <= manifest.Sum(l => l.Size), $"fetched {fetched} bytes, more than the blobs' {manifest.Sum(l => l.Size)}");
    }

    private static string Sha(string path) => Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(path)));
}
