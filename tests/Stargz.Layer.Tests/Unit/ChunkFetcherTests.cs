using System.Diagnostics;
using Stargz.Layer;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

public class ChunkFetcherTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static (byte[] Blob, BlobBuilder B) TwoFiles()
    {
        var b = new BlobBuilder()
            .AddFile("big", BlobBuilder.Random(300_000, 1), 50_000)
            .AddFile("small", BlobBuilder.Random(1_000, 2), 50_000)
            .AddFile("packed", BlobBuilder.Random(120_000, 3), 40_000);
        b.AddFileOneMember("inner", BlobBuilder.Random(100_000, 4), 30_000);
        return (b.Build(), b);
    }

    [Fact]
    public async Task EveryReadReturnsTheOriginalBytesWhateverTheOffsetAndLength()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob);
        var rnd = new Random(7);
        foreach (var (name, (content, chunks)) in b.Files)
        {
            Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 4096 + rnd.Next(70_000), Ct));
            for (var i = 0; i < 30; i++)
            {
                var off = rnd.Next(content.Length);
                var buf = new byte[rnd.Next(1, 90_000)];
                var n = await rig.Fetcher.ReadAsync(chunks, content.Length, off, buf, Ct);
                Assert.Equal(Math.Min(buf.Length, content.Length - off), n);
                Assert.True(content.AsSpan(off, n).SequenceEqual(buf.AsSpan(0, n)), $"{name} @{off}+{n}");
            }
            Assert.Equal(0, await rig.Fetcher.ReadAsync(chunks, content.Length, content.Length, new byte[10], Ct));
        }
        // Each chunk came from the registry once; everything after was a cache hit.
        var total = 0;
        foreach (var f in b.Files.Values) total += f.Chunks.Length;
        Assert.Equal(total, rig.Stats.Snapshot().ChunksFetched);
        Assert.True(rig.Stats.Snapshot().CacheHits > 0);
    }

    [Fact]
    public async Task AReadSpanningNeighbouringChunksIsOneRangeRequest()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob);
        var (content, chunks) = b.Files["big"];
        var buf = new byte[170_000]; // chunks 0..3 of 50 000 bytes, from offset 10 000
        Assert.Equal(buf.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 10_000, buf, Ct));
        Assert.True(content.AsSpan(10_000, buf.Length).SequenceEqual(buf));
        Assert.Equal(1, rig.Blob.Calls);
        Assert.Equal(1, rig.Blob.Ranges);
        Assert.Equal(4, rig.Stats.Snapshot().ChunksFetched);
        Assert.Equal(chunks[3].BlobEnd - chunks[0].BlobOffset, rig.Stats.Snapshot().FetchedBytes);
    }

    [Fact]
    public async Task ScatteredMissingChunksGoAsOneMultiRangeRequest()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob, new LayerOptions { MergeGapBytes = 0 });
        var (content, chunks) = b.Files["big"];
        // Cache chunk 1 and 3 first, then read chunks 0..4: the missing 0, 2, 4 are not neighbours.
        await rig.Fetcher.ReadAsync(chunks, content.Length, 50_000, new byte[10], Ct);
        await rig.Fetcher.ReadAsync(chunks, content.Length, 150_000, new byte[10], Ct);
        Assert.Equal(2, rig.Blob.Calls);
        var buf = new byte[250_000];
        Assert.Equal(buf.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
        Assert.True(content.AsSpan(0, buf.Length).SequenceEqual(buf));
        Assert.Equal(3, rig.Blob.Calls);
        Assert.Equal(2 + 3, rig.Blob.Ranges);
    }

    [Fact]
    public async Task ChunksSharingOneCompressedMemberAreFetchedOnce()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob);
        var (content, chunks) = b.Files["inner"];
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, content.Length, Ct));
        Assert.Equal(1, rig.Blob.Calls);
        Assert.Equal(1, rig.Blob.Ranges);
        Assert.Equal(chunks[0].BlobLength, rig.Stats.Snapshot().FetchedBytes);
    }

    [Fact]
    public async Task FiftyParallelReadersOfOneChunkCauseOneFetch()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob, new LayerOptions { MaxConcurrency = 8 });
        rig.Blob.GoDown(); // hold the first fetch until every reader has arrived
        var (content, chunks) = b.Files["big"];
        var readers = new Task<byte[]>[50];
        for (var i = 0; i < readers.Length; i++)
        {
            var off = 100_000 + i * 7;
            readers[i] = Task.Run(async () =>
            {
                var buf = new byte[1000];
                var n = await rig.Fetcher.ReadAsync(chunks, content.Length, off, buf, Ct);
                return buf.AsSpan(0, n).ToArray();
            }, Ct);
        }
        while (rig.Blob.Calls == 0) await Task.Delay(5, Ct);
        await Task.Delay(100, Ct);
        rig.Blob.ComeBack();
        var results = await Task.WhenAll(readers);
        for (var i = 0; i < results.Length; i++)
            Assert.True(content.AsSpan(100_000 + i * 7, 1000).SequenceEqual(results[i]));
        Assert.Equal(1, rig.Blob.Calls);
        Assert.Equal(1, rig.Stats.Snapshot().ChunksFetched);
    }

    [Fact]
    public async Task ARegistryServingOtherBytesGivesEioAndNeverTheWrongBytes()
    {
        // Two chunks with equal compressed length but different content: swap one for the other in the blob,
        // so the member decompresses fine and only the digest can tell.
        var a = new byte[40_000];
        var z = new byte[40_000];
        Array.Fill(a, (byte)'a');
        Array.Fill(z, (byte)'z');
        var b = new BlobBuilder { Stored = true }.AddFile("a", a, 40_000).AddFile("z", z, 40_000);
        var blob = b.Build();
        var ca = b.Files["a"].Chunks[0];
        var cz = b.Files["z"].Chunks[0];
        Assert.Equal(ca.BlobLength, cz.BlobLength);
        Array.Copy(blob, cz.BlobOffset, blob, ca.BlobOffset, ca.BlobLength);
        using var rig = new FetcherRig(blob);
        var buf = new byte[100];
        var e = await Assert.ThrowsAsync<LayerIOException>(() => rig.Fetcher.ReadAsync(b.Files["a"].Chunks, a.Length, 0, buf, Ct).AsTask());
        Assert.Contains("digest", e.Message);
        Assert.All(buf, x => Assert.Equal(0, x));
        Assert.Equal(0, rig.Stats.Snapshot().ChunksFetched);
        Assert.Equal(1, rig.Stats.Snapshot().Errors);
        // Nothing was cached: the next read asks again (and fails again).
        await Assert.ThrowsAsync<LayerIOException>(() => rig.Fetcher.ReadAsync(b.Files["a"].Chunks, a.Length, 0, buf, Ct).AsTask());
        Assert.Equal(2, rig.Blob.Calls);
        // The untouched file still reads fine.
        Assert.Equal(z, await rig.ReadAllAsync(b.Files["z"].Chunks, z.Length, z.Length, Ct));
    }

    [Fact]
    public async Task AFlippedCompressedByteGivesEio()
    {
        var (blob, b) = TwoFiles();
        var (content, chunks) = b.Files["small"];
        blob[chunks[0].BlobOffset + chunks[0].BlobLength / 2] ^= 0x40;
        using var rig = new FetcherRig(blob);
        var buf = new byte[content.Length];
        await Assert.ThrowsAsync<LayerIOException>(() => rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct).AsTask());
        Assert.False(content.AsSpan().SequenceEqual(buf));
    }

    [Fact]
    public async Task AnUnreachableRegistryGivesEioWithinTheTimeoutAndTheLayerRecovers()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob, new LayerOptions { FetchingTimeout = TimeSpan.FromSeconds(2) });
        var (content, chunks) = b.Files["big"];
        var buf = new byte[1000];
        await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct); // chunk 0 cached
        rig.Blob.GoDown();
        var sw = Stopwatch.StartNew();
        var e = await Assert.ThrowsAsync<LayerIOException>(() => rig.Fetcher.ReadAsync(chunks, content.Length, 200_000, buf, Ct).AsTask());
        sw.Stop();
        Assert.Contains("within", e.Message);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"EIO only after {sw.Elapsed}");
        // Cached data keeps working while the registry is away.
        Assert.Equal(1000, await rig.Fetcher.ReadAsync(chunks, content.Length, 10, buf, Ct));
        Assert.True(content.AsSpan(10, 1000).SequenceEqual(buf));
        rig.Blob.ComeBack();
        Assert.Equal(1000, await rig.Fetcher.ReadAsync(chunks, content.Length, 200_000, buf, Ct));
        Assert.True(content.AsSpan(200_000, 1000).SequenceEqual(buf));
        await rig.Fetcher.DrainAsync();
        Assert.Equal(0, rig.Fetcher.InflightCount); // nothing left claimed by the failed fetch
    }

    [Fact]
    public async Task ASlowFetchThatKeepsReceivingIsNotCutByTheFetchingTimeout()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob, new LayerOptions { FetchingTimeout = TimeSpan.FromSeconds(1) });
        // Three times the fetching timeout in all, never half of it without a byte.
        rig.Blob.DribbleSteps = 15;
        rig.Blob.DribbleStep = TimeSpan.FromMilliseconds(200);
        var (content, chunks) = b.Files["big"];
        var buf = new byte[1000];
        Assert.Equal(1000, await rig.Fetcher.ReadAsync(chunks, content.Length, 200_000, buf, Ct));
        Assert.True(content.AsSpan(200_000, 1000).SequenceEqual(buf));
    }

    [Fact]
    public async Task AnInterruptedReaderDoesNotFailTheOthersWaitingForTheSameChunk()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob);
        var (content, chunks) = b.Files["big"];
        rig.Blob.GoDown();
        using var interrupt = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        var first = rig.Fetcher.ReadAsync(chunks, content.Length, 0, new byte[100], interrupt.Token).AsTask();
        while (rig.Blob.Calls == 0) await Task.Delay(5, Ct);
        var buf = new byte[100];
        var second = rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct).AsTask();
        interrupt.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => first);
        rig.Blob.ComeBack();
        Assert.Equal(100, await second);
        Assert.True(content.AsSpan(0, 100).SequenceEqual(buf));
        Assert.Equal(1, rig.Blob.Calls);
    }

    [Fact]
    public async Task ReadsAfterUnmountFailWithEio()
    {
        var (blob, b) = TwoFiles();
        var rig = new FetcherRig(blob);
        var (content, chunks) = b.Files["big"];
        rig.Blob.GoDown();
        var pending = rig.Fetcher.ReadAsync(chunks, content.Length, 0, new byte[100], Ct).AsTask();
        while (rig.Blob.Calls == 0) await Task.Delay(5, Ct);
        rig.Dispose();
        await Assert.ThrowsAsync<LayerIOException>(() => pending);
    }

    [Fact]
    public async Task BackgroundFetchGivesWayToOnDemandReads()
    {
        var b = new BlobBuilder();
        for (var i = 0; i < 40; i++) b.AddFile("f" + i, BlobBuilder.Random(20_000, 100 + i), 20_000);
        var blob = b.Build();
        var all = new List<LayerChunk>();
        foreach (var f in b.Files.Values) all.AddRange(f.Chunks);
        all.Sort((x, y) => x.BlobOffset.CompareTo(y.BlobOffset));
        var arr = all.ToArray();
        using var rig = new FetcherRig(blob, new LayerOptions { MaxConcurrency = 1, PrefetchChunkSize = 30_000 });
        rig.Blob.Delay = TimeSpan.FromMilliseconds(50);
        var background = rig.Fetcher.FetchAllAsync(arr, new System.Runtime.CompilerServices.StrongBox<int>(0), arr.Length, FetchPriority.Background, TimeSpan.FromMilliseconds(10), null, Ct);
        while (rig.Blob.Calls < 2) await Task.Delay(5, Ct);
        var (content, chunks) = b.Files["f39"];
        var buf = new byte[content.Length];
        Assert.Equal(buf.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
        Assert.Equal(content, buf);
        Assert.False(background.IsCompleted, "the on-demand read waited for the whole background fetch");
        await background;
        // The last file was fetched exactly once: by the reader, not again by the background fetch.
        var last = chunks[0].BlobOffset;
        Assert.Single(rig.Blob.Log, l => l.Offset <= last && last < l.Offset + l.Length);
    }

    [Fact]
    public async Task UnsetConfigValuesMeanTheReferenceDefaultsNotZero()
    {
        var unset = new LayerOptions
        {
            FetchingTimeout = TimeSpan.Zero, PrefetchTimeout = TimeSpan.Zero, ResolveResultEntryTtl = TimeSpan.Zero,
            MaxConcurrency = 0, MemoryCacheBytes = 0,
        };
        var n = unset.Normalized();
        Assert.Equal(TimeSpan.FromSeconds(300), n.FetchingTimeout);
        Assert.Equal(TimeSpan.FromSeconds(10), n.PrefetchTimeout);
        Assert.Equal(TimeSpan.FromSeconds(120), n.ResolveResultEntryTtl);
        Assert.Equal(2, n.MaxConcurrency);
        // A fetcher given the raw zeros still reads (a zero timeout would fail every fetch at once).
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob, unset with { MemoryCacheBytes = 1 << 20 });
        var (content, chunks) = b.Files["small"];
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 4096, Ct));
    }

    [Fact]
    public async Task WithADiskCacheMemoryKeepsOneChunkOfTheReferencesSizeAndTheRestIsReadBackFromDisk()
    {
        // The defaults: 4 MiB beside a disk cache, which has every fetched chunk (and the kernel's page cache what
        // containers read); 16 MiB where memory is the only cache; a configured size wins either way.
        Assert.Equal(4L << 20, new LayerOptions { CacheDirectory = "/cache" }.Normalized().MemoryCacheBytes);
        Assert.Equal(16L << 20, new LayerOptions().Normalized().MemoryCacheBytes);
        Assert.Equal(1L << 20, new LayerOptions { CacheDirectory = "/cache", MemoryCacheBytes = 1 << 20 }.Normalized().MemoryCacheBytes);

        using var dir = new TempDir("memory-default");
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(12 << 20, 31), 1 << 20);
        var blob = b.Build();
        var (content, chunks) = b.Files["f"];
        using var rig = new FetcherRig(blob, new LayerOptions { CacheDirectory = dir.Path });
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 128 << 10, Ct));
        await rig.Fetcher.DrainAsync();
        long inMemory = 0;
        foreach (var c in chunks) if (rig.Cache.TryPeekMemory(rig.Fetcher.KeyOf(c), out var data)) inMemory += data.Length;
        Assert.InRange(inMemory, 1, 4L << 20); // 12 MiB were read
        // Read again: what left memory comes back from the disk cache, not from the registry.
        var calls = rig.Blob.Calls;
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 128 << 10, Ct));
        Assert.Equal(calls, rig.Blob.Calls);
    }

    [Fact]
    public async Task ACachedReadAllocatesNothing()
    {
        var (blob, b) = TwoFiles();
        using var rig = new FetcherRig(blob);
        var (content, chunks) = b.Files["big"];
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 128 << 10, Ct)); // everything cached
        var buf = new byte[128 << 10];
        for (var i = 0; i < 100; i++) ReadSync(rig, chunks, content.Length, i * 997, buf); // warm up
        var sw = new Stopwatch();
        var before = GC.GetAllocatedBytesForCurrentThread();
        sw.Start();
        long total = 0;
        for (var i = 0; i < 2000; i++) total += ReadSync(rig, chunks, content.Length, (i * 7919) % content.Length, buf);
        sw.Stop();
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        TestContext.Current.TestOutputHelper?.WriteLine($"cached reads: {total / sw.Elapsed.TotalSeconds / (1 << 20):0} MiB/s, {allocated} bytes allocated");
        Assert.True(total > 0);
        Assert.Equal(0, allocated);
    }

    private static int ReadSync(FetcherRig rig, LayerChunk[] chunks, long size, long offset, byte[] buf)
    {
        var t = rig.Fetcher.ReadAsync(chunks, size, offset, buf, CancellationToken.None);
        Assert.True(t.IsCompletedSuccessfully, "a cached read went asynchronous");
        return t.Result;
    }

    /// <summary>Sixty small files next to each other, as a language runtime's library is laid out.</summary>
    private static (byte[] Blob, BlobBuilder B) SmallFiles()
    {
        var b = new BlobBuilder { Stored = true };
        for (var i = 0; i < 60; i++) b.AddFile($"f{i:D2}", BlobBuilder.Random(1_000 + i * 37, 100 + i), 50_000);
        return (b.Build(), b);
    }

    /// <summary>Reads every file of <paramref name="b"/> whose first chunk is one of <paramref name="chunks"/>, checking its bytes.</summary>
    private static async Task ReadFilesStartingIn(FetcherRig rig, BlobBuilder b, LayerChunk[] chunks)
    {
        foreach (var (name, (fc, fch)) in b.Files)
        {
            if (!chunks.Contains(fch[0])) continue;
            var fb = new byte[fc.Length];
            Assert.Equal(fc.Length, await rig.Fetcher.ReadAsync(fch, fc.Length, 0, fb, Ct));
            Assert.True(fc.AsSpan().SequenceEqual(fb), name);
        }
    }

    [Fact]
    public async Task AnOnDemandMissBringsTheUncachedChunksOfItsChunkSizeWindowInTheSameRange()
    {
        const long Window = 16_384;
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        using var rig = new FetcherRig(blob, new LayerOptions { OnDemandWindowBytes = Window }, byBlobOffset: all);
        var (content, chunks) = b.Files["f20"];
        var c = chunks[0];
        var buf = new byte[content.Length];
        Assert.Equal(content.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
        Assert.Equal(content, buf);

        // One range request, holding every chunk wholly inside the aligned window around f20's chunk.
        long start = c.BlobOffset / Window * Window, end = (c.BlobEnd + Window - 1) / Window * Window;
        var inside = all.Where(x => x.BlobOffset >= start && x.BlobEnd <= end).ToArray();
        Assert.True(inside.Length >= 5, $"{inside.Length} chunks in the window");
        Assert.Equal(1, rig.Blob.Calls);
        Assert.Equal(1, rig.Blob.Ranges);
        Assert.Equal(inside.Length, rig.Stats.Snapshot().ChunksFetched);
        Assert.Equal(1, rig.Stats.Snapshot().CacheMisses); // the neighbours were nobody's miss

        // Their files are then read without asking the registry again, and each is right.
        await ReadFilesStartingIn(rig, b, inside);
        Assert.Equal(1, rig.Blob.Calls);

        // A chunk that straddles the window's end was not taken; reading it is a new request.
        var straddling = all.First(x => x.BlobOffset < end && x.BlobEnd > end);
        var (sc, sch) = b.Files.Values.First(f => f.Chunks[0] == straddling);
        Assert.Equal(sc.Length, await rig.Fetcher.ReadAsync(sch, sc.Length, 0, new byte[sc.Length], Ct));
        Assert.Equal(2, rig.Blob.Calls);
    }

    [Fact]
    public async Task WithADiskCacheTheWindowsNeighboursGoToDiskOnlyAndAReaderWaitingForOneGetsItsBytes()
    {
        const long Window = 16_384;
        using var dir = new TempDir("window-disk");
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        using var rig = new FetcherRig(blob, new LayerOptions { OnDemandWindowBytes = Window, CacheDirectory = dir.Path }, byBlobOffset: all);
        var (c20, ch20) = b.Files["f20"];
        long start = ch20[0].BlobOffset / Window * Window, end = (ch20[0].BlobEnd + Window - 1) / Window * Window;
        var inside = all.Where(x => x.BlobOffset >= start && x.BlobEnd <= end && x != ch20[0]).ToArray();
        Assert.True(inside.Length >= 4, $"{inside.Length} neighbours in the window");
        var (joinedName, (cj, chj)) = b.Files.First(f => f.Value.Chunks[0] == inside[^1]);

        // The registry holds the fetch until a reader of one of the neighbours has joined it.
        rig.Blob.GoDown();
        var asked = new byte[c20.Length];
        var first = rig.Fetcher.ReadAsync(ch20, c20.Length, 0, asked, Ct).AsTask();
        var joinedBytes = new byte[cj.Length];
        var joined = rig.Fetcher.ReadAsync(chj, cj.Length, 0, joinedBytes, Ct).AsTask();
        rig.Blob.ComeBack();
        Assert.Equal(c20.Length, await first);
        Assert.Equal(cj.Length, await joined);
        Assert.Equal(c20, asked);
        Assert.True(cj.AsSpan().SequenceEqual(joinedBytes), joinedName);
        await rig.Fetcher.DrainAsync();
        Assert.Equal(1, rig.Blob.Calls);

        // The chunk asked for is in memory; the neighbours nobody asked for are on disk only, and read right from there.
        Assert.True(rig.Cache.TryGetMemory(ch20[0].Digest!, out _));
        foreach (var n in inside)
        {
            Assert.True(rig.Cache.IsTrusted(n.Digest!), $"neighbour at {n.BlobOffset} not on disk");
            if (n != inside[^1]) Assert.False(rig.Cache.TryGetMemory(n.Digest!, out _), $"neighbour at {n.BlobOffset} kept in memory");
        }
        await ReadFilesStartingIn(rig, b, inside);
        Assert.Equal(1, rig.Blob.Calls);
    }

    /// <summary>A blob with one file of eight 4 KiB chunks between two small files.</summary>
    private static (byte[] Blob, BlobBuilder B) OneBigFile()
    {
        var b = new BlobBuilder { Stored = true };
        b.AddFile("head", BlobBuilder.Random(3_000, 1), 50_000);
        b.AddFile("big", BlobBuilder.Random(8 * 4096, 2), 4096);
        b.AddFile("tail", BlobBuilder.Random(3_000, 3), 50_000);
        return (b.Build(), b);
    }

    private static Task<int> ReadChunkOf(FetcherRig rig, LayerChunk[] chunks, byte[] content, int index, byte[] into) =>
        rig.Fetcher.ReadAsync(chunks, content.Length, chunks[index].FileOffset, into.AsMemory(0, (int)chunks[index].Size), Ct).AsTask();

    [Fact]
    public async Task AMissInAFileBringsTheRestOfItAndAReaderOfAChunkStillComingGetsItOnceItIsIn()
    {
        using var dir = new TempDir("file-rest");
        var (blob, b) = OneBigFile();
        var (content, chunks) = b.Files["big"];
        using var rig = new FetcherRig(blob, new LayerOptions { OnDemandFileBytes = 1 << 20, CacheDirectory = dir.Path });

        // A miss in chunk 2: its chunk with the chunks after it in one range, then the ones before it. The registry
        // sends the first range up to the end of chunk 4 and holds the rest; readers of chunks 4 and 7 joined meanwhile.
        rig.Blob.HoldAfterBytes = (int)(chunks[4].BlobEnd - chunks[2].BlobOffset);
        rig.Blob.GoDown();
        var two = new byte[4096];
        var read2 = ReadChunkOf(rig, chunks, content, 2, two);
        var four = new byte[4096];
        var seven = new byte[4096];
        var read4 = ReadChunkOf(rig, chunks, content, 4, four);
        var read7 = ReadChunkOf(rig, chunks, content, 7, seven);
        rig.Blob.ComeBack();
        await rig.Blob.Holding.WaitAsync(TimeSpan.FromSeconds(10), Ct);
        Assert.Equal(4096, await read2.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        Assert.Equal(4096, await read4.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        Assert.True(content.AsSpan(2 * 4096, 4096).SequenceEqual(two), "chunk 2");
        Assert.True(content.AsSpan(4 * 4096, 4096).SequenceEqual(four), "chunk 4");
        await Task.Delay(100, Ct);
        Assert.False(read7.IsCompleted, "chunk 7 answered before its bytes came");
        rig.Blob.ReleaseHeld();
        Assert.Equal(4096, await read7.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        Assert.True(content.AsSpan(7 * 4096, 4096).SequenceEqual(seven), "chunk 7");
        await rig.Fetcher.DrainAsync();

        Assert.Equal(2, rig.Blob.Calls);
        Assert.Equal((chunks[2].BlobOffset, (int)(chunks[7].BlobEnd - chunks[2].BlobOffset)), rig.Blob.Log[0]);
        Assert.Equal((chunks[0].BlobOffset, (int)(chunks[1].BlobEnd - chunks[0].BlobOffset)), rig.Blob.Log[1]);
        // Each chunk decoded once, the other files not touched, and the whole file now read without the registry.
        Assert.Equal(chunks.Length, rig.Stats.Snapshot().ChunksFetched);
        foreach (var c in chunks) Assert.True(rig.Cache.IsTrusted(c.Digest!), $"chunk at {c.FileOffset} not on disk");
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 8192, Ct));
        Assert.Equal(2, rig.Blob.Calls);
    }

    [Fact]
    public async Task AFileWhoseRestIsOverTheBoundIsFetchedAsAskedUntilTheRestIsWithinIt()
    {
        var (blob, b) = OneBigFile();
        var (content, chunks) = b.Files["big"];
        var buf = new byte[4096];
        // A bound of five chunks: after chunk 0, seven are left; after chunk 3, six; at chunk 6 the other five come too
        // (7 after it, 1-2 and 4-5 before it, one range as the cached chunk 3 between them is a small gap).
        using (var dir = new TempDir("file-rest-bound"))
        using (var rig = new FetcherRig(blob, new LayerOptions { OnDemandFileBytes = 5 * chunks[0].BlobLength, CacheDirectory = dir.Path }))
        {
            Assert.Equal(4096, await ReadChunkOf(rig, chunks, content, 0, buf));
            Assert.Equal(4096, await ReadChunkOf(rig, chunks, content, 3, buf));
            Assert.Equal(2, rig.Blob.Calls);
            Assert.Equal(2, rig.Stats.Snapshot().ChunksFetched);
            Assert.Equal(4096, await ReadChunkOf(rig, chunks, content, 6, buf));
            await rig.Fetcher.DrainAsync();
            Assert.Equal(4, rig.Blob.Calls);
            Assert.Equal((chunks[6].BlobOffset, (int)(chunks[7].BlobEnd - chunks[6].BlobOffset)), rig.Blob.Log[2]);
            Assert.Equal(chunks.Length, rig.Stats.Snapshot().ChunksFetched);
            Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 8192, Ct));
            Assert.Equal(4, rig.Blob.Calls);
        }

        // Without the background fetch only what is read is fetched; so too where the disk budget has no room for the
        // rest (it goes to disk as background-fetched chunks do, which never evict), and without a disk cache.
        using (var dir = new TempDir("file-rest-nobg"))
        using (var rig = new FetcherRig(blob, new LayerOptions { OnDemandFileBytes = 1 << 20, NoBackgroundFetch = true, CacheDirectory = dir.Path }))
            await OnlyTheChunkAsked(rig);
        using (var dir = new TempDir("file-rest-budget"))
        using (var rig = new FetcherRig(blob, new LayerOptions { OnDemandFileBytes = 1 << 20, CacheDirectory = dir.Path }))
        {
            rig.Cache.Budget.Limit = 6 * 4096;
            await OnlyTheChunkAsked(rig);
        }
        using (var rig = new FetcherRig(blob, new LayerOptions { OnDemandFileBytes = 1 << 20 }))
            await OnlyTheChunkAsked(rig);

        async Task OnlyTheChunkAsked(FetcherRig rig)
        {
            Assert.Equal(4096, await ReadChunkOf(rig, chunks, content, 2, buf));
            await rig.Fetcher.DrainAsync();
            Assert.Equal(1, rig.Blob.Calls);
            Assert.Equal(1, rig.Stats.Snapshot().ChunksFetched);
        }
    }

    [Fact]
    public async Task WhenTheRegistryStopsAnsweringAMissAndTheReadersOfTheRestOfItsFileFailAndNothingMoreIsAsked()
    {
        var (blob, b) = OneBigFile();
        var (content, chunks) = b.Files["big"];
        // The miss in chunk 2 fails (EIO) within the timeout, and so do readers that joined chunks of the rest after and
        // before it; the part before is not asked for. Back again, the file reads right.
        using var dir = new TempDir("file-rest-down");
        using var rig = new FetcherRig(blob, new LayerOptions
        {
            OnDemandFileBytes = 1 << 20, CacheDirectory = dir.Path, FetchingTimeout = TimeSpan.FromMilliseconds(300),
        });
        rig.Blob.GoDown();
        var asked = ReadChunkOf(rig, chunks, content, 2, new byte[4096]);
        var after = ReadChunkOf(rig, chunks, content, 6, new byte[4096]);
        var before = ReadChunkOf(rig, chunks, content, 1, new byte[4096]);
        await Assert.ThrowsAsync<LayerIOException>(() => asked.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        await Assert.ThrowsAsync<LayerIOException>(() => after.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        await Assert.ThrowsAsync<LayerIOException>(() => before.WaitAsync(TimeSpan.FromSeconds(10), Ct));
        Assert.Equal(1, rig.Blob.Calls);
        rig.Blob.ComeBack();
        Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 8192, Ct));
    }

    [Fact]
    public async Task WithoutAWindowAMissFetchesOnlyTheChunksAskedFor()
    {
        var (blob, b) = SmallFiles();
        using var rig = new FetcherRig(blob, new LayerOptions(), byBlobOffset: b.ByBlobOffset());
        var (c20, ch20) = b.Files["f20"];
        var (c21, ch21) = b.Files["f21"];
        await rig.Fetcher.ReadAsync(ch20, c20.Length, 0, new byte[c20.Length], Ct);
        Assert.Equal(1, rig.Stats.Snapshot().ChunksFetched);
        Assert.Equal(ch20[0].BlobLength, rig.Stats.Snapshot().FetchedBytes);
        await rig.Fetcher.ReadAsync(ch21, c21.Length, 0, new byte[c21.Length], Ct);
        Assert.Equal(2, rig.Blob.Calls);
    }

    [Fact]
    public async Task TheWindowSkipsCachedChunksAndIsNotUsedByBackgroundFetch()
    {
        const long Window = 16_384;
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        using var rig = new FetcherRig(blob, new LayerOptions { OnDemandWindowBytes = Window }, byBlobOffset: all);
        // A background fetch of one chunk takes only that chunk.
        var i20 = Array.IndexOf(all, b.Files["f20"].Chunks[0]);
        await rig.Fetcher.AcquireAsync(all, i20, 1, null, FetchPriority.Background, Ct);
        await rig.Fetcher.DrainAsync();
        Assert.Equal(1, rig.Stats.Snapshot().ChunksFetched);
        // An on-demand miss next to it fetches its window without f20's chunk again.
        var (c21, ch21) = b.Files["f21"];
        await rig.Fetcher.ReadAsync(ch21, c21.Length, 0, new byte[c21.Length], Ct);
        await rig.Fetcher.DrainAsync();
        long start = ch21[0].BlobOffset / Window * Window, end = (ch21[0].BlobEnd + Window - 1) / Window * Window;
        var inside = all.Count(x => x.BlobOffset >= start && x.BlobEnd <= end);
        var f20InWindow = all[i20].BlobOffset >= start && all[i20].BlobEnd <= end;
        Assert.Equal(1 + inside - (f20InWindow ? 1 : 0), rig.Stats.Snapshot().ChunksFetched);
    }

    [Fact]
    public async Task MissesWalkingForwardThroughTheBlobGrowTheWindowUpToItsBoundAndAJumpBackResetsIt()
    {
        const long Window = 8_192, Max = 32_768;
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        var options = new LayerOptions { OnDemandWindowBytes = Window, OnDemandWindowMaxBytes = Max };
        async Task<MemoryBlob> ReadInBlobOrder(LayerOptions o)
        {
            var rig = new FetcherRig(blob, o, byBlobOffset: all);
            foreach (var c in all)
            {
                var (content, chunks) = b.Files.Values.First(f => f.Chunks[0] == c);
                var buf = new byte[content.Length];
                Assert.Equal(content.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
                Assert.Equal(content, buf);
                await rig.Fetcher.DrainAsync();
            }
            rig.Dispose();
            return rig.Blob;
        }
        var fixedWindow = await ReadInBlobOrder(new LayerOptions { OnDemandWindowBytes = Window });
        var growing = await ReadInBlobOrder(options);

        // The same bytes in fewer round trips: each request reaches further than the one before, up to the bound.
        Assert.True(growing.Calls < fixedWindow.Calls, $"{growing.Calls} requests growing vs {fixedWindow.Calls} fixed");
        var spans = growing.Log.Select(r => r.Length).ToList();
        Assert.True(spans[1] > spans[0] && spans[2] > spans[1], string.Join(",", spans));
        Assert.All(spans, l => Assert.True(l <= Max + 2 * Window, $"request of {l} bytes over the bound"));

        // Misses that jump back in the blob fetch only the fixed window again.
        using var rig = new FetcherRig(blob, options, byBlobOffset: all);
        foreach (var name in new[] { "f40", "f41", "f42", "f10" })
        {
            var (content, chunks) = b.Files[name];
            await rig.Fetcher.ReadAsync(chunks, content.Length, 0, new byte[content.Length], Ct);
            await rig.Fetcher.DrainAsync();
        }
        var f10 = b.Files["f10"].Chunks[0];
        var last = rig.Blob.Log[^1];
        Assert.True(last.Offset <= f10.BlobOffset && last.Length <= 2 * Window, $"jump back fetched {last.Length} bytes at {last.Offset}");
    }

    /// <summary>
    /// Region 1 of <see cref="SmallFiles"/> (regions of 32 KiB, windows of 4 KiB): its chunks, a first miss at its start,
    /// a second one further in past the first one's window, and the chunks after the second one's window.
    /// </summary>
    private static (LayerChunk[] InRegion, LayerChunk First, LayerChunk Second, LayerChunk[] Later) RegionMisses(LayerChunk[] all)
    {
        var inRegion = all.Where(c => c.BlobOffset >= RegionBytes && c.BlobEnd <= 2 * RegionBytes).ToArray();
        var first = inRegion[0];
        var firstWindowEnd = (first.BlobEnd + RegionWindow - 1) / RegionWindow * RegionWindow;
        var second = inRegion.First(c => c.BlobOffset >= firstWindowEnd + RegionWindow);
        var later = inRegion.Where(c => c.BlobOffset > second.BlobEnd + RegionWindow).ToArray();
        Assert.True(later.Length >= 2, $"{later.Length} chunks later in the region");
        return (inRegion, first, second, later);
    }

    private const long RegionWindow = 4_096, RegionBytes = 32_768;

    [Fact]
    public async Task WithADiskCacheARegionIsKeptCompressedAndOnlyWhatIsAskedForIsDecoded()
    {
        const long Window = RegionWindow, Region = RegionBytes;
        using var dir = new TempDir("regions");
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        var (inRegion, first, second, later) = RegionMisses(all);
        using var rig = new FetcherRig(blob, new LayerOptions
        {
            OnDemandWindowBytes = Window, OnDemandWindowMaxBytes = Region, CacheDirectory = dir.Path,
        }, byBlobOffset: all);

        await Read(first);
        var afterFirst = rig.Stats.Snapshot().ChunksFetched;
        await Read(second);
        Assert.Equal(2, rig.Blob.Calls);
        var (offset, length) = rig.Blob.Log[^1];
        Assert.True(offset <= inRegion[0].BlobOffset && offset + length >= inRegion[^1].BlobEnd, $"the second miss fetched {offset}+{length}");
        await rig.Fetcher.DrainAsync();
        // Only the chunk asked for was decoded; the region's other chunks wait, compressed, for a reader.
        Assert.Equal(afterFirst + 1, rig.Stats.Snapshot().ChunksFetched);
        foreach (var c in later) Assert.False(rig.Cache.IsTrusted(c.Digest!), $"chunk at {c.BlobOffset} was decoded unasked");
        // Nothing of the region is named in the cache directory: its file was unlinked when made.
        Assert.Empty(Directory.EnumerateFiles(dir.Path, "region-*", SearchOption.AllDirectories));

        // Later misses in the region are answered from it, right, without asking the registry.
        var fetched = rig.Stats.Snapshot().FetchedBytes;
        foreach (var c in later) await Read(c);
        Assert.Equal(2, rig.Blob.Calls);
        Assert.Equal(fetched, rig.Stats.Snapshot().FetchedBytes);
        await rig.Fetcher.DrainAsync();
        foreach (var c in later) Assert.True(rig.Cache.IsTrusted(c.Digest!), $"chunk at {c.BlobOffset} was read but not stored");

        // Dropped (the layer has every chunk on disk then), the region answers nothing more: a miss in it asks the registry.
        rig.Fetcher.DropRegions();
        var unread = inRegion.First(c => !rig.Cache.IsTrusted(c.Digest!) && !rig.Cache.TryGetMemory(c.Digest!, out _));
        await Read(unread);
        Assert.Equal(3, rig.Blob.Calls);

        async Task Read(LayerChunk c)
        {
            var (content, chunks) = b.Files.Values.First(f => f.Chunks[0] == c);
            var buf = new byte[content.Length];
            Assert.Equal(content.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
            Assert.Equal(content, buf);
        }
    }

    [Fact]
    public async Task AKeptRegionCountsInTheDiskBudgetAndIsNotKeptWhereOnlyReadChunksCouldMakeRoomForIt()
    {
        const long Window = RegionWindow, Region = RegionBytes;
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        var (inRegion, first, second, later) = RegionMisses(all);
        var options = new LayerOptions { OnDemandWindowBytes = Window, OnDemandWindowMaxBytes = Region };

        // Unbounded: the region's bytes are counted while it is kept, and no longer once it is dropped.
        using (var dir = new TempDir("regions-budget"))
        using (var rig = new FetcherRig(blob, options with { CacheDirectory = dir.Path }, byBlobOffset: all))
        {
            await Read(rig, first);
            await rig.Fetcher.DrainAsync();
            var beforeRegion = rig.Cache.Budget.Used;
            await Read(rig, second);
            await rig.Fetcher.DrainAsync();
            var (_, regionLength) = rig.Blob.Log[^1];
            Assert.Equal(beforeRegion + second.Size + regionLength, rig.Cache.Budget.Used);
            rig.Fetcher.DropRegions();
            Assert.Equal(beforeRegion + second.Size, rig.Cache.Budget.Used);
        }

        // A budget full of chunks that were read: the region is not kept (the miss is answered all the same), so the
        // next miss in it asks the registry again.
        using (var dir = new TempDir("regions-full"))
        using (var rig = new FetcherRig(blob, options with { CacheDirectory = dir.Path }, byBlobOffset: all))
        {
            await Read(rig, first);
            await rig.Fetcher.DrainAsync();
            rig.Cache.Budget.Limit = rig.Cache.Budget.Used + 2 * second.Size;
            await Read(rig, second);
            await rig.Fetcher.DrainAsync();
            Assert.Equal(2, rig.Blob.Calls);
            Assert.True(rig.Cache.Budget.Used <= rig.Cache.Budget.Limit, $"{rig.Cache.Budget.Used} over {rig.Cache.Budget.Limit}");
            await Read(rig, later[0]);
            Assert.Equal(3, rig.Blob.Calls);
        }

        async Task Read(FetcherRig rig, LayerChunk c)
        {
            var (content, chunks) = b.Files.Values.First(f => f.Chunks[0] == c);
            var buf = new byte[content.Length];
            Assert.Equal(content.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
            Assert.Equal(content, buf);
        }
    }

    [Fact]
    public async Task TheSecondScatteredMissInARegionBringsTheWholeRegionWhereThereIsADiskCache()
    {
        const long Window = RegionWindow, Region = RegionBytes;
        using var dir = new TempDir("regions");
        var (blob, b) = SmallFiles();
        var all = b.ByBlobOffset();
        var (inRegion, first, second, later) = RegionMisses(all);

        // The second miss brings the region, whose other files then cost no request.
        using (var slow = Rig(dir.Path))
        {
            await Read(slow, first);
            Assert.Equal(1, slow.Blob.Calls);
            Assert.True(slow.Blob.Log[^1].Length <= 2 * Window, $"a first miss fetched {slow.Blob.Log[^1].Length} bytes");
            await Read(slow, second);
            Assert.Equal(2, slow.Blob.Calls);
            var (offset, length) = slow.Blob.Log[^1];
            Assert.True(offset + length >= inRegion[^1].BlobEnd, $"the second miss fetched {offset}+{length}; the region's last chunk ends at {inRegion[^1].BlobEnd}");
            Assert.True(offset + length <= 2 * Region + Window, $"the second miss fetched past its region: {offset}+{length}");
            foreach (var c in later) await Read(slow, c);
            Assert.Equal(2, slow.Blob.Calls);
            // A miss in the next region is that region's first: only its window.
            await Read(slow, all.First(c => c.BlobOffset >= 2 * Region + Window));
            Assert.Equal(3, slow.Blob.Calls);
            Assert.True(slow.Blob.Log[^1].Length <= 2 * Window, $"a first miss in the next region fetched {slow.Blob.Log[^1].Length} bytes");
        }

        // Without a disk cache to keep it in, every miss brings only its window.
        using (var fast = Rig(null))
        {
            await Read(fast, first);
            await Read(fast, second);
            Assert.True(fast.Blob.Log[^1].Length <= 2 * Window, $"the second miss fetched {fast.Blob.Log[^1].Length} bytes");
            await Read(fast, later[^1]);
            Assert.Equal(3, fast.Blob.Calls);
        }

        FetcherRig Rig(string? cacheDirectory) =>
            new(blob, new LayerOptions { OnDemandWindowBytes = Window, OnDemandWindowMaxBytes = Region, CacheDirectory = cacheDirectory },
                byBlobOffset: all);
        async Task Read(FetcherRig rig, LayerChunk c)
        {
            var (content, chunks) = b.Files.Values.First(f => f.Chunks[0] == c);
            var buf = new byte[content.Length];
            Assert.Equal(content.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct));
            Assert.Equal(content, buf);
            await rig.Fetcher.DrainAsync();
        }
    }
}
