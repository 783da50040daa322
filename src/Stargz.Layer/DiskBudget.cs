using System.Collections.Concurrent;

namespace Stargz.Layer;

/// <summary>What a file in the disk cache is, in the order eviction takes them.</summary>
public enum CacheFileKind
{
    /// <summary>A chunk the background fetch brought in that nobody has read since: evicted first.</summary>
    BackgroundChunk = 0,
    /// <summary>A whole-file copy for passthrough: evicted before the chunks it was built from.</summary>
    Copy = 1,
    /// <summary>A chunk that was read (on demand, prefetch, or from disk since).</summary>
    Chunk = 2,
    /// <summary>
    /// A promoted layer's EROFS image (key = layer digest): evicted last, least recently mounted first, through
    /// <see cref="DiskBudget.Images"/>, which puts the layer back on lazy FUSE.
    /// </summary>
    Image = 3,
    /// <summary>
    /// A stored TOC (or an evicted image the kernel still holds, or a compressed region an on-demand miss keeps until its
    /// layer drops it): counted, never evicted.
    /// </summary>
    Toc = 4,
}

/// <summary>What the budget needs from the owner of the promoted images to evict one (the layer manager).</summary>
internal interface IImageEviction
{
    /// <summary>Deletes evicted images nothing holds any more (taking them out of the budget); true when one is still held.</summary>
    bool FreeHeld();

    /// <summary>
    /// Takes the layer's image out of use (its mounts go back to lazy FUSE, its record is removed) and deletes it, or,
    /// while a running container still reads it, keeps counting it until it is freed. False when it could not be done.
    /// </summary>
    bool Evict(string layerDigest);
}

/// <summary>
/// The bytes the disk cache holds (chunks, whole-file copies, TOCs) and, with <c>[directory_cache] max_disk_mb</c>, the
/// budget they stay within: adding a file evicts the least recently used ones first — background-fetched chunks nobody
/// read, then whole-file copies, then chunks that were read — skipping pinned files (held open by a mount), and last
/// promoted layers' EROFS images, least recently mounted first (<see cref="Images"/>). Without a budget it only
/// counts (Usage, metrics). Every method is thread-safe; evictions are serialized.
/// </summary>
public sealed class DiskBudget
{
    internal sealed class Entry(CacheFileKind kind, string key, string path, long size, long lastUse)
    {
        public readonly string Key = key;
        public readonly string Path = path;
        public readonly long Size = size;
        public int Kind = (int)kind;
        public long LastUse = lastUse;
        public int Pins;
    }

    private readonly ConcurrentDictionary<string, Entry> _chunks = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, Entry> _copies = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, Entry> _tocs = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, Entry> _images = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, int> _pinsBeforeAdd = new(StringComparer.Ordinal);
    private readonly object _evicting = new();
    private long _used, _evictions, _evictedBytes, _imageEvictions;

    /// <summary>The budget in bytes; 0 = unbounded (counting only).</summary>
    public long Limit { get; set; }

    /// <summary>How far the background fetch may go over the budget: one fetch batch (it checks for room before each).</summary>
    public long BackgroundSlack { get; set; }

    /// <summary>Bytes of the files the cache holds.</summary>
    public long Used => Interlocked.Read(ref _used);

    /// <summary>Files evicted to stay within the budget, since the start.</summary>
    public long Evictions => Interlocked.Read(ref _evictions);

    public long EvictedBytes => Interlocked.Read(ref _evictedBytes);

    /// <summary>Promoted layers' EROFS images evicted (their layers went back to lazy FUSE), since the start.</summary>
    public long ImageEvictions => Interlocked.Read(ref _imageEvictions);

    /// <summary>Evicts promoted images when chunks and copies are not enough (null: images are never evicted).</summary>
    internal IImageEviction? Images { get; set; }

    /// <summary>A chunk's file was evicted (key = chunk key).</summary>
    public Action<string>? ChunkEvicted { get; set; }

    /// <summary>A whole-file copy was evicted (key = file digest).</summary>
    public Action<string>? CopyEvicted { get; set; }

    private ConcurrentDictionary<string, Entry> Map(CacheFileKind kind) => kind switch
    {
        CacheFileKind.Copy => _copies,
        CacheFileKind.Toc => _tocs,
        CacheFileKind.Image => _images,
        _ => _chunks,
    };

    private static long Now => DateTime.UtcNow.Ticks;

    /// <summary>A file was written (or found at start). Replaces an entry of the same key.</summary>
    public void Added(CacheFileKind kind, string key, string path, long size, long? lastUseTicks = null)
    {
        var e = new Entry(kind, key, path, size, lastUseTicks ?? Now);
        var map = Map(kind);
        // Pins taken while the file was being written (a mount opened it at once) carry over.
        var id = PinId(kind, key);
        if (_pinsBeforeAdd.TryRemove(id, out var early)) e.Pins = early;
        map.AddOrUpdate(key, e, (_, old) =>
        {
            Interlocked.Add(ref _used, -old.Size);
            e.Pins = Math.Max(e.Pins, Volatile.Read(ref old.Pins));
            if (old.Kind > e.Kind && kind < CacheFileKind.Image) e.Kind = old.Kind; // a read chunk stays "read"
            return e;
        });
        Interlocked.Add(ref _used, size);
    }

