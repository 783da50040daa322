using System.Security.Cryptography;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>What a user of `ctr-remote image rpull` sees: remote snapshots, no layer download, a container that runs.</summary>
public class LazyPullTests
{
    [Fact]
    public async Task RpullOfEstargzImageMountsLayersLazilyAndTheContainerRuns()
    {
        var ct = TestContext.Current.CancellationToken;
        // Background fetch off: it would go on pulling the rest of the image while we measure what the run needed
        // (it is tested on its own in the layer tests).
        await using var rig = await E2eRig.StartAsync("no_background_fetch = true\n");
        // ~200 MB image: interpreter, stdlib, dist-packages and 140 MB of data the run never reads.
        var layers = TestImages.WritePythonLayers(rig.Work.Path, dataMegabytes: 140);
        var image = await rig.PushEstargzAsync("e2e/python", layers);
        var manifest = await ManifestLayersAsync(rig, image);

        (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess("ctr-remote rpull");

        // Every layer is a FUSE mount of ours, and none of the layer blobs went into containerd's content store.
        Assert.Equal(manifest.Count, rig.FuseMounts().Count);
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);

        var run = await rig.Containerd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, "lazy-run",
            "/usr/bin/python3", "-c", "import json, hashlib; print(json.dumps({'sha': hashlib.sha256(open('/data/message.txt','rb').read()).hexdigest()}))");
        run.EnsureSuccess("ctr run on the lazily pulled image");
        var expected = Convert.ToHexStringLower(SHA256.HashData(await File.ReadAllBytesAsync(Path.Combine(layers[2], "data", "message.txt"), ct)));
        Assert.Equal($"{{\"sha\": \"{expected}\"}}", run.StdOut.Trim());

        // Bytes fetched so far are a small part of the image (the 140 MB of data were never read).
        var total = manifest.Sum(l => l.Size);
        var fetched = await rig.MetricAsync("stargz_layer_fetched_bytes");
        Assert.True(fetched > 0, "nothing fetched: the container's files did not come through our layers");
        Assert.True(fetched < total * 0.2, $"fetched {fetched} of {total} bytes: not lazy");
    }

    internal static Task<List<(string Digest, long Size)>> ManifestLayersAsync(E2eRig rig, string image)
    {
        // HOST/REPO:TAG -> the manifest as the registry serves it (what containerd will be told about).
        var slash = image.IndexOf('/');
        var colon = image.LastIndexOf(':');
        return DaemonMetrics.ManifestLayersAsync(rig.Registry.Host, image[(slash + 1)..colon], image[(colon + 1)..]);
    }
}
