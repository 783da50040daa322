using Microsoft.Win32.SafeHandles;

namespace Stargz.Layer;

/// <summary>
/// Open descriptors of verified chunk files on disk, by chunk digest, at most <c>capacity</c> of them (the reference's
/// <c>[directory_cache] max_cache_fds</c>), least recently used dropped first. Reads splice from them; the bridge
/// lends each handle for its reply (<see cref="Stargz.Fuse.FuseFileRange.TryLend"/>), so dropping one here never
/// closes it under a reply in flight. A hit costs a lock and a scan of a few entries, no allocation.
/// </summary>
internal sealed class ChunkFileHandles : IDisposable
{
    private readonly string?[] _keys;
    private readonly SafeFileHandle?[] _handles;
    private readonly long[] _lastUse;
    private long _clock;
    private bool _disposed;
    // Chunks with a descriptor here are pinned in the disk budget (never evicted while held).
    private readonly DiskBudget? _budget;

    public ChunkFileHandles(int capacity, DiskBudget? budget = null)
    {
        _budget = budget;
        capacity = Math.Max(1, capacity);
        _keys = new string?[capacity];
        _handles = new SafeFileHandle?[capacity];
        _lastUse = new long[capacity];
    }

    /// <summary>Descriptors held now.</summary>
    public int Count
    {
        get
        {
            lock (_keys)
            {
                int n = 0;
                foreach (var h in _handles) if (h != null) n++;
                return n;
            }
        }
    }

    public SafeFileHandle? TryGet(string key)
    {
        lock (_keys)
        {
            for (int i = 0; i < _keys.Length; i++)
            {
                if (_handles[i] != null && string.Equals(_keys[i], key, StringComparison.Ordinal))
                {
                    _lastUse[i] = ++_clock;
                    return _handles[i];
                }
            }
        }
        return null;
    }

    /// <summary>Keeps <paramref name="handle"/> for <paramref name="key"/> and returns the handle to use: an
    /// entry another thread added meanwhile wins (and <paramref name="handle"/> is closed).</summary>
    public SafeFileHandle Add(string key, SafeFileHandle handle)
    {
        SafeFileHandle? evicted = null;
        string? unpin = null, pin = null;
        lock (_keys)
        {
            if (_disposed)
            {
                evicted = handle; // closed below; the caller's lend then fails and the read takes the memory path
            }
            else
            {
                int slot = 0;
                for (int i = 0; i < _keys.Length; i++)
                {
                    if (_handles[i] != null && string.Equals(_keys[i], key, StringComparison.Ordinal))
                    {
                        _lastUse[i] = ++_clock;
                        evicted = handle;
                        handle = _handles[i]!;
                        slot = -1;
                        break;
                    }
                    if (_handles[i] == null || (_handles[slot] != null && _lastUse[i] < _lastUse[slot])) slot = i;
                }
                if (slot >= 0)
                {
                    evicted = _handles[slot];
                    if (evicted != null) unpin = _keys[slot];
                    pin = key;
                    _keys[slot] = key;
                    _handles[slot] = handle;
                    _lastUse[slot] = ++_clock;
                }
            }
        }
        evicted?.Dispose();
        if (pin != null) _budget?.Pin(CacheFileKind.Chunk, pin);
        if (unpin != null) _budget?.Unpin(CacheFileKind.Chunk, unpin);
        return handle;
    }

    /// <summary>Drops (and closes) the descriptor of <paramref name="key"/>, if one is held (its file failed a read).</summary>
    public void Remove(string key)
    {
        SafeFileHandle? dropped = null;
        lock (_keys)
        {
            for (int i = 0; i < _keys.Length; i++)
            {
                if (_handles[i] != null && string.Equals(_keys[i], key, StringComparison.Ordinal))
                {
                    dropped = _handles[i];
                    _handles[i] = null;
                    _keys[i] = null;
                    break;
                }
            }
        }
        if (dropped == null) return;
        dropped.Dispose(); // a reply in flight holds its own reference (TryLend)
        _budget?.Unpin(CacheFileKind.Chunk, key);
    }

    public void Dispose()
    {
        lock (_keys)
        {
            _disposed = true;
            for (int i = 0; i < _handles.Length; i++)
            {
                if (_handles[i] != null && _keys[i] is { } k) _budget?.Unpin(CacheFileKind.Chunk, k);
                _handles[i]?.Dispose();
                _handles[i] = null;
                _keys[i] = null;
            }
        }
    }
}
