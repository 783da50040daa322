using System.Net.Http;
using System.Text.Json;
using System.Text.RegularExpressions;
using Stargz.Estargz;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>Bytes of a layer blob changed inside the registry after the pull.</summary>
public class TamperTests
{
    [Fact]
    public async Task FlippedBytesInTheRegistryBlobGiveEioForThatFileOnlyAndTheDaemonStaysHealthy()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await OutageRig.StartAsync();
        var img = await rig.PushImageAsync("tamper/img", new Dictionary<string, int> { ["victim.bin"] = 512, ["intact.bin"] = 512 }, seed: 901);
        await rig.RpullAsync(img.Estargz);

        // The data layer's blob file in the registry's storage, and where victim.bin's compressed bytes are in it.
        var layers = await ManifestLayerDigestsAsync(rig.RegistryHost, "tamper/img", "esgz", ct);
        Assert.Equal(2, layers.Count);
        var hex = layers[1]["sha256:".Length..];
        var blobPath = Path.Combine(rig.RegistryStorage, "docker/registry/v2/blobs/sha256", hex[..2], hex, "data");
        Assert.True(File.Exists(blobPath), blobPath);
        long offset, length;
        using (var source = new FileBlobSource(blobPath))
        {
            var reader = await EstargzReader.OpenAsync(source, ct: ct);
            var node = reader.Lookup("data/victim.bin") ?? throw new InvalidOperationException("data/victim.bin not in the TOC");
            Assert.Single(node.Chunks);
            offset = node.Chunks[0].BlobOffset;
            length = node.Chunks[0].BlobLength;
        }
        Assert.True(length > 1024, $"victim.bin's member is only {length} bytes");
        await using (var fs = new FileStream(blobPath, FileMode.Open, FileAccess.ReadWrite))
        {
            var at = offset + length / 2;
            var buf = new byte[16];
            fs.Position = at;
            await fs.ReadExactlyAsync(buf, ct);
            for (var i = 0; i < buf.Length; i++) buf[i] ^= 0xFF;
            fs.Position = at;
            await fs.WriteAsync(buf, ct);
        }

        // The tampered file fails with EIO, every time; no hash of wrong bytes is ever printed.
        for (var attempt = 0; attempt < 2; attempt++)
        {
            var sum = await rig.RunAsync(img.Estargz, $"victim-{attempt}", "sha256sum /data/victim.bin");
            Assert.NotEqual(0, sum.ExitCode);
            Assert.DoesNotMatch(new Regex("[0-9a-f]{64}"), sum.StdOut);
            var cat = await rig.RunAsync(img.Estargz, $"victim-cat-{attempt}", "cat /data/victim.bin > /dev/null");
            Assert.NotEqual(0, cat.ExitCode);
            Assert.Contains("Input/output error", cat.StdOut + cat.StdErr);
            // Not even the bytes before the flipped ones: a chunk is served only whole and verified.
            var head = await rig.RunAsync(img.Estargz, $"victim-head-{attempt}", "head -c 4096 /data/victim.bin > /tmp/head");
            Assert.NotEqual(0, head.ExitCode);
        }
        Assert.True(await rig.MetricAsync("stargz_layer_errors") > 0, "the bad chunk was not counted as a layer error");

        // Other files of the same layer read fine.
        Assert.Equal(img.Sha256["intact.bin"], await rig.Sha256InContainerAsync(img.Estargz, "intact", "intact.bin"));

        // The daemon is healthy: still running, and a new pull and run of another image works.
        Assert.Null(rig.Daemon.ExitCode);
        await rig.PlainPullAsync(img.Plain);
        Assert.Equal(img.Sha256["victim.bin"], await rig.Sha256InContainerAsync(img.Plain, "plain", "victim.bin"));
        Assert.Null(rig.Daemon.ExitCode);
    }

    private static async Task<List<string>> ManifestLayerDigestsAsync(string host, string repo, string tag, CancellationToken ct)
    {
        using var http = new HttpClient();
        using var req = new HttpRequestMessage(HttpMethod.Get, $"http://{host}/v2/{repo}/manifests/{tag}");
        req.Headers.Accept.ParseAdd("application/vnd.oci.image.manifest.v1+json");
        using var resp = await http.SendAsync(req, ct);
        resp.EnsureSuccessStatusCode();
        using var doc = JsonDocument.Parse(await resp.Content.ReadAsStringAsync(ct));
        return doc.RootElement.GetProperty("layers").EnumerateArray().Select(l => l.GetProperty("digest").GetString()!).ToList();
    }
}
