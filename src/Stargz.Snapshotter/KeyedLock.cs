namespace Stargz.Snapshotter;

/// <summary>One async mutex per key (single-flight): callers for the same key run one after another.</summary>
public sealed class KeyedLock
{
    private sealed class Entry { public readonly SemaphoreSlim Sem = new(1, 1); public int Refs; }

    private readonly Dictionary<string, Entry> _entries = new(StringComparer.Ordinal);

    public async Task<IDisposable> AcquireAsync(string key, CancellationToken ct)
    {
        Entry e;
        lock (_entries)
        {
            if (!_entries.TryGetValue(key, out e!)) _entries[key] = e = new Entry();
            e.Refs++;
        }
        try { await e.Sem.WaitAsync(ct); }
        catch
        {
            Release(key, e, signal: false);
            throw;
        }
        return new Releaser(this, key, e);
    }

    private void Release(string key, Entry e, bool signal)
    {
        if (signal) e.Sem.Release();
        lock (_entries)
        {
            if (--e.Refs == 0) _entries.Remove(key);
        }
    }

    private sealed class Releaser(KeyedLock owner, string key, Entry e) : IDisposable
    {
        private int _done;
        public void Dispose()
        {
            if (Interlocked.Exchange(ref _done, 1) == 0) owner.Release(key, e, signal: true);
        }
    }
}
