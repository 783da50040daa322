using Microsoft.Extensions.Logging;

namespace Stargz.Daemon;

/// <summary>
/// Hands memory back after a burst of work. A pull, a background fetch or an EROFS promotion grows the GC heap and the
/// shared array pool, and the GC keeps what it grew to (its budgets stay sized for the burst); a node daemon spends
/// most of its life idle, so the memory of the last burst would stay resident for nothing. Once the process has
/// allocated almost nothing for a while after a burst, one aggressive collection decommits the free memory; a second
/// one after the array pool's own trim period (it drops buffers unused for a minute on a full collection) frees those.
/// </summary>
internal sealed class IdleMemoryTrim : IDisposable
{
    private static readonly TimeSpan Tick = TimeSpan.FromSeconds(5);

    // Allocations per tick below this count as idle (the timer, metrics scrapes and health checks allocate a little).
    private const long IdleBytesPerTick = 1 << 20;

    // A trim is worth it only after this much was allocated since the last one.
    private const long BurstBytes = 32L << 20;

    // Idle ticks before the first trim (10 s) and before the second (75 s: past the array pool's 60 s).
    private const int FirstTrimTicks = 2, SecondTrimTicks = 15;

    private readonly ILogger _log;
    private readonly Func<long> _allocated;
    private readonly Action<string> _collect;
    private readonly Timer? _timer;
    private long _lastAllocated, _allocatedAtTrim;
    private int _idleTicks;
    private bool _burstPending;
    private bool _startUpPending;

    /// <summary>
    /// Trims this process every 5 s tick that finds it idle after a burst, and once when it first idles after start-up:
    /// building the host leaves a few MiB of garbage and grown GC budgets that no later collection would hand back
    /// while the daemon idles (one run: RSS 29.7 → 27.8 MiB 10 s after start, anonymous 11.6 → 9.0 MiB).
    /// </summary>
    public IdleMemoryTrim(ILogger log) : this(log, () => GC.GetTotalAllocatedBytes(false), null, trimAfterStartUp: true) =>
        _timer = new Timer(_ => OnTick(), null, Tick, Tick);

    /// <summary>No timer: the caller ticks (tests), reading allocations from <paramref name="allocated"/>.</summary>
    internal IdleMemoryTrim(ILogger log, Func<long> allocated, Action<string>? collect, bool trimAfterStartUp = false)
    {
        _log = log;
        _allocated = allocated;
        _collect = collect ?? Collect;
        _lastAllocated = _allocatedAtTrim = allocated();
        _startUpPending = trimAfterStartUp;
    }

    /// <summary>Collections made so far.</summary>
    public int Trims { get; private set; }

    internal void OnTick()
    {
        var allocated = _allocated();
        var sinceTick = allocated - _lastAllocated;
        _lastAllocated = allocated;
        if (sinceTick > IdleBytesPerTick)
        {
            _idleTicks = 0;
            return;
        }
        _idleTicks++;
        if (_idleTicks == FirstTrimTicks)
        {
            _burstPending = allocated - _allocatedAtTrim >= BurstBytes;
            if (_burstPending) Trim("idle after a burst");
            else if (_startUpPending) Trim("idle after start-up");
            _startUpPending = false;
        }
        else if (_idleTicks == SecondTrimTicks && _burstPending)
        {
            _burstPending = false;
            Trim("array pool trimmed");
        }
    }

    private void Trim(string why)
    {
        _collect(why);
        _allocatedAtTrim = _lastAllocated = _allocated();
        Trims++;
    }

    private void Collect(string why)
    {
        var before = Environment.WorkingSet;
        GC.Collect(GC.MaxGeneration, GCCollectionMode.Aggressive, blocking: true, compacting: true);
        _log.LogDebug("memory trimmed ({Why}): working set {Before} -> {After} bytes, GC heap {Heap} bytes",
            why, before, Environment.WorkingSet, GC.GetGCMemoryInfo().HeapSizeBytes);
    }

    public void Dispose() => _timer?.Dispose();
}
