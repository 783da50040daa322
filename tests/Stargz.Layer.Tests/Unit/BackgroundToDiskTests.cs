using System.Runtime.CompilerServices;
using Stargz.Estargz;
using Stargz.Layer;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

/// <summary>
/// The background fetch with a disk cache writes chunks to disk from a pooled buffer and keeps no array of them, while
/// a reader that joins one of its claims still gets the bytes (single-flight), and failures still reach that reader.
/// </summary>
public class BackgroundToDiskTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    /// <summary>Forty one-chunk files and one of three chunks, side by side.</summary>
    internal static (byte[] Blob, BlobBuilder B, LayerChunk[] All) ManyChunks(int files = 40, int size = 20_000)
    {
        var b = new BlobBuilder();
        for (var i = 0; i < files; i++) b.AddFile("f" + i, BlobBuilder.Random(size, 300 + i), size);
        b.AddFile("three", BlobBuilder.Random(3 * size, 299), size);
        var blob = b.Build();
        return (blob, b, b.ByBlobOffset());
    }

    private static Task BackgroundAsync(FetcherRig rig, LayerChunk[] all)
        => rig.Fetcher.FetchAllAsync(all, new StrongBox<int>(0), all.Length, FetchPriority.Background, TimeSpan.Zero, null, Ct);

    private static async Task WaitForAsync(Func<bool> condition)
    {
        while (!condition()) await Task.Delay(5, Ct);
    }

    private static void AssertEveryChunkOnDisk(FetcherRig rig, BlobBuilder b)
    {
        foreach (var (content, chunks) in b.Files.Values)
            foreach (var c in chunks)
                Assert.Equal(content.AsSpan((int)c.FileOffset, (int)c.Size).ToArray(), File.ReadAllBytes(rig.Cache.PathOf(c.Digest!)));
    }

    [Fact]
    public async Task TheBackgroundFetchWritesEveryChunkToDiskWithItsBytesAndKeepsNoneInMemory()
    {
        using var dir = new TempDir("bg-disk");
        var (blob, b, all) = ManyChunks();
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path, PrefetchChunkSize = 100_000 });
        await BackgroundAsync(rig, all);
        await rig.Fetcher.DrainAsync();
        AssertEveryChunkOnDisk(rig, b);
        foreach (var c in all) Assert.False(rig.Cache.TryPeekMemory(c.Digest!, out _), "a background chunk was kept in memory");
        Assert.Equal(all.Length, rig.Stats.ChunksFetched);
        Assert.Equal(0, rig.Fetcher.InflightCount);
        // A reader now reads them from disk: nothing more from the registry.
        var calls = rig.Blob.Calls;
        var (content, chunks) = b.Files["three"];
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 7_000, Ct));
        Assert.Equal(calls, rig.Blob.Calls);
    }

    [Fact]
    public async Task AReaderThatJoinsABackgroundFetchGetsTheRightBytesFromThatOneFetch()
    {
        using var dir = new TempDir("bg-join");
        var (blob, b, all) = ManyChunks();
        // One batch for everything, held at the registry until the reader has joined it.
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path, PrefetchChunkSize = 16 << 20 });
        rig.Blob.GoDown();
        var background = BackgroundAsync(rig, all);
        await WaitForAsync(() => rig.Blob.Calls == 1);
        var (content, chunks) = b.Files["three"];
        var buffer = new byte[content.Length];
        // Joined by the time ReadAsync returns: the reader awaits the background fetch's claims.
        var read = rig.Fetcher.ReadAsync(chunks, content.Length, 0, buffer, Ct).AsTask();
        Assert.False(read.IsCompleted);
        rig.Blob.ComeBack();
        Assert.Equal(content.Length, await read);
        Assert.Equal(content, buffer);
        await background;
        await rig.Fetcher.DrainAsync();
        Assert.Equal(1, rig.Blob.Calls);
        AssertEveryChunkOnDisk(rig, b);
        Assert.Equal(0, rig.Fetcher.InflightCount);
    }

    [Fact]
    public async Task AReaderThatFindsABackgroundClaimClosedReadsTheChunkFromDisk()
    {
        using var dir = new TempDir("bg-closed");
        var (blob, b, all) = ManyChunks(files: 4);
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path });
        await BackgroundAsync(rig, all);
        await rig.Fetcher.DrainAsync();
        var (content, chunks) = b.Files["three"];
        // The moment a reader looked the chunk up just before the background fetch closed its claim: the claim it
        // finds is closed, completed without bytes, and still listed.
        var closed = new ChunkClaim();
        Assert.True(closed.TryClose());
        closed.TrySetResult(ChunkClaim.NoBytes);
        Assert.False(closed.TryJoin());
        rig.Cache.Inflight[chunks[1].Digest!] = closed;
        var calls = rig.Blob.Calls;
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, content.Length, Ct));
        Assert.Equal(calls, rig.Blob.Calls);
        Assert.False(rig.Cache.Inflight.ContainsKey(chunks[1].Digest!), "the closed claim was left listed");
    }

    [Fact]
    public void AJoinedClaimCannotBeClosedAndAClosedOneCannotBeJoined()
    {
        var joined = new ChunkClaim();
        Assert.True(joined.TryJoin());
        Assert.True(joined.TryJoin()); // a second reader joins too
        Assert.False(joined.TryClose());
        Assert.True(joined.IsJoined);
        var closed = new ChunkClaim();
        Assert.True(closed.TryClose());
        Assert.False(closed.TryJoin());
        Assert.False(closed.IsJoined);
    }

    [Fact]
    public async Task ABackgroundBatchThatGetsWrongBytesFailsTheReaderThatJoinedItWithEio()
    {
        using var dir = new TempDir("bg-bad");
        var (blob, b, all) = ManyChunks();
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path, PrefetchChunkSize = 16 << 20 });
        rig.Blob.GoDown();
        var background = BackgroundAsync(rig, all);
        await WaitForAsync(() => rig.Blob.Calls == 1);
        var (content, chunks) = b.Files["three"];
        var read = rig.Fetcher.ReadAsync(chunks, content.Length, 0, new byte[content.Length], Ct).AsTask();
        // The registry then serves other bytes for the middle chunk.
        var tampered = (byte[])blob.Clone();
        tampered[chunks[1].BlobOffset + chunks[1].BlobLength / 2] ^= 0xFF;
        rig.Blob.Bytes = tampered;
        rig.Blob.ComeBack();
        await Assert.ThrowsAsync<LayerIOException>(() => read);
        await Assert.ThrowsAsync<LayerIOException>(() => background);
        await rig.Fetcher.DrainAsync();
        Assert.False(File.Exists(rig.Cache.PathOf(chunks[1].Digest!)));
        Assert.Equal(0, rig.Fetcher.InflightCount);
        // The registry right again: the next read fetches the chunk anew.
        rig.Blob.Bytes = blob;
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, content.Length, Ct));
    }

    [Fact]
    public async Task UnmountDuringABackgroundBatchFailsTheReaderThatJoinedItWithEio()
    {
        using var dir = new TempDir("bg-unmount");
        var (blob, b, all) = ManyChunks();
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path, PrefetchChunkSize = 16 << 20 });
        rig.Blob.GoDown();
        var background = BackgroundAsync(rig, all);
        await WaitForAsync(() => rig.Blob.Calls == 1);
        var (content, chunks) = b.Files["three"];
        var read = rig.Fetcher.ReadAsync(chunks, content.Length, 0, new byte[content.Length], Ct).AsTask();
        rig.Fetcher.Dispose();
        await Assert.ThrowsAsync<LayerIOException>(() => read);
        await Assert.ThrowsAnyAsync<Exception>(() => background);
        await rig.Fetcher.DrainAsync();
        Assert.Equal(0, rig.Fetcher.InflightCount);
    }

    [Fact]
    public async Task WithSyncAddAJoinedReaderGetsItsBytesOnceTheChunkIsOnDisk()
    {
        using var dir = new TempDir("bg-sync");
        var (blob, b, all) = ManyChunks(files: 8);
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path, SyncAdd = true, PrefetchChunkSize = 16 << 20 });
        rig.Blob.GoDown();
        var background = BackgroundAsync(rig, all);
        await WaitForAsync(() => rig.Blob.Calls == 1);
        var (content, chunks) = b.Files["three"];
        var buffer = new byte[content.Length];
        var read = rig.Fetcher.ReadAsync(chunks, content.Length, 0, buffer, Ct).AsTask();
        rig.Blob.ComeBack();
        Assert.Equal(content.Length, await read);
        Assert.Equal(content, buffer);
        foreach (var c in chunks) Assert.True(File.Exists(rig.Cache.PathOf(c.Digest!)), "answered before its chunk was on disk");
        await background;
        AssertEveryChunkOnDisk(rig, b);
    }

    [Fact]
    public async Task WithoutADiskCacheTheBackgroundFetchStillKeepsChunksInMemory()
    {
        var (blob, b, all) = ManyChunks(files: 8);
        using var rig = new FetcherRig(blob, new LayerOptions { MemoryCacheBytes = 64 << 20 });
        await BackgroundAsync(rig, all);
        foreach (var (content, chunks) in b.Files.Values)
            foreach (var c in chunks)
            {
                Assert.True(rig.Cache.TryPeekMemory(c.Digest!, out var data));
                Assert.Equal(content.AsSpan((int)c.FileOffset, (int)c.Size).ToArray(), data);
            }
    }
}

