using System.Diagnostics;
using System.Runtime.CompilerServices;
using Stargz.Layer;

namespace Stargz.Layer.Tests.Unit;

/// <summary>The quiet period: background fetch waits for mounts, checks and prefetch to go quiet (the reference's 5 s).</summary>
public class FetchGateTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task TheQuietPeriodRunsFromTheLastMountAndEachMountRestartsIt()
    {
        var quiet = TimeSpan.FromSeconds(1);
        using var gate = new FetchGate(2, quiet);
        gate.NotePriorityWork(); // a mount
        var waiting = gate.WaitQuietAsync(Ct).AsTask();
        await Task.Delay(600, Ct);
        Assert.False(waiting.IsCompleted, "the quiet period ended early");
        var secondMount = Stopwatch.StartNew();
        gate.NotePriorityWork(); // another mount, 0.6 s later: the wait starts over
        await waiting.WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.True(secondMount.Elapsed >= quiet - TimeSpan.FromMilliseconds(20), $"ended {secondMount.Elapsed} after the last mount");
    }

    [Fact]
    public async Task PrefetchCountsAsPriorityWorkAndOnDemandReadsDoNot()
    {
        var quiet = TimeSpan.FromSeconds(1);
        using var gate = new FetchGate(2, quiet);
        await gate.EnterAsync(FetchPriority.Prefetch, Ct);
        var sincePrefetch = Stopwatch.StartNew();
        gate.Exit(FetchPriority.Prefetch);
        await gate.WaitQuietAsync(Ct).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.True(sincePrefetch.Elapsed >= quiet - TimeSpan.FromMilliseconds(20), $"ended {sincePrefetch.Elapsed} after the prefetch");

        // On-demand reads hold background fetch back only while they wait or run (they never start the quiet
        // period: a container reading now and then must not keep its layers from being fetched whole).
        using var idle = new FetchGate(2, TimeSpan.FromMinutes(5));
        await idle.EnterAsync(FetchPriority.OnDemand, Ct);
        var held = idle.EnterAsync(FetchPriority.Background, Ct).AsTask();
        await Task.Delay(200, Ct);
        Assert.False(held.IsCompleted, "background fetch ran beside a waiting on-demand read");
        idle.Exit(FetchPriority.OnDemand);
        await idle.WaitQuietAsync(Ct).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Ct); // not the five minutes
        await held.WaitAsync(TimeSpan.FromSeconds(20), Ct);
        idle.Exit(FetchPriority.Background);
    }

    [Fact]
    public async Task WithoutAQuietPeriodMountsDoNotHoldBackgroundFetch()
    {
        using var gate = new FetchGate(2);
        gate.NotePriorityWork();
        await gate.WaitQuietAsync(Ct).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Ct);
    }

    [Fact]
    public async Task ABackgroundFetchSittingOutTheQuietPeriodHoldsNoChunkAReaderNeeds()
    {
        var b = new BlobBuilder();
        for (var i = 0; i < 10; i++) b.AddFile("f" + i, BlobBuilder.Random(20_000, 300 + i), 20_000);
        var blob = b.Build();
        var all = b.ByBlobOffset();
        using var rig = new FetcherRig(blob, new LayerOptions { BackgroundQuietPeriod = TimeSpan.FromMinutes(5) });
        rig.Gate.NotePriorityWork(); // a mount: background fetch must wait five minutes
        var background = rig.Fetcher.FetchAllAsync(all, new StrongBox<int>(0), all.Length, FetchPriority.Background, TimeSpan.Zero, null, Ct);
        await Task.Delay(200, Ct);
        Assert.False(background.IsCompleted);
        // A reader of the first file is served now, not after the quiet period.
        var (content, chunks) = b.Files["f0"];
        var buf = new byte[content.Length];
        Assert.Equal(buf.Length, await rig.Fetcher.ReadAsync(chunks, content.Length, 0, buf, Ct).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Ct));
        Assert.Equal(content, buf);
        Assert.Equal(1, rig.Blob.Calls);
    }

    [Fact]
    public async Task ALayerCachedWholeIsNotHeldByTheQuietPeriod()
    {
        var b = new BlobBuilder();
        for (var i = 0; i < 10; i++) b.AddFile("f" + i, BlobBuilder.Random(20_000, 400 + i), 20_000);
        var blob = b.Build();
        var all = b.ByBlobOffset();
        using var rig = new FetcherRig(blob, new LayerOptions { BackgroundQuietPeriod = TimeSpan.FromMinutes(5) });
        await rig.Fetcher.AcquireAsync(all, 0, all.Length, null, FetchPriority.OnDemand, Ct); // everything cached
        rig.Gate.NotePriorityWork(); // a mount (after a restart, say)
        // The background pass finds nothing to fetch and ends now, not five minutes later.
        await rig.Fetcher.FetchAllAsync(all, new StrongBox<int>(0), all.Length, FetchPriority.Background, TimeSpan.Zero, null, Ct)
            .WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.Equal(1, rig.Blob.Calls);
    }
}
