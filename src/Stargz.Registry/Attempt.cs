namespace Stargz.Registry;

/// <summary>
/// One try of a registry operation. Its <see cref="Token"/> ends when the caller cancels, when the attempt's hard
/// timeout passes (if it has one), or when it stalls: nothing received for the stall timeout. Whoever reads the
/// response calls <see cref="Progress"/> when headers or body bytes arrive; that re-arms the stall timer, so a slow
/// transfer that keeps moving is never cut.
/// </summary>
internal sealed class Attempt : IDisposable
{
    private readonly CancellationTokenSource _cts;
    private readonly CancellationTokenSource? _hard;
    private readonly long _stallMs;
    private long _armedAt;
    private long _lastProgress;

    /// <param name="ct">the caller's token.</param>
    /// <param name="hard">a total limit for the attempt, or null.</param>
    /// <param name="stall">no-progress limit; zero or less: none.</param>
    public Attempt(CancellationToken ct, TimeSpan? hard, TimeSpan stall)
    {
        if (hard is { } h && h > TimeSpan.Zero && h != Timeout.InfiniteTimeSpan)
        {
            _hard = new CancellationTokenSource(h);
            _cts = CancellationTokenSource.CreateLinkedTokenSource(ct, _hard.Token);
        }
        else
        {
            _cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        }
        _stallMs = stall > TimeSpan.Zero ? (long)stall.TotalMilliseconds : 0;
        _armedAt = Environment.TickCount64;
        if (_stallMs > 0) _cts.CancelAfter(TimeSpan.FromMilliseconds(_stallMs));
    }

    public CancellationToken Token => _cts.Token;

    /// <summary>When this attempt last received something (Environment.TickCount64), 0 if never.</summary>
    public long LastProgress => Volatile.Read(ref _lastProgress);

    /// <summary>The hard timeout ended the attempt.</summary>
    public bool TimedOut => _hard?.IsCancellationRequested == true;

    /// <summary>Headers or body bytes arrived.</summary>
    public void Progress()
    {
        var now = Environment.TickCount64;
        Volatile.Write(ref _lastProgress, now);
        // Re-arming costs a timer update: done at most 8 times per stall period (the watchdog then fires after 7/8 to
        // 8/8 of the period without progress).
        if (_stallMs == 0 || now - _armedAt < _stallMs / 8) return;
        _armedAt = now;
        try { _cts.CancelAfter(TimeSpan.FromMilliseconds(_stallMs)); }
        catch (ObjectDisposedException) { }
    }

    public void Dispose()
    {
        _cts.Dispose();
        _hard?.Dispose();
    }
}