    /// <summary>The owner deleted the file.</summary>
    public void Removed(CacheFileKind kind, string key)
    {
        if (Map(kind).TryRemove(key, out var e)) Interlocked.Add(ref _used, -e.Size);
    }

    public bool HasChunk(string key) => _chunks.ContainsKey(key);

    /// <summary>Size of the file held for this key, or 0.</summary>
    public long SizeOf(CacheFileKind kind, string key) => Map(kind).TryGetValue(key, out var e) ? e.Size : 0;

    /// <summary>A chunk's file was read: it becomes the most recently used, and a background chunk a read one.</summary>
    public void TouchChunk(string key)
    {
        if (!_chunks.TryGetValue(key, out var e)) return;
        Volatile.Write(ref e.LastUse, Now);
        if (Volatile.Read(ref e.Kind) == (int)CacheFileKind.BackgroundChunk) Volatile.Write(ref e.Kind, (int)CacheFileKind.Chunk);
    }

    public void TouchCopy(string digest)
    {
        if (_copies.TryGetValue(digest, out var e)) Volatile.Write(ref e.LastUse, Now);
    }

    /// <summary>A promoted layer's image was mounted (again): the most recently used of the images.</summary>
    public void TouchImage(string layerDigest)
    {
        if (_images.TryGetValue(layerDigest, out var e)) Volatile.Write(ref e.LastUse, Now);
    }

    private static string PinId(CacheFileKind kind, string key) => kind == CacheFileKind.Copy ? "f" + key : "c" + key;

    /// <summary>A mount holds the file open: it is not evicted until <see cref="Unpin"/>.</summary>
    public void Pin(CacheFileKind kind, string key)
    {
        if (Map(kind).TryGetValue(key, out var e)) Interlocked.Increment(ref e.Pins);
        else _pinsBeforeAdd.AddOrUpdate(PinId(kind, key), 1, static (_, n) => n + 1);
    }

    public void Unpin(CacheFileKind kind, string key)
    {
        if (Map(kind).TryGetValue(key, out var e))
        {
            if (Interlocked.Decrement(ref e.Pins) < 0) Interlocked.Exchange(ref e.Pins, 0);
        }
        else
        {
            var id = PinId(kind, key);
            while (_pinsBeforeAdd.TryGetValue(id, out var n))
            {
                if (n <= 1 ? _pinsBeforeAdd.TryRemove(new KeyValuePair<string, int>(id, n)) : _pinsBeforeAdd.TryUpdate(id, n - 1, n)) break;
            }
        }
    }

    /// <summary>Whether <paramref name="bytes"/> more fit without evicting anything (always, without a budget).</summary>
    public bool HasRoom(long bytes) => Limit <= 0 || Used + bytes <= Limit;

    /// <summary>
    /// Makes room for <paramref name="bytes"/> more by evicting the least recently used unpinned files (see
    /// <see cref="CacheFileKind"/> for the order), down to a little below what is needed so that evictions come in
    /// rounds, not one per chunk. False when pinned files and TOCs alone leave too little room.
    /// </summary>
    /// <param name="evictBelow">only files of kinds before this one are evicted (a whole-file copy, which is optional,
    /// never pushes out the read chunks it is built from).</param>
    public bool MakeRoom(long bytes, CacheFileKind evictBelow = CacheFileKind.Toc)
    {
        var limit = Limit;
        if (limit <= 0 || Used + bytes <= limit) return true;
        lock (_evicting)
        {
            if (Used + bytes <= limit) return true;
            // Evicted images the kernel held until now (their last container ended) go first: that costs no chunk.
            if (_heldImages && Images is { } held)
            {
                _heldImages = held.FreeHeld();
                if (Used + bytes <= limit) return true;
            }
            // Down to 95% of what is left for the new file: the next few additions find room at once.
            var target = limit - bytes - limit / 20;
            var candidates = new List<Entry>(_chunks.Count + _copies.Count);
            var below = (int)evictBelow;
            foreach (var (_, e) in _chunks) if (Volatile.Read(ref e.Pins) == 0 && Volatile.Read(ref e.Kind) < below) candidates.Add(e);
            foreach (var (_, e) in _copies) if (Volatile.Read(ref e.Pins) == 0 && Volatile.Read(ref e.Kind) < below) candidates.Add(e);
            candidates.Sort(static (a, b) =>
            {
                var r = Volatile.Read(ref a.Kind).CompareTo(Volatile.Read(ref b.Kind));
                return r != 0 ? r : Volatile.Read(ref a.LastUse).CompareTo(Volatile.Read(ref b.LastUse));
            });
            foreach (var e in candidates)
            {
                if (Used <= target) break;
                if (Volatile.Read(ref e.Pins) != 0) continue;
                var kind = (CacheFileKind)Volatile.Read(ref e.Kind);
                var map = kind == CacheFileKind.Copy ? _copies : _chunks;
                if (!map.TryRemove(new KeyValuePair<string, Entry>(e.Key, e))) continue; // replaced or removed meanwhile
                try { File.Delete(e.Path); }
                catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
                {
                    map.TryAdd(e.Key, e); // still there: keep counting it
                    continue;
                }
                Interlocked.Add(ref _used, -e.Size);
                Interlocked.Increment(ref _evictions);
                Interlocked.Add(ref _evictedBytes, e.Size);
                if (kind == CacheFileKind.Copy) CopyEvicted?.Invoke(e.Key);
                else ChunkEvicted?.Invoke(e.Key);
            }
            if (Used + bytes > limit && evictBelow > CacheFileKind.Image && Images is { } images) EvictImages(images, bytes, limit);
            return Used + bytes <= limit;
        }
    }

