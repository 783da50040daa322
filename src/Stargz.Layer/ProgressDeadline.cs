namespace Stargz.Layer;

/// <summary>
/// A token that is cancelled once a progress counter (bytes the blob received, by any request) has stood still for
/// <c>limit</c>: a fetch then fails with EIO when the registry is dead, frozen or refusing, but never while bytes
/// keep arriving, however slowly (and a fetch waiting behind a moving one is not cut either).
/// </summary>
internal sealed class ProgressDeadline : IDisposable
{
    private readonly CancellationTokenSource _cts;
    private readonly Func<long> _progress;
    private readonly long _limitMs;
    private readonly Timer _timer;
    private long _last;
    private long _changedAt;

    public ProgressDeadline(CancellationToken outer, TimeSpan limit, Func<long> progress)
    {
        _cts = CancellationTokenSource.CreateLinkedTokenSource(outer);
        _progress = progress;
        _limitMs = Math.Max(1, (long)limit.TotalMilliseconds);
        _last = progress();
        _changedAt = Environment.TickCount64;
        // Checked a few times per limit (at least every second): the token ends between limit and limit + period
        // after the last progress.
        var period = TimeSpan.FromMilliseconds(Math.Clamp(_limitMs / 4, 10, 1000));
        _timer = new Timer(static s => ((ProgressDeadline)s!).Tick(), this, period, period);
    }

    public CancellationToken Token => _cts.Token;

    private void Tick()
    {
        var now = Environment.TickCount64;
        var v = _progress();
        if (v != _last)
        {
            _last = v;
            _changedAt = now;
            return;
        }
        if (now - _changedAt < _limitMs) return;
        _timer.Change(Timeout.Infinite, Timeout.Infinite);
        try { _cts.Cancel(); }
        catch (ObjectDisposedException) { }
    }

    public void Dispose()
    {
        _timer.Dispose();
        _cts.Dispose();
    }
}
