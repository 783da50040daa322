using System.Diagnostics;
using Stargz.Estargz;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// TOCs kept on disk beside the chunk cache: after a restart a layer mounts again without asking the registry, so a
/// fully fetched layer keeps serving (and passes Check) while the registry is away.
/// </summary>
public class StoredTocTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static byte[] Tar(out Dictionary<string, byte[]> files)
    {
        var f = new Dictionary<string, byte[]>();
        for (var i = 0; i < 8; i++) f[$"f{i}.bin"] = TestTars.Random(200_000 + i * 1000, 40 + i);
        files = f;
        return TestTars.Write(w => { foreach (var (n, d) in f) TestTars.File(w, n, d); });
    }

    private static async Task WaitAllFetchedAsync(LayerRig rig, string mp)
    {
        var sw = Stopwatch.StartNew();
        while (rig.Manager.GetLayer(mp) is { AllChunksFetched: false })
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), "the background fetch did not finish within 60 s");
            await Task.Delay(50, Ct);
        }
        Assert.NotNull(rig.Manager.GetLayer(mp));
    }

    [Fact]
    public async Task AFullyFetchedLayerMountsReadsAndPassesCheckAfterARestartWithTheRegistryAway()
    {
        var tar = Tar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 64 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { BackgroundPause = TimeSpan.FromMilliseconds(1), FetchingTimeout = TimeSpan.FromSeconds(5) });
        var digest = await rig.PushAsync("stored/full", blob, Ct);
        var labels = rig.Labels("stored/full", digest, built.TocDigest);
        var mp = await rig.MountAsync(labels, Ct);
        await WaitAllFetchedAsync(rig, mp);
        Assert.Single(Directory.GetFiles(Path.Combine(rig.Dir.Path, "toc")));
        await rig.Manager.UnmountAsync(mp, Ct);

        rig.Proxy.Down();
        rig.Proxy.ResetCounts();
        await rig.RestartManagerAsync();
        var mp2 = await rig.MountAsync(labels, Ct);
        foreach (var (n, d) in files) Assert.Equal(d, await File.ReadAllBytesAsync(Path.Combine(mp2, n), Ct));
        await WaitAllFetchedAsync(rig, mp2);
        await rig.Manager.CheckAsync(mp2, labels, Ct);
        Assert.Equal(0, rig.Proxy.Requests);

        // A TOC that does not match the layer's label is still refused (the stored one is only a cache of the registry's).
        var wrong = new Dictionary<string, string>(labels) { [SnapshotLabels.TocDigest] = "sha256:" + new string('0', 64) };
        var e = await Assert.ThrowsAsync<LayerResolveException>(() => rig.MountAsync(wrong, Ct));
        Assert.Contains("does not match the label", e.Message);

        // Removing the snapshot (release) drops the stored TOC with the chunks.
        await rig.Manager.ReleaseAsync(mp2, Ct);
        Assert.Empty(Directory.GetFiles(Path.Combine(rig.Dir.Path, "toc")));
    }

    [Fact]
    public async Task APartlyFetchedLayerMountsOfflineServesItsCachedFilesAndFailsTheRestWithEioUntilTheRegistryReturns()
    {
        var tar = Tar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 64 << 10, CompressionLevel = 1 }, Ct);
        var timeout = TimeSpan.FromSeconds(5);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true, FetchingTimeout = timeout });
        var digest = await rig.PushAsync("stored/part", blob, Ct);
        var labels = rig.Labels("stored/part", digest, built.TocDigest);
        var mp = await rig.MountAsync(labels, Ct);
        Assert.Equal(files["f0.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f0.bin"), Ct));
        await rig.Manager.UnmountAsync(mp, Ct);

        rig.Proxy.Down();
        await rig.RestartManagerAsync();
        var mp2 = await rig.MountAsync(labels, Ct);
        Assert.Equal(files["f0.bin"], await File.ReadAllBytesAsync(Path.Combine(mp2, "f0.bin"), Ct));
        Assert.ThrowsAny<IOException>(() => File.ReadAllBytes(Path.Combine(mp2, "f5.bin")));
        // Not every chunk is here, so Check asks the registry, which is away.
        await Assert.ThrowsAnyAsync<Exception>(() => rig.Manager.CheckAsync(mp2, labels, Ct));

        rig.Proxy.Up();
        Assert.Equal(files["f5.bin"], await File.ReadAllBytesAsync(Path.Combine(mp2, "f5.bin"), Ct));
        await rig.Manager.CheckAsync(mp2, labels, Ct);
    }

    [Fact]
    public async Task ADamagedStoredTocIsDroppedAndFetchedFromTheRegistryAgain()
    {
        var tar = Tar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 64 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var digest = await rig.PushAsync("stored/damaged", blob, Ct);
        var labels = rig.Labels("stored/damaged", digest, built.TocDigest);
        await rig.Manager.UnmountAsync(await rig.MountAsync(labels, Ct), Ct);
        var stored = Directory.GetFiles(Path.Combine(rig.Dir.Path, "toc")).Single();
        var bytes = await File.ReadAllBytesAsync(stored, Ct);
        bytes[^10] ^= 0x20; // inside the TOC JSON
        await File.WriteAllBytesAsync(stored, bytes, Ct);

        await rig.RestartManagerAsync();
        rig.Proxy.ResetCounts();
        var mp = await rig.MountAsync(labels, Ct);
        Assert.True(rig.Proxy.RangeRequests >= 1, "the TOC was not fetched from the registry again");
        Assert.Equal(files["f3.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f3.bin"), Ct));
        Assert.NotEqual(bytes, await File.ReadAllBytesAsync(stored, Ct)); // stored again, intact
    }
}