[CollectionDefinition(nameof(AllocationCollection), DisableParallelization = true)]
public sealed class AllocationCollection;

/// <summary>
/// What the background fetch allocates, counted over the whole process (its work runs on pool threads), so these run
/// alone: another test's allocations would be counted too.
/// </summary>
[Collection(nameof(AllocationCollection))]
public class BackgroundFetchAllocationTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private const int Chunks = 64, ChunkBytes = 1 << 20;

    /// <summary>
    /// 64 chunks of 1 MiB that compress well (a random 4 KiB block repeated), so the compressed batch buffers are small
    /// and what is counted is the chunks' own memory.
    /// </summary>
    private static (byte[] Blob, BlobBuilder B, LayerChunk[] All) Compressible()
    {
        var b = new BlobBuilder();
        for (var i = 0; i < Chunks; i++)
        {
            var block = BlobBuilder.Random(4096, 500 + i);
            var content = new byte[ChunkBytes];
            for (var o = 0; o < content.Length; o += block.Length) block.CopyTo(content, o);
            b.AddFile("f" + i, content, ChunkBytes);
        }
        return (b.Build(), b, b.ByBlobOffset());
    }

    private static async Task<long> AllocatedDuringAsync(Func<Task> work)
    {
        var before = GC.GetTotalAllocatedBytes(precise: true);
        await work();
        return GC.GetTotalAllocatedBytes(precise: true) - before;
    }

    [Fact]
    public async Task TheBackgroundFetchToDiskAllocatesFarLessThanTheChunksItWrites()
    {
        using var dir = new TempDir("bg-alloc");
        var (blob, b, all) = Compressible();
        var options = new LayerOptions { CacheDirectory = dir.Path, DurableDiskWrites = false, PrefetchChunkSize = 64 << 10 };
        using var rig = new FetcherRig(blob, options, decoder: new EstargzChunkDecoder(BlobCompression.Gzip));
        var allocated = await AllocatedDuringAsync(async () =>
        {
            await rig.Fetcher.FetchAllAsync(all, new StrongBox<int>(0), all.Length, FetchPriority.Background, TimeSpan.Zero, null, Ct);
            await rig.Fetcher.DrainAsync();
        });
        TestContext.Current.TestOutputHelper?.WriteLine($"background fetch of {Chunks} x {ChunkBytes >> 20} MiB: {allocated} bytes allocated");
        foreach (var (content, chunks) in b.Files.Values)
            Assert.Equal(content, File.ReadAllBytes(rig.Cache.PathOf(chunks[0].Digest!)));
        Assert.True(allocated < (long)Chunks * ChunkBytes / 4, $"{allocated} bytes allocated for {Chunks * ChunkBytes} chunk bytes");

        // A pass that finds most chunks on disk (and hashes them again, as a restarted process would) and fetches the
        // rest reads none of them into an array either.
        rig.Cache.ForgetTrust();
        for (var i = 0; i < all.Length; i += 4) File.Delete(rig.Cache.PathOf(all[i].Digest!));
        var calls = rig.Blob.Calls;
        allocated = await AllocatedDuringAsync(async () =>
        {
            await rig.Fetcher.FetchAllAsync(all, new StrongBox<int>(0), all.Length, FetchPriority.Background, TimeSpan.Zero, null, Ct);
            await rig.Fetcher.DrainAsync();
        });
        TestContext.Current.TestOutputHelper?.WriteLine($"second pass, 3/4 on disk: {allocated} bytes allocated");
        Assert.True(rig.Blob.Calls > calls);
        Assert.Equal(0, rig.Cache.DiskRejected);
        foreach (var (content, chunks) in b.Files.Values)
            Assert.Equal(content, File.ReadAllBytes(rig.Cache.PathOf(chunks[0].Digest!)));
        Assert.True(allocated < (long)Chunks * ChunkBytes / 4, $"{allocated} bytes allocated for {Chunks * ChunkBytes} chunk bytes");
    }
}
