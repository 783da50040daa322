using System.Diagnostics;

namespace Stargz.Layer;

/// <summary>
/// Bounds registry fetches in flight (<c>max_concurrency</c>, shared by all layers) and orders them: on-demand reads
/// take a slot as soon as one is free; prefetch takes free slots; background fetch waits while any on-demand fetch
/// is waiting or running, and holds at most one slot, so a reader in the kernel never queues behind it. With a quiet
/// period, background fetch also waits (<see cref="WaitQuietAsync"/>, before each batch) until mounts, checks and
/// prefetch (<see cref="NotePriorityWork"/>) have been quiet that long, as the reference's does (5 s), so it does not
/// compete with containers that are starting.
/// </summary>
internal sealed class FetchGate : IDisposable
{
    private readonly SemaphoreSlim _slots;
    private readonly SemaphoreSlim _backgroundSlot = new(1, 1);
    private readonly TimeSpan _quietPeriod;
    private int _onDemand;
    private long _lastPriorityWork; // Stopwatch timestamp; 0 = never

    public FetchGate(int maxConcurrency, TimeSpan quietPeriod = default)
    {
        _slots = new SemaphoreSlim(Math.Max(1, maxConcurrency));
        _quietPeriod = quietPeriod;
    }

    /// <summary>A mount, check or prefetch is running or just ended: background fetch waits the quiet period again.</summary>
    public void NotePriorityWork() => Volatile.Write(ref _lastPriorityWork, Stopwatch.GetTimestamp());

    /// <summary>
    /// Background fetch calls this before it claims its next batch (not inside <see cref="EnterAsync"/>: chunks it has
    /// claimed are waited for by any reader that needs them, and must not sit out a quiet period).
    /// </summary>
    public async ValueTask WaitQuietAsync(CancellationToken cancellationToken)
    {
        while (QuietLeft() is var left && left > TimeSpan.Zero)
            await Task.Delay(left, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>How much longer background fetch must wait for the quiet period (zero: none).</summary>
    private TimeSpan QuietLeft()
    {
        var last = Volatile.Read(ref _lastPriorityWork);
        if (_quietPeriod <= TimeSpan.Zero || last == 0) return TimeSpan.Zero;
        var left = _quietPeriod - Stopwatch.GetElapsedTime(last);
        return left > TimeSpan.Zero ? left : TimeSpan.Zero;
    }

    /// <summary>On-demand fetches waiting for or holding a slot.</summary>
    public int OnDemandActive => Volatile.Read(ref _onDemand);

    public async ValueTask EnterAsync(FetchPriority priority, CancellationToken cancellationToken)
    {
        switch (priority)
        {
            case FetchPriority.OnDemand:
                Interlocked.Increment(ref _onDemand);
                try { await _slots.WaitAsync(cancellationToken).ConfigureAwait(false); }
                catch { Interlocked.Decrement(ref _onDemand); throw; }
                return;
            case FetchPriority.Prefetch:
                NotePriorityWork();
                await _slots.WaitAsync(cancellationToken).ConfigureAwait(false);
                return;
            default:
                await _backgroundSlot.WaitAsync(cancellationToken).ConfigureAwait(false);
                try
                {
                    while (true)
                    {
                        while (Volatile.Read(ref _onDemand) > 0)
                            await Task.Delay(5, cancellationToken).ConfigureAwait(false);
                        await _slots.WaitAsync(cancellationToken).ConfigureAwait(false);
                        if (Volatile.Read(ref _onDemand) == 0) return;
                        _slots.Release(); // a reader arrived meanwhile: let it go first
                    }
                }
                catch { _backgroundSlot.Release(); throw; }
        }
    }

    public void Exit(FetchPriority priority)
    {
        _slots.Release();
        if (priority == FetchPriority.Prefetch) NotePriorityWork();
        if (priority == FetchPriority.OnDemand) Interlocked.Decrement(ref _onDemand);
        else if (priority == FetchPriority.Background) _backgroundSlot.Release();
    }

    public void Dispose()
    {
        _slots.Dispose();
        _backgroundSlot.Dispose();
    }
}
