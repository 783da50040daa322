using Microsoft.Win32.SafeHandles;

namespace Stargz.Layer;

/// <summary>
/// Whole compressed regions of one layer blob that a dense-region miss brought (see <c>ChunkFetcher.NextWindow</c>),
/// kept as they came from the registry, unverified, in unlinked files of the cache's tmp directory: the page cache holds
/// them, not the daemon's heap. A later miss whose range lies inside one is read from there and decoded and verified
/// like any fetched range, without a round trip; the region's other chunks are never decoded unless asked for. At most
/// <see cref="MaxRegions"/> per layer (1 MiB each by default), the least recently used dropped first; all dropped once
/// the layer has every chunk on disk, and gone with the layer's unmount or a daemon restart (the files have no name).
/// They count in the disk budget while kept (as <see cref="CacheFileKind.Toc"/>: never evicted by it); a region is
/// kept only where the budget has room for it or can make some from chunks nobody read and whole-file copies.
/// </summary>
internal sealed class CompressedRegions(string directory, DiskBudget budget) : IDisposable
{
    internal const int MaxRegions = 8;

    private readonly Lock _lock = new();
    // Most recently used last.
    private readonly List<(long Start, long End, SafeFileHandle File, string Key)> _regions = [];
    private bool _disposed;

    /// <summary>True when [<paramref name="start"/>, <paramref name="end"/>) lies inside a kept region.</summary>
    public bool Covers(long start, long end)
    {
        lock (_lock)
        {
            foreach (var r in _regions)
                if (start >= r.Start && end <= r.End) return true;
            return false;
        }
    }

    /// <summary>
    /// Fills <paramref name="destination"/> with the blob's bytes from <paramref name="offset"/> when a kept region
    /// holds all of them; false (nothing read) otherwise or when the file cannot be read.
    /// </summary>
    public bool TryRead(long offset, Span<byte> destination)
    {
        var end = offset + destination.Length;
        lock (_lock)
        {
            for (var i = _regions.Count - 1; i >= 0; i--)
            {
                var r = _regions[i];
                if (offset < r.Start || end > r.End) continue;
                try
                {
                    // From the page cache: microseconds, under the lock so that eviction cannot close the file meanwhile.
                    if (RandomAccess.Read(r.File, destination, offset - r.Start) != destination.Length) return false;
                }
                catch (IOException)
                {
                    return false;
                }
                _regions.RemoveAt(i);
                _regions.Add(r);
                return true;
            }
            return false;
        }
    }

    /// <summary>Keeps <paramref name="bytes"/>, the blob from <paramref name="start"/> (a failed write keeps nothing).</summary>
    public void Add(long start, ReadOnlySpan<byte> bytes)
    {
        // Only read chunks stand in its way: a region is an aid, they are what readers came back for.
        if (!budget.MakeRoom(bytes.Length, evictBelow: CacheFileKind.Chunk)) return;
        SafeFileHandle file;
        var path = Path.Combine(directory, "region-" + Guid.NewGuid().ToString("N"));
        try
        {
            file = File.OpenHandle(path, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return;
        }
        try
        {
            File.Delete(path); // unlinked: nothing is left behind, whatever happens to the daemon
            RandomAccess.Write(file, bytes, 0);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            file.Dispose();
            return;
        }
        lock (_lock)
        {
            if (_disposed)
            {
                file.Dispose();
                return;
            }
            if (_regions.Count >= MaxRegions)
            {
                Drop(_regions[0]);
                _regions.RemoveAt(0);
            }
            _regions.Add((start, start + bytes.Length, file, path));
            budget.Added(CacheFileKind.Toc, path, path, bytes.Length);
        }
    }

    /// <summary>Drops every kept region (the layer has all its chunks on disk; later regions may still be kept).</summary>
    public void Clear()
    {
        lock (_lock)
        {
            foreach (var r in _regions) Drop(r);
            _regions.Clear();
        }
    }

    private void Drop((long Start, long End, SafeFileHandle File, string Key) r)
    {
        r.File.Dispose();
        budget.Removed(CacheFileKind.Toc, r.Key);
    }

    public void Dispose()
    {
        lock (_lock)
        {
            _disposed = true;
            Clear();
        }
    }
}
