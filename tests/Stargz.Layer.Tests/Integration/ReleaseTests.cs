using System.Security.Cryptography;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// Release (the layer's snapshot was removed) frees the layer's cached chunks that no other mounted layer uses;
/// a plain unmount (shutdown) keeps them all. Two real layers in a real registry share one file's chunk.
/// </summary>
public class ReleaseTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static readonly byte[] Shared = TestTars.Random(150_000, 31);
    private static readonly byte[] OnlyA = TestTars.Random(120_000, 32);
    private static readonly byte[] OnlyB = TestTars.Random(130_000, 33);

    // One chunk per file (chunk size 1 MiB), so each file's chunk digest is the digest of its content.
    private static string KeyOf(byte[] content) => "sha256:" + Convert.ToHexStringLower(SHA256.HashData(content));

    private static async Task<(string MpA, string MpB)> MountTwoLayersSharingAChunkAsync(LayerRig rig)
    {
        var (blobA, builtA) = await LayerRig.BuildAsync(TestTars.Write(w =>
        {
            TestTars.File(w, "shared.bin", Shared);
            TestTars.File(w, "a.bin", OnlyA);
        }), null, Ct);
        var (blobB, builtB) = await LayerRig.BuildAsync(TestTars.Write(w =>
        {
            TestTars.File(w, "shared.bin", Shared);
            TestTars.File(w, "b.bin", OnlyB);
        }), null, Ct);
        var a = await rig.PushAsync("release/app", blobA, Ct);
        var b = await rig.PushAsync("release/app", blobB, Ct);
        Assert.NotEqual(a, b);
        var mpA = await rig.MountAsync(rig.Labels("release/app", a, builtA.TocDigest), Ct);
        var mpB = await rig.MountAsync(rig.Labels("release/app", b, builtB.TocDigest), Ct);
        Assert.Equal(Shared, await File.ReadAllBytesAsync(Path.Combine(mpA, "shared.bin"), Ct));
        Assert.Equal(OnlyA, await File.ReadAllBytesAsync(Path.Combine(mpA, "a.bin"), Ct));
        Assert.Equal(Shared, await File.ReadAllBytesAsync(Path.Combine(mpB, "shared.bin"), Ct));
        Assert.Equal(OnlyB, await File.ReadAllBytesAsync(Path.Combine(mpB, "b.bin"), Ct));
        // Reads are answered before the disk write: wait for the writes, then every chunk has its file.
        await rig.Manager.GetLayer(mpA)!.Fetcher.DrainAsync();
        await rig.Manager.GetLayer(mpB)!.Fetcher.DrainAsync();
        Assert.Contains(KeyOf(Shared), rig.Manager.GetLayer(mpA)!.ChunkKeys());
        Assert.Contains(KeyOf(Shared), rig.Manager.GetLayer(mpB)!.ChunkKeys());
        Assert.Contains(KeyOf(OnlyA), rig.Manager.GetLayer(mpA)!.ChunkKeys());
        Assert.Contains(KeyOf(OnlyB), rig.Manager.GetLayer(mpB)!.ChunkKeys());
        foreach (var c in new[] { Shared, OnlyA, OnlyB })
            Assert.True(File.Exists(rig.Manager.Cache.PathOf(KeyOf(c))), "every chunk read is on disk before the test goes on");
        return (mpA, mpB);
    }

    [Fact]
    public async Task ReleasingALayerRemovesItsOwnChunksButKeepsOnesAnotherMountedLayerUses()
    {
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var (mpA, mpB) = await MountTwoLayersSharingAChunkAsync(rig);
        var cache = rig.Manager.Cache;

        await rig.Manager.ReleaseAsync(mpA, Ct);

        Assert.DoesNotContain(Mounts.List(), m => m.MountPoint == mpA);
        Assert.Null(rig.Manager.GetLayer(mpA));
        await Assert.ThrowsAsync<InvalidOperationException>(() => rig.Manager.CheckAsync(mpA, new Dictionary<string, string>(), Ct));
        Assert.False(File.Exists(cache.PathOf(KeyOf(OnlyA))), "the released layer's own chunk must leave the disk cache");
        Assert.False(cache.Contains(KeyOf(OnlyA)), "nor stay in memory");
        Assert.True(File.Exists(cache.PathOf(KeyOf(Shared))), "a chunk the other mounted layer uses must stay");
        Assert.True(File.Exists(cache.PathOf(KeyOf(OnlyB))));

        // The other layer still reads right, the shared chunk from the cache (no registry request for it).
        rig.Proxy.ResetCounts();
        Assert.Equal(Shared, await File.ReadAllBytesAsync(Path.Combine(mpB, "shared.bin"), Ct));
        Assert.Equal(0, rig.Proxy.RangeRequests);
        Assert.Equal(OnlyB, await File.ReadAllBytesAsync(Path.Combine(mpB, "b.bin"), Ct));
        await rig.Manager.CheckAsync(mpB, new Dictionary<string, string>(), Ct);
        Assert.Single(rig.Manager.Layers);

        // Releasing the last user of the shared chunk frees it too.
        await rig.Manager.ReleaseAsync(mpB, Ct);
        Assert.False(File.Exists(cache.PathOf(KeyOf(Shared))));
        Assert.False(File.Exists(cache.PathOf(KeyOf(OnlyB))));
        Assert.Empty(rig.Manager.Layers);
        await Assert.ThrowsAsync<InvalidOperationException>(() => rig.Manager.ReleaseAsync(mpB, Ct));
    }

    [Fact]
    public async Task UnmountingKeepsEveryCachedChunkForTheNextStart()
    {
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var (mpA, mpB) = await MountTwoLayersSharingAChunkAsync(rig);
        var cache = rig.Manager.Cache;

        await rig.Manager.UnmountAsync(mpA, Ct);
        await rig.Manager.UnmountAsync(mpB, Ct);

        Assert.Empty(rig.Manager.Layers);
        foreach (var c in new[] { Shared, OnlyA, OnlyB })
            Assert.True(File.Exists(cache.PathOf(KeyOf(c))), "unmount (shutdown) must keep the cache");
    }

    [Fact]
    public void RemoveDropsAChunkFromMemoryAndDiskAndToleratesAMissingFile()
    {
        using var dir = new TempDir("layer-cache");
        using var cache = new ChunkCache(dir.Path, 1 << 20);
        var data = TestTars.Random(1000, 34);
        var key = KeyOf(data);
        cache.AddMemory(key, data);
        Assert.NotNull(cache.WriteDisk(key, data));
        Assert.NotNull(cache.TrustedPath(key));

        Assert.True(cache.Remove(key));
        Assert.False(File.Exists(cache.PathOf(key)));
        Assert.False(cache.Contains(key));
        Assert.Null(cache.TrustedPath(key));
        Assert.False(cache.Remove(key)); // already gone: no error
        Assert.False(cache.Remove("sha256:" + new string('0', 64))); // never cached, its dir does not exist

        using var memoryOnly = new ChunkCache(null, 1 << 20);
        memoryOnly.AddMemory(key, data);
        Assert.False(memoryOnly.Remove(key));
        Assert.False(memoryOnly.Contains(key));
    }
}
