using System.Diagnostics;
using System.Formats.Tar;
using System.Security.Cryptography;
using Stargz.Estargz;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// What the layer asks of the registry, counted by a proxy in front of a real docker-registry while real processes
/// read through a real FUSE mount.
/// </summary>
public class FetchBehaviourTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static byte[] Small(int i) => System.Text.Encoding.UTF8.GetBytes($"small file number {i}\n");

    [Fact]
    public async Task ReadingOneSmallFileOfA200MBLayerFetchesAtMostTwoRangesAfterTheToc()
    {
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        // 200 files of 1 MB of random bytes (incompressible: the blob is ~200 MB), small files between them.
        var tarPath = Path.Combine(rig.Dir.Path, "big.tar");
        using (var fs = File.Create(tarPath))
        using (var w = new TarWriter(fs, TarEntryFormat.Pax))
        {
            TestTars.Dir(w, "data/");
            var rnd = new Random(5);
            var buf = new byte[1 << 20];
            for (var i = 0; i < 200; i++)
            {
                rnd.NextBytes(buf);
                TestTars.File(w, $"data/blob{i:000}.bin", buf);
                if (i % 20 == 0) TestTars.File(w, $"data/small{i:000}.txt", Small(i));
            }
        }
        var blobPath = Path.Combine(rig.Dir.Path, "big.esgz");
        BuildResult built;
        using (var input = File.OpenRead(tarPath))
        using (var output = File.Create(blobPath))
            built = await EstargzBuilder.BuildAsync(input, output, new BuildOptions { ChunkSize = 1 << 20, CompressionLevel = 1 }, Ct);
        Assert.True(built.Size > 200_000_000, $"blob is only {built.Size} bytes");
        string digest;
        using (var blob = File.OpenRead(blobPath))
        {
            var sha = "sha256:" + Convert.ToHexStringLower(await SHA256.HashDataAsync(blob, Ct));
            blob.Position = 0;
            digest = (await rig.Client.PushBlobAsync(Stargz.Registry.ImageReference.Parse($"{rig.Registry.Host}/big/layer:latest"), blob, sha, built.Size, null, Ct)).Digest;
        }
        File.Delete(blobPath);
        File.Delete(tarPath);

        rig.Proxy.ResetCounts();
        var mp = await rig.MountAsync(rig.Labels("big/layer", digest, built.TocDigest), Ct);
        var tocRanges = rig.Proxy.Ranges;
        Assert.InRange(tocRanges, 1, 2); // one speculative tail read (+ one more only for a TOC bigger than the tail)
        rig.Proxy.ResetCounts();

        Assert.Equal(Small(100), await File.ReadAllBytesAsync(Path.Combine(mp, "data/small100.txt"), Ct));
        Assert.InRange(rig.Proxy.Ranges, 1, 2);
        Assert.InRange(rig.Proxy.RangeRequests, 1, 2);
        var st = rig.Manager.GetLayer(mp)!.Stats.Snapshot();
        TestContext.Current.TestOutputHelper?.WriteLine(
            $"blob {built.Size} bytes; mount: {tocRanges} range(s); small file: {rig.Proxy.RangeRequests} request(s), {rig.Proxy.Ranges} range(s), {st.FetchedBytes} bytes");
        Assert.True(st.FetchedBytes < 2 << 20, $"fetched {st.FetchedBytes} bytes for a {Small(100).Length}-byte file");
    }

    [Fact]
    public async Task FiftyParallelReadersOfOneChunkCauseOneFetch()
    {
        var content = TestTars.Random(4_000_000, 3);
        var tar = TestTars.Write(w =>
        {
            TestTars.File(w, "one-chunk.bin", content);
            TestTars.File(w, "other", Small(1));
        });
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 8 << 20, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true, MaxConcurrency = 8 });
        var digest = await rig.PushAsync("par/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("par/layer", digest, built.TocDigest), Ct);
        rig.Proxy.ResetCounts();
        using var start = new Barrier(50);
        var readers = new Task<byte[]>[50];
        for (var i = 0; i < readers.Length; i++)
        {
            var offset = i * 65_536;
            readers[i] = Task.Factory.StartNew(() =>
            {
                using var f = new FileStream(Path.Combine(mp, "one-chunk.bin"), FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.None);
                f.Position = offset;
                var buf = new byte[10_000];
                start.SignalAndWait(Ct);
                f.ReadExactly(buf);
                return buf;
            }, Ct, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }
        var results = await Task.WhenAll(readers);
        for (var i = 0; i < results.Length; i++)
            Assert.True(content.AsSpan(i * 65_536, 10_000).SequenceEqual(results[i]), $"reader {i} got wrong bytes");
        Assert.Equal(1, rig.Proxy.RangeRequests);
        Assert.Equal(1, rig.Manager.GetLayer(mp)!.Stats.Snapshot().ChunksFetched);
    }

    [Fact]
    public async Task AFlippedByteInTheRegistrysBlobGivesEioAndNeverTheWrongBytes()
    {
        var victim = TestTars.Random(300_000, 4);
        var tar = TestTars.Write(w =>
        {
            TestTars.File(w, "victim.bin", victim);
            TestTars.File(w, "bystander.txt", Small(2));
        });
        // Stored deflate blocks: the flipped byte still decompresses, so only the checks can catch it.
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 1 << 20, CompressionLevel = 0 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var digest = await rig.PushAsync("flip/layer", blob, Ct);
        var entry = built.Toc.Entries.First(e => e.Name == "victim.bin");
        var stored = rig.RegistryBlobPath(digest);
        var bytes = await File.ReadAllBytesAsync(stored, Ct);
        bytes[entry.Offset + 1000] ^= 0x01;
        await File.WriteAllBytesAsync(stored, bytes, Ct);

        var mp = await rig.MountAsync(rig.Labels("flip/layer", digest, built.TocDigest), Ct);
        var buf = new byte[victim.Length];
        var e = Assert.ThrowsAny<IOException>(() =>
        {
            using var f = File.OpenRead(Path.Combine(mp, "victim.bin"));
            f.ReadExactly(buf);
        });
        Assert.DoesNotContain("End of stream", e.Message);
        Assert.All(buf, b => Assert.Equal(0, b));
        // Still EIO on a second try (nothing bad was cached), and the rest of the layer is fine.
        Assert.ThrowsAny<IOException>(() => File.ReadAllBytes(Path.Combine(mp, "victim.bin")));
        Assert.Equal(Small(2), await File.ReadAllBytesAsync(Path.Combine(mp, "bystander.txt"), Ct));
        var st = rig.Manager.GetLayer(mp)!.Stats.Snapshot();
        Assert.True(st.Errors >= 1);
        TestContext.Current.TestOutputHelper?.WriteLine($"last error: {st.LastError}");
        Assert.Contains("does not match its digest", st.LastError);
    }

    private static byte[] ManyFilesTar(out Dictionary<string, byte[]> files)
    {
        var f = new Dictionary<string, byte[]>();
        for (var i = 0; i < 12; i++) f[$"f{i:00}.bin"] = TestTars.Random(150_000 + i * 10_000, 10 + i);
        f["same-as-f00.bin"] = f["f00.bin"];
        files = f;
        return TestTars.Write(w => { foreach (var (n, d) in f) TestTars.File(w, n, d); });
    }

    [Fact]
    public async Task AfterARestartCachedChunksAreServedWithZeroRegistryRequests()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 64 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var digest = await rig.PushAsync("restart/layer", blob, Ct);
        var labels = rig.Labels("restart/layer", digest, built.TocDigest);
        var mp = await rig.MountAsync(labels, Ct);
        foreach (var (n, d) in files) Assert.Equal(d, await File.ReadAllBytesAsync(Path.Combine(mp, n), Ct));
        Assert.True(rig.Proxy.RangeRequests > 1);
        await rig.Manager.UnmountAsync(mp, Ct);

        await rig.RestartManagerAsync();
        var mp2 = await rig.MountAsync(labels, Ct);
        rig.Proxy.ResetCounts();
        foreach (var (n, d) in files) Assert.Equal(d, await File.ReadAllBytesAsync(Path.Combine(mp2, n), Ct));
        Assert.Equal(0, rig.Proxy.RangeRequests);
        Assert.Equal(0, rig.Proxy.BlobGets);
        Assert.Equal(0, rig.Manager.Cache.DiskRejected);
        Assert.True(rig.Manager.Cache.DiskHits > 0);
    }

    [Fact]
    public async Task AnUnreachableRegistryGivesEioWithinTheTimeoutCachedDataStillReadsAndTheLayerRecovers()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 64 << 10, CompressionLevel = 1 }, Ct);
        var timeout = TimeSpan.FromSeconds(5);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true, FetchingTimeout = timeout });
        var digest = await rig.PushAsync("down/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("down/layer", digest, built.TocDigest), Ct);
        Assert.Equal(files["f00.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f00.bin"), Ct));

        rig.Proxy.Down();
        var sw = Stopwatch.StartNew();
        Assert.ThrowsAny<IOException>(() => File.ReadAllBytes(Path.Combine(mp, "f05.bin")));
        sw.Stop();
        Assert.True(sw.Elapsed < timeout * 4, $"EIO came after {sw.Elapsed}, the timeout is {timeout}");
        // Same chunks as f00 (cached by us, never read through the kernel): served while the registry is away.
        Assert.Equal(files["same-as-f00.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "same-as-f00.bin"), Ct));

        // The daemon's health check sees the registry is away (bounded by the same timeout).
        await Assert.ThrowsAnyAsync<Exception>(() => rig.Manager.CheckAsync(mp, rig.Labels("down/layer", digest, built.TocDigest), Ct));

        rig.Proxy.Up();
        Assert.Equal(files["f05.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f05.bin"), Ct));
        await rig.Manager.CheckAsync(mp, rig.Labels("down/layer", digest, built.TocDigest), Ct);
    }

    [Fact]
    public async Task ARegionKeptForScatteredMissesIsHeldOnlyUntilTheLayerIsFullyFetched()
    {
        var files = new Dictionary<string, byte[]>();
        for (var i = 0; i < 60; i++) files[$"m{i:D2}.py"] = TestTars.Random(2_000, 300 + i);
        var tar = TestTars.Write(w => { foreach (var (n, d) in files) TestTars.File(w, n, d); });
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { CompressionLevel = 1 }, Ct);
        // The background fetch waits for 2 s without on-demand reads, so the region is looked at before it starts.
        await using var rig = await LayerRig.StartAsync(new LayerOptions
        {
            OnDemandWindowBytes = 4_096, OnDemandWindowMaxBytes = 65_536,
            BackgroundQuietPeriod = TimeSpan.FromSeconds(2), BackgroundPause = TimeSpan.FromMilliseconds(1),
        });
        var digest = await rig.PushAsync("regions/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("regions/layer", digest, built.TocDigest), Ct);

        // Two scattered misses in the blob's first 64 KiB (~2.6 KiB a file): the second brings the region and keeps it.
        Assert.Equal(files["m01.py"], await File.ReadAllBytesAsync(Path.Combine(mp, "m01.py"), Ct));
        Assert.Equal(files["m12.py"], await File.ReadAllBytesAsync(Path.Combine(mp, "m12.py"), Ct));
        var sw = Stopwatch.StartNew();
        while (RegionFiles() == 0 && sw.Elapsed < TimeSpan.FromSeconds(5)) await Task.Delay(10, Ct);
        Assert.Equal(1, RegionFiles());
        rig.Proxy.ResetCounts();
        Assert.Equal(files["m07.py"], await File.ReadAllBytesAsync(Path.Combine(mp, "m07.py"), Ct));
        Assert.Equal(0, rig.Proxy.RangeRequests);

        // Fully fetched, every chunk is on disk: the region's file and fd go.
        var layer = rig.Manager.GetLayer(mp)!;
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(60), Ct);
        Assert.True(layer.AllChunksFetched);
        Assert.Equal(0, RegionFiles());
        foreach (var (n, d) in files) Assert.Equal(d, await File.ReadAllBytesAsync(Path.Combine(mp, n), Ct));

        // This process's open fds on this rig's kept regions (unlinked files: "…/region-… (deleted)"; other tests run
        // beside this one).
        int RegionFiles()
        {
            var n = 0;
            foreach (var fd in Directory.EnumerateFileSystemEntries("/proc/self/fd"))
            {
                try
                {
                    if (new FileInfo(fd).LinkTarget is { } target && target.StartsWith(rig.Dir.Path, StringComparison.Ordinal)
                        && target.Contains("/region-", StringComparison.Ordinal)) n++;
                }
                catch (IOException) { } // closed meanwhile
            }
            return n;
        }
    }

    [Fact]
    public async Task PrioritizedFilesArePrefetchedAndTheBackgroundFetchGetsTheRest()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions
        {
            ChunkSize = 64 << 10, CompressionLevel = 1, Prioritized = ["f03.bin", "f07.bin"],
        }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { BackgroundPause = TimeSpan.FromMilliseconds(1) });
        var digest = await rig.PushAsync("prefetch/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("prefetch/layer", digest, built.TocDigest), Ct);
        var layer = rig.Manager.GetLayer(mp)!;
        Assert.True(layer.PrefetchEnd > 0);
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(60), Ct);
        var st = layer.Stats.Snapshot();
        Assert.Equal(FetchStageState.Done, st.Prefetch);
        Assert.Equal(FetchStageState.Done, st.Background);
        Assert.Equal(st.BackgroundTotalBytes, st.BackgroundDoneBytes);
        Assert.True(st.PrefetchFetchedBytes > files["f03.bin"].Length / 2);
        rig.Proxy.ResetCounts();
        foreach (var (n, d) in files) Assert.Equal(d, await File.ReadAllBytesAsync(Path.Combine(mp, n), Ct));
        Assert.Equal(0, rig.Proxy.RangeRequests);
    }

    [Fact]
    public async Task OtherLayersOfTheImageAreResolvedAheadSoTheirMountsNeedNoTocFetch()
    {
        var (blobA, builtA) = await LayerRig.BuildAsync(TestTars.Write(w => TestTars.File(w, "a", Small(1))), null, Ct);
        var (blobB, builtB) = await LayerRig.BuildAsync(TestTars.Write(w => TestTars.File(w, "b", Small(2))), null, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var a = await rig.PushAsync("ahead/app", blobA, Ct);
        var b = await rig.PushAsync("ahead/app", blobB, Ct);
        var layers = a + "," + b;
        var mpA = await rig.MountAsync(rig.Labels("ahead/app", a, builtA.TocDigest, layers), Ct);
        var ahead = rig.Manager.ResolutionOf($"{rig.Proxy.Host}/ahead/app:latest", b);
        Assert.NotNull(ahead);
        await ahead.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        rig.Proxy.ResetCounts();
        var mpB = await rig.MountAsync(rig.Labels("ahead/app", b, builtB.TocDigest, layers), Ct);
        Assert.Equal(0, rig.Proxy.Requests);
        Assert.Equal(Small(2), await File.ReadAllBytesAsync(Path.Combine(mpB, "b"), Ct));
        Assert.Equal(Small(1), await File.ReadAllBytesAsync(Path.Combine(mpA, "a"), Ct));

        await rig.Manager.UnmountAsync(mpB, Ct);
        Assert.DoesNotContain(Mounts.List(), m => m.MountPoint == mpB);
        await Assert.ThrowsAsync<InvalidOperationException>(() => rig.Manager.CheckAsync(mpB, new Dictionary<string, string>(), Ct));
        await rig.Manager.CheckAsync(mpA, new Dictionary<string, string>(), Ct);
        Assert.Single(rig.Manager.Layers);
    }

    [Fact]
    public async Task ConcurrentRandomReadsWhileTheBackgroundFetchRunsAlwaysGetTheRightBytes()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 32 << 10, CompressionLevel = 1 }, Ct);
        // A memory cache far smaller than the layer: chunks are evicted and come back from disk while others fetch.
        await using var rig = await LayerRig.StartAsync(new LayerOptions
        {
            MemoryCacheBytes = 200 << 10, PrefetchChunkSize = 96 << 10, BackgroundPause = TimeSpan.FromMilliseconds(2),
        });
        var digest = await rig.PushAsync("stress/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("stress/layer", digest, built.TocDigest), Ct);
        var names = files.Keys.ToArray();
        var workers = new Task[8];
        for (var w = 0; w < workers.Length; w++)
        {
            var seed = w;
            workers[w] = Task.Factory.StartNew(() =>
            {
                var rnd = new Random(seed);
                var buf = new byte[70_000];
                for (var i = 0; i < 150; i++)
                {
                    var name = names[rnd.Next(names.Length)];
                    var want = files[name];
                    var off = rnd.Next(want.Length);
                    var len = rnd.Next(1, buf.Length);
                    // O_DIRECT-free but uncached by the kernel for a fresh open only; pread at random offsets.
                    using var h = File.OpenHandle(Path.Combine(mp, name));
                    var n = RandomAccess.Read(h, buf.AsSpan(0, len), off);
                    Assert.Equal(Math.Min(len, want.Length - off), n);
                    Assert.True(want.AsSpan(off, n).SequenceEqual(buf.AsSpan(0, n)), $"{name} @{off}+{n}");
                }
            }, Ct, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        }
        await Task.WhenAll(workers);
        var layer = rig.Manager.GetLayer(mp)!;
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(60), Ct);
        var st = layer.Stats.Snapshot();
        Assert.Equal(0, st.Errors);
        Assert.Equal(FetchStageState.Done, st.Background);
        // Every distinct chunk was fetched exactly once, whoever asked first.
        var distinct = built.Toc.Entries.Where(e => e.ChunkDigest != null)
            .Select(e => e.ChunkDigest).Distinct().Count();
        Assert.Equal(distinct, st.ChunksFetched);
    }

    [Fact]
    public async Task AVerifiedSingleChunkFileIsServedByFusePassthroughOnItsNextOpen()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 1 << 20, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true },
            new Stargz.Fuse.FuseMountOptions { AllowOther = true, Passthrough = true });
        var digest = await rig.PushAsync("pt/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("pt/layer", digest, built.TocDigest), Ct);
        var server = rig.Manager.ServerOf(mp)!;
        Assert.Equal(files["f02.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f02.bin"), Ct)); // fetched, verified, on disk
        await rig.Manager.GetLayer(mp)!.Fetcher.DrainAsync();
        Assert.Equal(0, server.PassthroughOpens);
        // Another file read once (its open was not passthrough: the chunk was not on disk yet), then opened again.
        Assert.Equal(files["f03.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f03.bin"), Ct));
        await rig.Manager.GetLayer(mp)!.Fetcher.DrainAsync();
        using (var h = File.OpenHandle(Path.Combine(mp, "f03.bin")))
        {
            var buf = new byte[files["f03.bin"].Length];
            Assert.Equal(buf.Length, RandomAccess.Read(h, buf, 0));
            Assert.Equal(files["f03.bin"], buf);
        }
        if (!server.PassthroughNegotiated)
        {
            TestContext.Current.TestOutputHelper?.WriteLine("kernel did not negotiate FUSE passthrough; only the bytes were checked");
            return;
        }
        Assert.True(server.PassthroughOpens >= 1, "the verified chunk file was not used for passthrough");
    }

    [Fact]
    public async Task WithoutPassthroughAPrefetchedSingleChunkFileIsSplicedFromItsChunkFile()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions
        {
            ChunkSize = 1 << 20, CompressionLevel = 1, Prioritized = ["f04.bin"],
        }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true },
            new Stargz.Fuse.FuseMountOptions { AllowOther = true, Passthrough = false });
        // Prefetch puts f04.bin (one chunk) on disk, verified, without the kernel reading it: its page cache is empty.
        var (mp, server, layer, fetchedBefore) = await MountPrefetchedAsync(rig, "splice/layer", blob, built.TocDigest);

        using (var h = File.OpenHandle(Path.Combine(mp, "f04.bin")))
        {
            var buf = new byte[files["f04.bin"].Length];
            Assert.Equal(buf.Length, RandomAccess.Read(h, buf, 0));
            Assert.Equal(files["f04.bin"], buf);
        }
        Assert.True(server.SplicedReads >= 1, "no read was spliced from the chunk file");
        Assert.Equal(0, server.FileReadFallbacks);
        Assert.Equal(fetchedBefore, layer.Stats.Snapshot().FetchedBytes); // the registry was not asked again
        // A file that was not prefetched still reads through the fetcher.
        Assert.Equal(files["f05.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f05.bin"), Ct));
        Assert.True(layer.Stats.Snapshot().FetchedBytes > fetchedBefore);
    }

    [Fact]
    public async Task WithoutPassthroughReadsInsideOneVerifiedChunkOfABigFileAreSplicedFromAFewOpenChunkFiles()
    {
        var big = TestTars.Random((6 << 20) + 12345, 77);
        var tar = TestTars.Write(w =>
        {
            TestTars.File(w, "big.bin", big);
            TestTars.File(w, "other.bin", TestTars.Random(300_000, 78));
        });
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions
        {
            ChunkSize = 1 << 20, CompressionLevel = 1, Prioritized = ["big.bin"],
        }, Ct);
        // READs of 256 KiB fit any pipe and never straddle two 1 MiB chunks when aligned.
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true, MaxCacheFds = 2 },
            new Stargz.Fuse.FuseMountOptions { AllowOther = true, Passthrough = false, MaxRead = 256 << 10, ReadAheadKb = 256 });
        // Prefetch puts big.bin's 7 chunks on disk, verified, without the kernel reading them.
        var (mp, server, layer, fetchedBefore) = await MountPrefetchedAsync(rig, "splice/big", blob, built.TocDigest);

        var got = new byte[big.Length];
        using (var h = File.OpenHandle(Path.Combine(mp, "big.bin")))
        {
            for (int off = 0; off < got.Length;)
            {
                int n = RandomAccess.Read(h, got.AsSpan(off, Math.Min(1 << 20, got.Length - off)), off);
                Assert.True(n > 0, $"short read at {off}");
                off += n;
            }
            // The layer keeps at most max_cache_fds chunk files open, however many chunks were read.
            Assert.True(OpenDescriptorsUnder(rig.Options.CacheDirectory!) <= 2,
                $"{OpenDescriptorsUnder(rig.Options.CacheDirectory!)} chunk files open, max_cache_fds is 2");
        }
        Assert.Equal(big, got);
        // 6 MiB in 256 KiB READs: most of them spliced, none needed the pread fallback, and no byte from the registry.
        Assert.True(server.SplicedReads >= 16, $"only {server.SplicedReads} READs were spliced from chunk files");
        Assert.Equal(0, server.FileReadFallbacks);
        Assert.Equal(fetchedBefore, layer.Stats.Snapshot().FetchedBytes);
        // A file whose chunks are not on disk still reads through the fetcher.
        Assert.Equal(300_000, (await File.ReadAllBytesAsync(Path.Combine(mp, "other.bin"), Ct)).Length);
        Assert.True(layer.Stats.Snapshot().FetchedBytes > fetchedBefore);
    }

    [Fact]
    public async Task ChunkFilesThatFailWithEioAreCountedDroppedAndTheReadsStillGetTheRightBytes()
    {
        var big = TestTars.Random((3 << 20) + 999, 79);
        var tar = TestTars.Write(w => TestTars.File(w, "big.bin", big));
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions
        {
            ChunkSize = 1 << 20, CompressionLevel = 1, Prioritized = ["big.bin"],
        }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true },
            new Stargz.Fuse.FuseMountOptions { AllowOther = true, Passthrough = false, MaxRead = 256 << 10, ReadAheadKb = 256 });
        var (mp, server, _, _) = await MountPrefetchedAsync(rig, "splice/eio", blob, built.TocDigest);

        // A failing disk: every chunk file on the cache disk now leads to a file whose reads fail with EIO (a file of
        // a second FUSE mount that answers EIO), still where the layer trusts a verified chunk to be.
        using var broken = new Stargz.Fuse.Samples.MemoryFileSystem();
        broken.AddFile("eio.bin", new byte[2 << 20]).FailReads = Stargz.Fuse.Errno.EIO;
        var brokenMnt = rig.Dir.Sub("broken");
        using var brokenServer = Stargz.Fuse.FuseServer.Mount(brokenMnt, broken, new Stargz.Fuse.FuseMountOptions());
        var chunkFiles = Directory.GetFiles(Path.Combine(rig.Options.CacheDirectory!, "chunks"), "*", SearchOption.AllDirectories);
        Assert.True(chunkFiles.Length >= 4, $"{chunkFiles.Length} chunk files after prefetch");
        foreach (var f in chunkFiles)
        {
            File.Delete(f);
            File.CreateSymbolicLink(f, Path.Combine(brokenMnt, "eio.bin"));
        }

        Assert.Equal(big, await File.ReadAllBytesAsync(Path.Combine(mp, "big.bin"), Ct));
        // Every READ that met a failing file was counted once as a disk read error by the layer (not again when the
        // chunk cache then found the file gone), the file was dropped, and the READ was served through the chunk cache
        // (memory or the registry) instead of failing. (READs in flight together may each meet the same file.)
        Assert.True(server.FileReadErrors > 0, "no READ met a failing chunk file");
        Assert.Equal(server.FileReadErrors, rig.Manager.Cache.Disk.ReadErrors);
        Assert.Equal(0, server.SplicedReads);
        Assert.DoesNotContain(chunkFiles, f => new FileInfo(f).LinkTarget != null);
    }

    /// <summary>Pushes and mounts the blob and waits until its prefetch is done; returns what the caller checks.</summary>
    private static async Task<(string Mp, Stargz.Fuse.FuseServer Server, RemoteLayer Layer, long FetchedBefore)> MountPrefetchedAsync(
        LayerRig rig, string repo, byte[] blob, string tocDigest)
    {
        var digest = await rig.PushAsync(repo, blob, Ct);
        var mp = await rig.MountAsync(rig.Labels(repo, digest, tocDigest), Ct);
        var layer = rig.Manager.GetLayer(mp)!;
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(60), Ct);
        await layer.Fetcher.DrainAsync();
        Assert.Equal(FetchStageState.Done, layer.Stats.Snapshot().Prefetch);
        return (mp, rig.Manager.ServerOf(mp)!, layer, layer.Stats.Snapshot().FetchedBytes);
    }

    private static int OpenDescriptorsUnder(string dir)
    {
        int count = 0;
        foreach (var fd in Directory.EnumerateFileSystemEntries("/proc/self/fd"))
        {
            try { if (new FileInfo(fd).LinkTarget is { } t && t.StartsWith(dir + "/", StringComparison.Ordinal)) count++; }
            catch (IOException) { } // closed while listing
        }
        return count;
    }

    [Fact]
    public async Task UnmountingReleasesReadersWaitingForAnUnansweringRegistry()
    {
        var tar = ManyFilesTar(out var files);
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 64 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { FetchingTimeout = TimeSpan.FromSeconds(120) });
        var digest = await rig.PushAsync("unmount/layer", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("unmount/layer", digest, built.TocDigest), Ct);
        rig.Proxy.Down();
        var reader = Task.Factory.StartNew(() => File.ReadAllBytes(Path.Combine(mp, "f09.bin")), Ct, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        await Task.Delay(500, Ct);
        Assert.False(reader.IsCompleted);
        var sw = Stopwatch.StartNew();
        await rig.Manager.UnmountAsync(mp, Ct);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(30), $"unmount took {sw.Elapsed}");
        await Assert.ThrowsAnyAsync<IOException>(() => reader.WaitAsync(TimeSpan.FromSeconds(30), Ct));
        Assert.DoesNotContain(Mounts.List(), m => m.MountPoint == mp);
        rig.Proxy.Up();
    }

    [Fact]
    public async Task TheMountDoesNotWaitForPrefetchAndPrefetchStopsAtItsTimeout()
    {
        var (blobA, builtA) = await LayerRig.BuildAsync(TestTars.Write(w => TestTars.File(w, "a", Small(1))), null, Ct);
        var tarB = ManyFilesTar(out var files);
        var (blobB, builtB) = await LayerRig.BuildAsync(tarB, new BuildOptions
        {
            ChunkSize = 64 << 10, CompressionLevel = 1, Prioritized = ["f01.bin", "f02.bin", "f03.bin"],
        }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions
        {
            NoBackgroundFetch = true, PrefetchTimeout = TimeSpan.FromSeconds(1), FetchingTimeout = TimeSpan.FromSeconds(60),
        });
        var a = await rig.PushAsync("pto/app", blobA, Ct);
        var b = await rig.PushAsync("pto/app", blobB, Ct);
        await rig.MountAsync(rig.Labels("pto/app", a, builtA.TocDigest, a + "," + b), Ct);
        await rig.Manager.ResolutionOf($"{rig.Proxy.Host}/pto/app:latest", b)!.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        // B's TOC is at hand; its prefetch needs the registry, which now stops answering.
        rig.Proxy.Down();
        var sw = Stopwatch.StartNew();
        var mp = await rig.MountAsync(rig.Labels("pto/app", b, builtB.TocDigest, a + "," + b), Ct);
        sw.Stop();
        var layer = rig.Manager.GetLayer(mp)!;
        Assert.True(layer.PrefetchEnd > 0);
        Assert.NotEqual(FetchStageState.Done, layer.Stats.Snapshot().Prefetch); // mounted while prefetch is still waiting
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        var st = layer.Stats.Snapshot();
        Assert.Equal(FetchStageState.Failed, st.Prefetch);
        Assert.Contains("prefetch", st.LastError);
        rig.Proxy.Up();
        Assert.Equal(files["f02.bin"], await File.ReadAllBytesAsync(Path.Combine(mp, "f02.bin"), Ct));
        TestContext.Current.TestOutputHelper?.WriteLine($"mount with the registry away took {sw.Elapsed.TotalMilliseconds:0} ms");
    }
}
