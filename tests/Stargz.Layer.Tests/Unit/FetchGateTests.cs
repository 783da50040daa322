using System.Diagnostics;
using Stargz.Layer;

namespace Stargz.Layer.Tests.Unit;

/// <summary>The quiet period: background fetch waits for mounts, checks and prefetch to go quiet (the reference's 5 s).</summary>
public class FetchGateTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task BackgroundFetchStartsOnlyAfterTheQuietPeriodAndEachMountRestartsIt()
    {
        var quiet = TimeSpan.FromSeconds(1);
        using var gate = new FetchGate(2, quiet);
        gate.NotePriorityWork(); // a mount
        var background = gate.EnterAsync(FetchPriority.Background, Ct).AsTask();
        await Task.Delay(600, Ct);
        Assert.False(background.IsCompleted, "background fetch began within the quiet period");
        var secondMount = Stopwatch.StartNew();
        gate.NotePriorityWork(); // another mount, 0.6 s later: the wait starts over
        await background.WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.True(secondMount.Elapsed >= quiet - TimeSpan.FromMilliseconds(20), $"began {secondMount.Elapsed} after the last mount");
        gate.Exit(FetchPriority.Background);
    }

    [Fact]
    public async Task PrefetchCountsAsPriorityWorkAndOnDemandReadsDoNot()
    {
        var quiet = TimeSpan.FromSeconds(1);
        using var gate = new FetchGate(2, quiet);
        await gate.EnterAsync(FetchPriority.Prefetch, Ct);
        var sincePrefetch = Stopwatch.StartNew();
        gate.Exit(FetchPriority.Prefetch);
        await gate.EnterAsync(FetchPriority.Background, Ct).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.True(sincePrefetch.Elapsed >= quiet - TimeSpan.FromMilliseconds(20), $"began {sincePrefetch.Elapsed} after the prefetch");
        gate.Exit(FetchPriority.Background);

        // On-demand reads hold background fetch back only while they wait or run (they never stop it for long:
        // a container reading now and then must not keep its layers from being fetched whole).
        using var idle = new FetchGate(2, TimeSpan.FromMinutes(5));
        await idle.EnterAsync(FetchPriority.OnDemand, Ct);
        var held = idle.EnterAsync(FetchPriority.Background, Ct).AsTask();
        await Task.Delay(200, Ct);
        Assert.False(held.IsCompleted, "background fetch ran beside a waiting on-demand read");
        idle.Exit(FetchPriority.OnDemand);
        await held.WaitAsync(TimeSpan.FromSeconds(20), Ct); // not the five minutes of the quiet period
        idle.Exit(FetchPriority.Background);
    }

    [Fact]
    public async Task WithoutAQuietPeriodBackgroundFetchDoesNotWaitForMounts()
    {
        using var gate = new FetchGate(2);
        gate.NotePriorityWork();
        await gate.EnterAsync(FetchPriority.Background, Ct).AsTask().WaitAsync(TimeSpan.FromSeconds(20), Ct);
        gate.Exit(FetchPriority.Background);
    }
}
