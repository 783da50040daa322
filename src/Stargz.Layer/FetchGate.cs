namespace Stargz.Layer;

/// <summary>
/// Bounds registry fetches in flight (<c>max_concurrency</c>, shared by all layers) and orders them: on-demand reads
/// take a slot as soon as one is free; prefetch takes free slots; background fetch waits while any on-demand fetch
/// is waiting or running, and holds at most one slot, so a reader in the kernel never queues behind it.
/// </summary>
internal sealed class FetchGate : IDisposable
{
    private readonly SemaphoreSlim _slots;
    private readonly SemaphoreSlim _backgroundSlot = new(1, 1);
    private int _onDemand;

    public FetchGate(int maxConcurrency) => _slots = new SemaphoreSlim(Math.Max(1, maxConcurrency));

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
        if (priority == FetchPriority.OnDemand) Interlocked.Decrement(ref _onDemand);
        else if (priority == FetchPriority.Background) _backgroundSlot.Release();
    }

    public void Dispose()
    {
        _slots.Dispose();
        _backgroundSlot.Dispose();
    }
}
