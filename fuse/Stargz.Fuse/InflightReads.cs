using System.Collections.Concurrent;

namespace Stargz.Fuse;

/// <summary>
/// READs that went async, by request id, with the token FUSE_INTERRUPT cancels. An INTERRUPT can arrive before its
/// read is registered (the read was still running synchronously): it is remembered briefly and applied on arrival.
/// </summary>
internal sealed class InflightReads
{
    private const int MaxOrphanInterrupts = 1024;
    private readonly ConcurrentDictionary<ulong, CancellationTokenSource> _reads = new();
    private readonly ConcurrentDictionary<ulong, byte> _orphanInterrupts = new();

    public bool IsEmpty => _reads.IsEmpty;
    public int Count => _reads.Count;

    public void Add(ulong unique, CancellationTokenSource cts)
    {
        _reads[unique] = cts;
        if (!_orphanInterrupts.IsEmpty && _orphanInterrupts.TryRemove(unique, out _)) cts.Cancel();
    }

    public void Remove(ulong unique) => _reads.TryRemove(unique, out _);

    public void Interrupt(ulong target)
    {
        if (_reads.TryGetValue(target, out var cts))
        {
            try { cts.Cancel(); } catch (ObjectDisposedException) { }
            return;
        }
        // Either still running synchronously (finishes on its own) or about to go async: remember briefly.
        if (_orphanInterrupts.Count > MaxOrphanInterrupts) _orphanInterrupts.Clear();
        _orphanInterrupts[target] = 0;
    }

    /// <summary>The connection is gone: every read still running is told to stop.</summary>
    public void CancelAll()
    {
        foreach (var cts in _reads.Values)
        {
            try { cts.Cancel(); } catch (ObjectDisposedException) { }
        }
    }

    /// <summary>Waits until no read is in flight, at most <paramref name="limit"/>; true when none is left.</summary>
    public async Task<bool> DrainAsync(TimeSpan limit)
    {
        var deadline = DateTime.UtcNow + limit;
        while (!_reads.IsEmpty && DateTime.UtcNow < deadline) await Task.Delay(10).ConfigureAwait(false);
        return _reads.IsEmpty;
    }
}
