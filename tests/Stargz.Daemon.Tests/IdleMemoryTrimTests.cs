using Microsoft.Extensions.Logging.Abstractions;
using Stargz.Daemon;

namespace Stargz.Daemon.Tests;

/// <summary>When the daemon hands memory back: only idle, only after a burst, twice per idle period.</summary>
public class IdleMemoryTrimTests
{
    private const long MiB = 1 << 20;

    private sealed class Process
    {
        public long Allocated;
        public readonly List<string> Collections = [];
        public IdleMemoryTrim Trim(bool afterStartUp = false) => new(NullLogger.Instance, () => Allocated, Collections.Add, afterStartUp);
    }

    [Fact]
    public void ABurstThenQuietIsTrimmedAfterTwoIdleTicksAndAgainAfterTheArrayPoolsMinute()
    {
        var p = new Process();
        using var trim = p.Trim();
        for (var i = 0; i < 10; i++) { p.Allocated += 20 * MiB; trim.OnTick(); } // busy: 200 MiB
        Assert.Empty(p.Collections);
        trim.OnTick(); // idle 1
        Assert.Empty(p.Collections);
        trim.OnTick(); // idle 2
        Assert.Single(p.Collections);
        for (var i = 3; i < 15; i++) { p.Allocated += 100_000; trim.OnTick(); } // idle: metrics scrapes allocate a little
        Assert.Single(p.Collections);
        trim.OnTick(); // idle 15: the pool has dropped its unused buffers by now
        Assert.Equal(2, p.Collections.Count);
        for (var i = 0; i < 100; i++) trim.OnTick(); // a long quiet: nothing more to hand back
        Assert.Equal(2, trim.Trims);
    }

    [Fact]
    public void QuietWithoutABurstNeverCollects()
    {
        var p = new Process();
        using var trim = p.Trim();
        // 20 MiB in all, under the 32 MiB that makes a trim worth it: the GC's own collections handle that much.
        for (var i = 0; i < 20; i++) { p.Allocated += MiB / 2; trim.OnTick(); }
        for (var round = 0; round < 5; round++)
        {
            p.Allocated += 2 * MiB; // a short wake-up (a Check, a stat): under the burst size
            trim.OnTick();
            for (var i = 0; i < 20; i++) trim.OnTick();
        }
        Assert.Empty(p.Collections);
    }

    [Fact]
    public void WorkResumingResetsTheIdleCountAndANewBurstIsTrimmedAgain()
    {
        var p = new Process();
        using var trim = p.Trim();
        p.Allocated += 64 * MiB;
        trim.OnTick();
        trim.OnTick(); // idle 1
        p.Allocated += 64 * MiB; // busy again before the trim
        trim.OnTick();
        trim.OnTick(); // idle 1
        Assert.Empty(p.Collections);
        trim.OnTick(); // idle 2
        Assert.Single(p.Collections);
        p.Allocated += 40 * MiB;
        trim.OnTick();
        trim.OnTick();
        trim.OnTick();
        Assert.Equal(2, p.Collections.Count);
    }

    [Fact]
    public void TheFirstIdlePeriodAfterStartUpIsTrimmedOnceWithoutABurst()
    {
        var p = new Process();
        using var trim = p.Trim(afterStartUp: true);
        trim.OnTick(); // idle 1
        Assert.Empty(p.Collections);
        trim.OnTick(); // idle 2: the host's start-up garbage goes
        Assert.Equal(["idle after start-up"], p.Collections);
        for (var round = 0; round < 5; round++)
        {
            p.Allocated += 2 * MiB; // short wake-ups, no burst: nothing more
            trim.OnTick();
            for (var i = 0; i < 20; i++) trim.OnTick();
        }
        Assert.Single(p.Collections);

        // A pull before the daemon first idles: its burst trim (and the pool's) stand for the start-up one.
        var q = new Process();
        using var busy = q.Trim(afterStartUp: true);
        q.Allocated += 64 * MiB;
        busy.OnTick();
        for (var i = 0; i < 40; i++) busy.OnTick();
        Assert.Equal(["idle after a burst", "array pool trimmed"], q.Collections);
    }
}