    private bool _heldImages = true; // evicted images may be held (found at start): look once

    /// <summary>
    /// Room for a new promoted image: older images go (least recently mounted first), no chunk — the layer being promoted
    /// needs its chunks until its image is built, and other layers' chunks are what their containers read lazily.
    /// </summary>
    public bool MakeRoomForImage(long bytes)
    {
        var limit = Limit;
        if (limit <= 0 || Used + bytes <= limit) return true;
        if (Images is not { } images) return false;
        lock (_evicting)
        {
            if (_heldImages) _heldImages = images.FreeHeld();
            if (Used + bytes > limit) EvictImages(images, bytes, limit);
            return Used + bytes <= limit;
        }
    }

    /// <summary>Deletes the evicted images nothing holds any more (called now and then: a status or metrics query).</summary>
    public void FreeHeldImages()
    {
        if (!_heldImages || Images is not { } images) return;
        lock (_evicting) _heldImages = images.FreeHeld();
    }

    /// <summary>
    /// Chunks and copies were not enough: promoted images go, least recently mounted first. An image a running container
    /// still reads frees nothing until it ends (it stays counted, as a TOC is); while one such is held no further image is
    /// evicted — it would free nothing either, and cost its layer the kernel's speed for no room.
    /// </summary>
    private void EvictImages(IImageEviction images, long bytes, long limit)
    {
        if (_heldImages) return;
        var candidates = new List<Entry>(_images.Count);
        foreach (var (_, e) in _images) if (Volatile.Read(ref e.Pins) == 0) candidates.Add(e);
        candidates.Sort(static (a, b) => Volatile.Read(ref a.LastUse).CompareTo(Volatile.Read(ref b.LastUse)));
        foreach (var e in candidates)
        {
            if (Used + bytes <= limit) break;
            var before = Used;
            if (!images.Evict(e.Key)) continue;
            Interlocked.Increment(ref _imageEvictions);
            if (Used < before) continue;
            _heldImages = true;
            break;
        }
    }

    /// <summary>Counts the files found under the cache at start (their last write time stands for their last use).</summary>
    internal void Scan(string? chunkDir, string? copyDir)
    {
        if (chunkDir != null && Directory.Exists(chunkDir))
        {
            foreach (var sub in Directory.EnumerateDirectories(chunkDir))
            {
                var prefix = Path.GetFileName(sub);
                foreach (var f in new DirectoryInfo(sub).EnumerateFiles())
                {
                    // chunks/HE/HEX is the chunk sha256:HEX; chunks/x/... are layer-local keys (unverified layers).
                    var key = prefix != "x" && f.Name.Length == 64 && f.Name.StartsWith(prefix, StringComparison.Ordinal)
                        ? "sha256:" + f.Name : "x/" + f.Name;
                    Added(CacheFileKind.Chunk, key, f.FullName, f.Length, f.LastWriteTimeUtc.Ticks);
                }
            }
        }
        if (copyDir != null && Directory.Exists(copyDir))
        {
            foreach (var sub in Directory.EnumerateDirectories(copyDir))
                foreach (var f in new DirectoryInfo(sub).EnumerateFiles())
                    if (f.Name.Length == 64) Added(CacheFileKind.Copy, "sha256:" + f.Name, f.FullName, f.Length, f.LastWriteTimeUtc.Ticks);
        }
    }

    /// <summary>Counts the stored TOCs found at start.</summary>
    internal void ScanTocs(string tocDir)
    {
        if (!Directory.Exists(tocDir)) return;
        foreach (var f in new DirectoryInfo(tocDir).EnumerateFiles("*.toc"))
            Added(CacheFileKind.Toc, f.FullName, f.FullName, f.Length, f.LastWriteTimeUtc.Ticks);
    }

    /// <summary>Every chunk key with a file (for the start-up sweep).</summary>
    internal IEnumerable<string> ChunkKeys => _chunks.Keys;

    internal IEnumerable<string> CopyDigests => _copies.Keys;
}
