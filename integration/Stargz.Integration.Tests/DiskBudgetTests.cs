using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using LiteDB;
using Stargz.Cri.V1;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// [directory_cache] max_disk_mb, what remote snapshots hold in the cache (Usage, CRI ImageFsInfo), and the start-up
/// sweep of cache files no snapshot refers to.
/// </summary>
public class DiskBudgetTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    /// <summary>Bytes of every file the daemon keeps for its layers: chunks, whole-file copies, temp files, TOCs.</summary>
    private static long CacheBytes(string root)
    {
        long n = 0;
        foreach (var sub in new[] { "cache", "toc" })
        {
            var d = Path.Combine(root, "stargz", sub);
            if (!Directory.Exists(d)) continue;
            foreach (var f in Directory.EnumerateFiles(d, "*", SearchOption.AllDirectories))
            {
                try { n += new FileInfo(f).Length; }
                catch (FileNotFoundException) { }
            }
        }
        return n;
    }

    [Fact]
    public async Task WithABudgetOfAQuarterOfTheImagePullRunAndBackgroundFetchNeverExceedItAndANewContainerReadsRightBytes()
    {
        const int budgetMb = 8;
        await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 300, backgroundFetch: true, extraToml: $"""
            [directory_cache]
            max_disk_mb = {budgetMb}
            """);
        var files = new Dictionary<string, int>();
        for (var i = 0; i < 4; i++) files[$"d{i}.bin"] = 8 << 10; // 32 MiB of data: four times the budget
        var img = await rig.PushImageAsync("budget/quarter", files, seed: 921, "--estargz-chunk-size", "262144");

        // Sampled throughout: pull, run, background fetch, a second container.
        long max = 0;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        var sampler = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                max = Math.Max(max, CacheBytes(rig.DaemonRoot));
                try { await Task.Delay(50, stop.Token); } catch (OperationCanceledException) { }
            }
        }, Ct);
        await rig.RpullAsync(img.Estargz);
        var first = await rig.RunDetachedAsync(img.Estargz, "first", "/bin/sleep", "3600");
        Assert.Equal(img.Sha256, await rig.Sha256OfDataFilesInAsync(first));
        // The background fetch runs once things are quiet, fills the budget and stops there.
        var limit = (double)budgetMb * (1 << 20);
        await rig.WaitMetricAsync("stargz_cache_disk_bytes", v => v >= limit * 0.9, TimeSpan.FromSeconds(120));
        await Task.Delay(TimeSpan.FromSeconds(10), Ct);
        Assert.True(await rig.MetricAsync("stargz_layers_fully_fetched") < 2, "a layer bigger than the budget counts as fully fetched");

        // A restart (memory and page cache gone): what was evicted is fetched again, verified, within the budget.
        await rig.RemoveContainersAsync();
        Assert.Equal(0, await rig.Daemon.StopAsync());
        await rig.Daemon.RestartAsync();
        await rig.WaitContainerdReachesDaemonAsync();
        var second = await rig.RunDetachedAsync(img.Estargz, "second", "/bin/sleep", "3600");
        Assert.Equal(img.Sha256, await rig.Sha256OfDataFilesInAsync(second));
        stop.Cancel();
        await sampler;

        // Within the budget plus one background batch (prefetch_chunk_size, 4 MiB by default).
        Assert.True(max <= (long)limit + (4 << 20), $"the cache held {max} bytes; budget {limit}");
        var evictions = await rig.MetricAsync("stargz_cache_evictions");
        var refetched = await rig.MetricAsync("stargz_cache_refetched_chunks");
        TestContext.Current.TestOutputHelper?.WriteLine($"cache peak {max} bytes (budget {limit}), {evictions} evictions, {refetched} chunks fetched again");
        Assert.True(evictions > 0, "nothing was evicted (after the restart)");
        Assert.True(refetched > 0, "no evicted chunk was fetched again");
        Assert.Equal(limit, await rig.MetricAsync("stargz_cache_disk_limit_bytes"));
    }

    [Fact]
    public async Task UsageOfARemoteSnapshotIsWhatItsLayerHoldsInTheCacheAndCriImageFsInfoIncludesIt()
    {
        var ct = Ct;
        await using var rig = await E2eRig.StartAsync(enableCri: true);
        var l1 = rig.Work.Sub("usage-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("usage-l2");
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        var data = new byte[6 << 20];
        new Random(931).NextBytes(data);
        await File.WriteAllBytesAsync(Path.Combine(l2, "data", "blob.bin"), data, ct);
        var image = await rig.PushEstargzAsync("budget/usage", [l1, l2]);
        using var cri = new CriClient(rig.Containerd.Socket);
        await cri.Images.PullImageAsync(new PullImageRequest { Image = new ImageSpec { Image = image } }, cancellationToken: ct);
        (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "run", "--rm", "--snapshotter", "stargz", image, "usage-read", "/bin/sha256sum", "/data/blob.bin"))
            .EnsureSuccess("reading the data in a container");

        using var ch = Client.Channel(rig.Daemon.Socket);
        var sn = new Snapshots.SnapshotsClient(ch);
        var remote = new List<Info>();
        using (var list = sn.List(new ListSnapshotsRequest { Snapshotter = "stargz" }, cancellationToken: ct))
            await foreach (var r in list.ResponseStream.ReadAllAsync(ct))
                remote.AddRange(r.Info.Where(i => i.Labels.TryGetValue("containerd.io/snapshot/remote", out var v) && v == "remote snapshot"));
        Assert.Equal(2, remote.Count);
        long total = 0;
        foreach (var r in remote)
        {
            var u = await sn.UsageAsync(new UsageRequest { Snapshotter = "stargz", Key = r.Name }, cancellationToken: ct);
            Assert.True(u.Size > 0, $"remote snapshot {r.Name} reports no usage");
            total += u.Size;
        }
        // The data file was read whole: its layer holds at least its bytes (chunks are stored uncompressed).
        Assert.True(total >= data.Length, $"usage {total} < {data.Length} bytes read");

        // containerd's CRI plugin sums its snapshots' usage (refreshed every 10 s) into ImageFsInfo.
        ulong used = 0;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (DateTime.UtcNow < deadline)
        {
            var fs = await cri.Images.ImageFsInfoAsync(new ImageFsInfoRequest(), cancellationToken: ct);
            used = fs.ImageFilesystems.Aggregate(0UL, (a, f) => a + (f.UsedBytes?.Value ?? 0));
            if (used >= (ulong)data.Length) break;
            await Task.Delay(1000, ct);
        }
        Assert.True(used >= (ulong)data.Length, $"ImageFsInfo reports {used} bytes used; the remote layers hold {total}");
    }

    [Fact]
    public async Task ARestartAfterASnapshotWasRemovedWithoutItsCacheBeingFreedLeavesNoOrphan()
    {
        await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 300, backgroundFetch: true);
        var keep = await rig.PushImageAsync("sweep/keep", new Dictionary<string, int> { ["k.bin"] = 2048 }, seed: 941);
        var gone = await rig.PushImageAsync("sweep/gone", new Dictionary<string, int> { ["g.bin"] = 3072 }, seed: 942);
        await rig.RpullAsync(keep.Estargz);
        await rig.RpullAsync(gone.Estargz);
        // Both images' two layers fully fetched (their busybox layers differ in their tar headers).
        Assert.Equal(4, await rig.WaitMetricAsync("stargz_layers_fully_fetched", v => v == 4, TimeSpan.FromSeconds(180)));
        var before = rig.CacheFiles();

        // The state a crash between remove and free leaves (containerd's GC removed the image's snapshots, the cache kept
        // their data): here the daemon killed, the records of both layers of "gone" deleted from its store.
        var goneLayers = (await DaemonMetrics.ManifestLayersAsync(rig.RegistryHost, "sweep/gone", "esgz")).Select(l => l.Digest).ToList();
        await rig.Daemon.KillAsync();
        using (var db = new LiteDatabase(new ConnectionString { Filename = Path.Combine(rig.DaemonRoot, "metadata.db"), Connection = ConnectionType.Direct }))
        {
            var snaps = db.GetCollection("snapshots");
            var docs = snaps.FindAll().Where(d => d["labels"].AsArray.Any(l =>
                l["k"].AsString == "containerd.io/snapshot/remote/stargz.reference" && l["v"].AsString == gone.Estargz)).ToList();
            Assert.Equal(2, docs.Count);
            foreach (var d in docs) snaps.Delete(d["_id"]);
        }
        await rig.Daemon.RestartAsync();
        await rig.WaitContainerdReachesDaemonAsync();

        var after = rig.CacheFiles();
        var tocs = Directory.GetFiles(Path.Combine(rig.DaemonRoot, "stargz", "toc"));
        Assert.False(tocs.Any(t => goneLayers.Any(g => Path.GetFileName(t).StartsWith(g.Replace(':', '-'), StringComparison.Ordinal))),
            $"the removed layer's TOC is still there\n{string.Join("\n", rig.Daemon.Log.Split('\n').Where(l => l.Contains("sweep") || l.Contains("restor")))}");
        Assert.Equal(2, tocs.Length);
        // The removed data layer's 3 MiB of chunks are gone (its busybox layer's chunks are the kept image's too), nothing else.
        var freed = before.Where(f => !after.ContainsKey(f.Key)).Sum(f => f.Value);
        Assert.InRange(freed, 3L << 20, (3L << 20) + (256 << 10));
        Assert.All(after, f => Assert.True(before.ContainsKey(f.Key), $"new file {f.Key}"));
        Assert.Contains("start-up sweep", rig.Daemon.Log);
        // The kept image still runs from its cached layers.
        Assert.Equal(keep.Sha256["k.bin"], await rig.Sha256InContainerAsync(keep.Estargz, "kept", "k.bin"));
    }
}
