using Stargz.Layer;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

public class ChunkCacheTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task AfterARestartCachedChunksAreServedWithZeroRegistryRequests()
    {
        using var dir = new TempDir("layer-cache");
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(200_000, 9), 64_000);
        var blob = b.Build();
        var (content, chunks) = b.Files["f"];
        var options = new LayerOptions { CacheDirectory = dir.Path };
        await FetcherRig.FillCacheAsync(blob, options, chunks, content, 100_000, Ct);
        using var second = new FetcherRig(blob, options); // a new cache over the same directory = a restarted daemon
        Assert.Equal(content, await second.ReadAllAsync(chunks, content.Length, 30_000, Ct));
        Assert.Equal(0, second.Blob.Calls);
        Assert.Equal(0, second.Cache.DiskRejected);
        Assert.Equal(chunks.Length, second.Cache.DiskHits);
    }

    [Fact]
    public async Task AChunkAlteredOnDiskIsNotServedAfterARestartButFetchedAgain()
    {
        using var dir = new TempDir("layer-cache");
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(100_000, 10), 50_000);
        var blob = b.Build();
        var (content, chunks) = b.Files["f"];
        var options = new LayerOptions { CacheDirectory = dir.Path };
        var path = (await FetcherRig.FillCacheAsync(blob, options, chunks, content, content.Length, Ct))[1];
        var onDisk = await File.ReadAllBytesAsync(path, Ct);
        onDisk[17] ^= 1;
        await File.WriteAllBytesAsync(path, onDisk, Ct);
        using var second = new FetcherRig(blob, options);
        Assert.Equal(content, await second.ReadAllAsync(chunks, content.Length, content.Length, Ct));
        Assert.Equal(1, second.Cache.DiskRejected);
        Assert.Equal(1, second.Blob.Calls); // only the altered chunk came from the registry
        await second.Fetcher.DrainAsync();
        Assert.Equal(content.AsSpan(50_000).ToArray(), await File.ReadAllBytesAsync(path, Ct)); // and was rewritten
    }

    [Fact]
    public async Task ATruncatedDiskChunkIsDropped()
    {
        using var dir = new TempDir("layer-cache");
        var data = BlobBuilder.Random(10_000, 11);
        var digest = Digest.Sha256Of(data).ToString();
        using (var c = new ChunkCache(dir.Path, 1 << 20)) c.WriteDisk(digest, data);
        using var cache = new ChunkCache(dir.Path, 1 << 20);
        var path = cache.PathOf(digest);
        await File.WriteAllBytesAsync(path, data.AsSpan(0, 5000).ToArray(), Ct);
        Assert.Null(await cache.TryGetAsync(digest, digest, data.Length, true, Ct));
        Assert.False(File.Exists(path));
    }

    [Fact]
    public void UnfinishedWritesLeftByACrashAreRemovedAndNeverVisible()
    {
        using var dir = new TempDir("layer-cache");
        using (new ChunkCache(dir.Path, 1 << 20)) { }
        var leftover = Path.Combine(dir.Path, "tmp", "0123");
        File.WriteAllBytes(leftover, [1, 2, 3]);
        using var cache = new ChunkCache(dir.Path, 1 << 20);
        Assert.False(File.Exists(leftover));
        Assert.Empty(Directory.GetFiles(Path.Combine(dir.Path, "chunks"), "*", SearchOption.AllDirectories));
    }

    [Fact]
    public async Task AChunkSharedByTwoLayersIsFetchedAndStoredOnce()
    {
        using var dir = new TempDir("layer-cache");
        var shared = BlobBuilder.Random(60_000, 12);
        var b1 = new BlobBuilder().AddFile("x", shared, 60_000);
        var b2 = new BlobBuilder().AddFile("pad", BlobBuilder.Random(5000, 13), 60_000).AddFile("y", shared, 60_000);
        var options = new LayerOptions { CacheDirectory = dir.Path };
        using var cache = new ChunkCache(dir.Path, 1 << 20);
        using var l1 = new FetcherRig(b1.Build(), options, cache, "sha256:l1");
        using var l2 = new FetcherRig(b2.Build(), options, cache, "sha256:l2");
        Assert.Equal(shared, await l1.ReadAllAsync(b1.Files["x"].Chunks, shared.Length, shared.Length, Ct));
        await l1.Fetcher.DrainAsync();
        Assert.Equal(shared, await l2.ReadAllAsync(b2.Files["y"].Chunks, shared.Length, shared.Length, Ct));
        Assert.Equal(1, l1.Blob.Calls);
        Assert.Equal(0, l2.Blob.Calls);
        Assert.Single(Directory.GetFiles(Path.Combine(dir.Path, "chunks"), "*", SearchOption.AllDirectories));
    }

    [Fact]
    public void MemoryStaysWithinItsBound()
    {
        using var cache = new ChunkCache(null, 100_000);
        for (var i = 0; i < 20; i++)
        {
            var d = BlobBuilder.Random(30_000, 20 + i);
            cache.AddMemory(Digest.Sha256Of(d).ToString(), d);
        }
        long held = 0;
        for (var i = 0; i < 20; i++)
        {
            var d = BlobBuilder.Random(30_000, 20 + i);
            if (cache.TryGetMemory(Digest.Sha256Of(d).ToString(), out var got)) { held += got.Length; Assert.Equal(d, got); }
        }
        Assert.InRange(held, 30_000, 100_000);
    }

    [Fact]
    public async Task WithVerificationOffChunksAreKeptPerLayer()
    {
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(50_000, 14), 20_000);
        var (content, chunks) = b.Files["f"];
        var noDigest = Array.ConvertAll(chunks, c => c with { Digest = null });
        using var rig = new FetcherRig(b.Build(), new LayerOptions { DisableVerification = true });
        Assert.Equal(content, await rig.ReadAllAsync(noDigest, content.Length, 7000, Ct));
        Assert.Equal(noDigest.Length, rig.Stats.Snapshot().ChunksFetched);
        // With verification on, a chunk without a digest is refused.
        using var strict = new FetcherRig(b.Build());
        await Assert.ThrowsAsync<LayerIOException>(() => strict.Fetcher.ReadAsync(noDigest, content.Length, 0, new byte[10], Ct).AsTask());
        // Also when only a later chunk of the read lacks its digest and the first one is cached.
        var mixed = (LayerChunk[])chunks.Clone();
        mixed[1] = mixed[1] with { Digest = null };
        Assert.Equal(10, await strict.Fetcher.ReadAsync(mixed, content.Length, 0, new byte[10], Ct));
        var buf = new byte[30_000];
        await Assert.ThrowsAsync<LayerIOException>(() => strict.Fetcher.ReadAsync(mixed, content.Length, 0, buf, Ct).AsTask());
    }

    [Fact]
    public async Task TwoLayersReadingTheSameChunkAtOnceFetchItOnce()
    {
        var shared = BlobBuilder.Random(60_000, 15);
        var b1 = new BlobBuilder().AddFile("x", shared, 60_000);
        var b2 = new BlobBuilder().AddFile("pad", BlobBuilder.Random(5000, 16), 60_000).AddFile("y", shared, 60_000);
        using var cache = new ChunkCache(null, 1 << 20);
        using var l1 = new FetcherRig(b1.Build(), null, cache, "sha256:l1");
        using var l2 = new FetcherRig(b2.Build(), null, cache, "sha256:l2");
        l1.Blob.GoDown();
        l2.Blob.GoDown();
        var r1 = l1.ReadAllAsync(b1.Files["x"].Chunks, shared.Length, shared.Length, Ct);
        while (l1.Blob.Calls == 0) await Task.Delay(5, Ct);
        var r2 = l2.ReadAllAsync(b2.Files["y"].Chunks, shared.Length, shared.Length, Ct);
        await Task.Delay(50, Ct);
        l1.Blob.ComeBack();
        l2.Blob.ComeBack();
        Assert.Equal(shared, await r1);
        Assert.Equal(shared, await r2);
        Assert.Equal(1, l1.Blob.Calls + l2.Blob.Calls);
    }

    [Fact]
    public void TheMemoryCacheHoldsNoMoreThanMaxLruCacheEntryChunksNorItsByteCap()
    {
        static int Held(ChunkCache c, int n)
        {
            var held = 0;
            for (var i = 0; i < n; i++) if (c.TryGetMemory($"k{i}", out _)) held++;
            return held;
        }
        using (var byCount = new ChunkCache(null, 1 << 20, memoryEntries: 4))
        {
            for (var i = 0; i < 10; i++) byCount.AddMemory($"k{i}", new byte[1_000]);
            Assert.InRange(Held(byCount, 10), 1, 4);
        }
        using var byBytes = new ChunkCache(null, 10_000, memoryEntries: 100);
        for (var i = 0; i < 10; i++) byBytes.AddMemory($"k{i}", new byte[4_000]);
        Assert.InRange(Held(byBytes, 10), 1, 2);
    }

    [Fact]
    public async Task WithDirectChunksReadBackFromDiskAreNotKeptInMemory()
    {
        using var dir = new TempDir("layer-cache");
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(200_000, 9), 64_000);
        var blob = b.Build();
        var (content, chunks) = b.Files["f"];
        var options = new LayerOptions { CacheDirectory = dir.Path, DirectDiskReads = true };
        await FetcherRig.FillCacheAsync(blob, options, chunks, content, 100_000, Ct);
        using var second = new FetcherRig(blob, options);
        Assert.Equal(content, await second.ReadAllAsync(chunks, content.Length, 30_000, Ct));
        Assert.Equal(content, await second.ReadAllAsync(chunks, content.Length, 30_000, Ct));
        Assert.Equal(0, second.Blob.Calls);
        Assert.Equal(0, second.Cache.MemoryHits);
        Assert.True(second.Cache.DiskHits >= 2 * chunks.Length, $"{second.Cache.DiskHits} disk hits");
    }

    [Fact]
    public async Task WithSyncAddAReadIsAnsweredOnlyOnceItsChunkIsOnDisk()
    {
        using var dir = new TempDir("layer-cache");
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(100_000, 11), 100_000);
        var blob = b.Build();
        var (content, chunks) = b.Files["f"];
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path, SyncAdd = true });
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 100_000, Ct));
        // No drain: with sync_add the chunk file exists as soon as the read returned.
        Assert.Single(Directory.EnumerateFiles(Path.Combine(dir.Path, "chunks"), "*", SearchOption.AllDirectories));
    }
}
