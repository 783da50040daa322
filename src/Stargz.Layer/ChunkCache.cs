using System.Buffers;
using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using Microsoft.Extensions.Caching.Memory;

namespace Stargz.Layer;

/// <summary>
/// Decompressed, verified chunks: a size-bounded memory cache in front of a disk cache. Keys are chunk digests
/// ("sha256:HEX"), so a chunk shared by several layers or images is stored once; chunks without a digest (only
/// when verification is off) use a layer-local key and live apart. Disk writes are atomic (temp file, fsync,
/// rename, fsync of the directory), and a disk chunk is hashed again the first time this process uses it, so a
/// torn or altered file is dropped instead of served. One instance serves every layer of a daemon.
/// </summary>
public sealed class ChunkCache : IDisposable
{
    private readonly MemoryCache _memory;
    private readonly long _minEntryCharge;
    private readonly string? _chunkDir;
    private readonly string? _tmpDir;
    private readonly bool _durable;
    // Disk files this process has hashed (or written) already: later reads of them skip the re-hash.
    private readonly ConcurrentDictionary<string, byte> _trustedOnDisk = new(StringComparer.Ordinal);
    private long _memoryHits, _diskHits, _misses, _diskWrites, _diskRejected;

    /// <summary>
    /// Chunks being loaded or fetched right now, by cache key, across every layer using this cache: a chunk
    /// shared by two layers is fetched once even when both read it at the same moment.
    /// </summary>
    internal ConcurrentDictionary<string, ChunkClaim> Inflight { get; } = new(StringComparer.Ordinal);

    /// <param name="memoryBytes">upper bound of chunk bytes kept in memory.</param>
    /// <param name="memoryEntries">upper bound of chunks kept in memory (<c>max_lru_cache_entry</c>); 0 = bytes only.</param>
    public ChunkCache(string? directory, long memoryBytes, bool durableWrites = true, int memoryEntries = 0)
    {
        memoryBytes = Math.Max(1, memoryBytes);
        // One size budget bounds both: every entry is charged at least bytes/entries, so at most `entries` fit.
        _minEntryCharge = memoryEntries > 0 ? Math.Max(1, memoryBytes / memoryEntries) : 1;
        _memory = new MemoryCache(new MemoryCacheOptions { SizeLimit = memoryBytes, CompactionPercentage = 0.25 });
        _durable = durableWrites;
        if (directory != null)
        {
            _chunkDir = Path.Combine(directory, "chunks");
            _tmpDir = Path.Combine(directory, "tmp");
            Directory.CreateDirectory(_chunkDir);
            Directory.CreateDirectory(_tmpDir);
            // Leftovers of writes a crash interrupted: never renamed, so never visible; just remove them.
            foreach (var f in Directory.EnumerateFiles(_tmpDir))
            {
                try { File.Delete(f); } catch (IOException) { }
            }
            Budget.Scan(_chunkDir, Path.Combine(directory, "files"));
        }
        Budget.ChunkEvicted = key =>
        {
            _trustedOnDisk.TryRemove(key, out _);
            // Remembered to count a fetch of it again as a refetch (bounded: forgotten wholesale when huge).
            if (_evictedKeys.Count > 1_000_000) _evictedKeys.Clear();
            _evictedKeys.TryAdd(key, 0);
        };
    }

    private readonly ConcurrentDictionary<string, byte> _evictedKeys = new(StringComparer.Ordinal);
    private long _refetches;

    /// <summary>
    /// Bytes held on disk and, with <c>max_disk_mb</c>, the budget: writes of read chunks evict the least recently used
    /// files; background writes only fill what is free.
    /// </summary>
    public DiskBudget Budget { get; } = new();

    /// <summary>Chunks written again after their file had been evicted (fetched again on demand).</summary>
    public long Refetches => Interlocked.Read(ref _refetches);

    /// <summary>
    /// Whether the background fetch may add a batch of <paramref name="bytes"/> now: not while the disk is full (but
    /// for a probe now and then), nor beyond the budget (it never evicts to make room).
    /// </summary>
    public bool MayAddInBackground(long bytes) => Budget.HasRoom(bytes) && Disk.MayAddInBackground();

    /// <summary>Failures of the disk cache (counted, logged rate-limited) and whether the disk is full.</summary>
    public CacheDiskHealth Disk { get; } = new();

    public long MemoryHits => Interlocked.Read(ref _memoryHits);
    public long DiskHits => Interlocked.Read(ref _diskHits);
    public long Misses => Interlocked.Read(ref _misses);
    public long DiskWrites => Interlocked.Read(ref _diskWrites);
    /// <summary>Disk chunks found corrupt (wrong length or digest) and deleted.</summary>
    public long DiskRejected => Interlocked.Read(ref _diskRejected);

    /// <summary>Memory only, no I/O: the hot path of a read whose chunks are all cached.</summary>
    public bool TryGetMemory(string key, out byte[] data)
    {
        if (_memory.TryGetValue(key, out var o) && o is byte[] b)
        {
            Interlocked.Increment(ref _memoryHits);
            data = b;
            return true;
        }
        data = null!;
        return false;
    }

    /// <summary>False for a memory-only cache.</summary>
    public bool HasDisk => _chunkDir != null;

    /// <summary>
    /// True when the chunk has a file on disk, by the budget's index of what was written or found at start (no I/O);
    /// always true for a memory-only cache.
    /// </summary>
    public bool OnDisk(string key) => _chunkDir == null || Budget.HasChunk(BudgetKey(key));

    /// <summary>Bytes of the chunk's file on disk (0 when it has none), from the budget's index.</summary>
    public long DiskBytesOf(string key) => _chunkDir == null ? 0 : Budget.SizeOf(CacheFileKind.Chunk, BudgetKey(key));

    /// <summary>The chunk from memory without counting a hit (background bookkeeping, not a read).</summary>
    internal bool TryPeekMemory(string key, out byte[] data)
    {
        if (_memory.TryGetValue(key, out var o) && o is byte[] b)
        {
            data = b;
            return true;
        }
        data = null!;
        return false;
    }

    /// <summary>True when the chunk is in memory or a file for it exists on disk (no hashing).</summary>
    public bool Contains(string key) => _memory.TryGetValue(key, out _) || (_chunkDir != null && File.Exists(PathOf(key)));

    /// <summary>
    /// Memory, then disk. A disk chunk not yet checked by this process is read whole and hashed against
    /// <paramref name="digest"/> (when given); on mismatch the file is deleted and the call reports a miss.
    /// </summary>
    public async ValueTask<byte[]?> TryGetAsync(string key, string? digest, long size, bool keepInMemory, CancellationToken cancellationToken)
    {
        if (TryGetMemory(key, out var m)) return m;
        if (_chunkDir == null)
        {
            Interlocked.Increment(ref _misses);
            return null;
        }
        var path = PathOf(key);
        byte[] data;
        try
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, FileOptions.Asynchronous);
            var len = RandomAccess.GetLength(h);
            if (len != size)
            {
                Reject(path, key);
                return null;
            }
            data = GC.AllocateUninitializedArray<byte>((int)size);
            var read = 0;
            while (read < data.Length)
            {
                var n = await RandomAccess.ReadAsync(h, data.AsMemory(read), read, cancellationToken).ConfigureAwait(false);
                if (n == 0) break;
                read += n;
            }
            if (read != data.Length)
            {
                Reject(path, key);
                return null;
            }
        }
        catch (FileNotFoundException) { Interlocked.Increment(ref _misses); return null; }
        catch (DirectoryNotFoundException) { Interlocked.Increment(ref _misses); return null; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // EIO and the like: the chunk is fetched again (and the file, if it can be, dropped).
            Disk.ReadFailed($"cached chunk {key}", e);
            Reject(path, key);
            return null;
        }
        if (digest != null && !_trustedOnDisk.ContainsKey(key))
        {
            if (!Digests.Matches(data, digest))
            {
                Reject(path, key);
                return null;
            }
            _trustedOnDisk.TryAdd(key, 0);
        }
        Interlocked.Increment(ref _diskHits);
        Budget.TouchChunk(BudgetKey(key));
        if (keepInMemory) AddMemory(key, data);
        return data;
    }

    /// <summary>
    /// Whether the chunk's disk file is there with its full length and, unless this process checked it already, hashes
    /// to <paramref name="digest"/> (when given) — without keeping its bytes: the background fetch's look at chunks a
    /// batch finds on disk, which nobody may need in memory. Hashed through a small pooled buffer, so no chunk-sized
    /// array is made. A wrong or unreadable file is deleted (false); not a read of the chunk, so its use is not recorded.
    /// </summary>
    internal async ValueTask<bool> HasOnDiskAsync(string key, string? digest, long size, CancellationToken cancellationToken)
    {
        if (_chunkDir == null) return false;
        var path = PathOf(key);
        byte[]? buffer = null;
        try
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, FileOptions.Asynchronous);
            if (RandomAccess.GetLength(h) != size)
            {
                Reject(path, key);
                return false;
            }
            if (digest != null && !_trustedOnDisk.ContainsKey(key))
            {
                buffer = ArrayPool<byte>.Shared.Rent((int)Math.Min(size, HashBlockBytes));
                using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
                long read = 0;
                while (read < size)
                {
                    var n = await RandomAccess.ReadAsync(h, buffer.AsMemory(0, (int)Math.Min(buffer.Length, size - read)), read, cancellationToken).ConfigureAwait(false);
                    if (n == 0) break;
                    hash.AppendData(buffer, 0, n);
                    read += n;
                }
                Span<byte> sum = stackalloc byte[32];
                if (read != size || !hash.TryGetHashAndReset(sum, out _) || !Digests.HashMatches(sum, digest))
                {
                    Reject(path, key);
                    return false;
                }
                _trustedOnDisk.TryAdd(key, 0);
            }
        }
        catch (FileNotFoundException) { Interlocked.Increment(ref _misses); return false; }
        catch (DirectoryNotFoundException) { Interlocked.Increment(ref _misses); return false; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Disk.ReadFailed($"cached chunk {key}", e);
            Reject(path, key);
            return false;
        }
        finally
        {
            if (buffer != null) ArrayPool<byte>.Shared.Return(buffer);
        }
        Interlocked.Increment(ref _diskHits);
        return true;
    }

    /// <summary>Read size of <see cref="HasOnDiskAsync"/>'s hashing: few reads per chunk, no chunk-sized buffer.</summary>
    private const int HashBlockBytes = 64 << 10;

    /// <summary>
    /// A read of the chunk's disk file failed outside this cache (spliced by the FUSE bridge): counted and logged like
    /// a failed read here, and the file dropped, so the chunk is served from memory or fetched again.
    /// </summary>
    internal void DiskFileUnreadable(string key, Exception error)
    {
        if (_chunkDir == null) return;
        Disk.ReadFailed($"cached chunk {key}", error);
        Reject(PathOf(key), key);
    }

    private void Reject(string path, string key)
    {
        Interlocked.Increment(ref _diskRejected);
        Interlocked.Increment(ref _misses);
        _trustedOnDisk.TryRemove(key, out _);
        Budget.Removed(CacheFileKind.Chunk, BudgetKey(key));
        try { File.Delete(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }

    /// <summary>
    /// Drops a chunk from memory and disk and forgets that its file was checked (a layer was released and no
    /// mounted layer uses the chunk). A missing file is fine. Returns true when a disk file was deleted.
    /// </summary>
    public bool Remove(string key)
    {
        _memory.Remove(key);
        _trustedOnDisk.TryRemove(key, out _);
        if (_chunkDir == null) return false;
        var path = PathOf(key);
        try
        {
            if (!File.Exists(path)) return false;
            File.Delete(path);
            Budget.Removed(CacheFileKind.Chunk, BudgetKey(key));
            return true;
        }
        catch (DirectoryNotFoundException) { return false; }
        catch (FileNotFoundException) { return false; }
    }

    /// <summary>Keeps a verified chunk in memory. The array must never be written again.</summary>
    public void AddMemory(string key, byte[] data)
    {
        using var e = _memory.CreateEntry(key);
        e.Size = Math.Max(_minEntryCharge, data.Length);
        e.Value = data;
    }

    /// <summary>
    /// Stores a verified chunk on disk unless it is there already. Returns the directory written into (so a
    /// batch can fsync each directory once), or null when nothing was written. A write the disk refuses (full, EIO)
    /// leaves nothing behind, is reported to <see cref="Disk"/> and returns null: the chunk stays servable from memory
    /// or the registry.
    /// </summary>
    /// <param name="background">written by the background fetch: it only fills free room (one batch over at most),
    /// others evict the least recently used files to stay within the budget.</param>
    public string? WriteDisk(string key, ReadOnlySpan<byte> data, bool background = false)
    {
        if (_chunkDir == null || _tmpDir == null) return null;
        var path = PathOf(key);
        if (File.Exists(path)) return null;
        if (Budget.Limit > 0)
        {
            var room = background ? Budget.HasRoom(data.Length - Budget.BackgroundSlack) : Budget.MakeRoom(data.Length);
            if (!room) return null; // pinned files leave no room: served from memory, fetched again later
        }
        var dir = Path.GetDirectoryName(path)!;
        var tmp = Path.Combine(_tmpDir, Guid.NewGuid().ToString("N"));
        try
        {
            Directory.CreateDirectory(dir);
            // Written whole and synced under a temp name, then renamed: a chunk file is complete or absent.
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.None))
            {
                fs.Write(data);
                if (_durable) fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            try { File.Delete(tmp); } catch (IOException) { }
            Disk.WriteFailed($"chunk {key}", e);
            return null;
        }
        _trustedOnDisk.TryAdd(key, 0);
        Interlocked.Increment(ref _diskWrites);
        Budget.Added(background ? CacheFileKind.BackgroundChunk : CacheFileKind.Chunk, BudgetKey(key), path, data.Length);
        if (!_evictedKeys.IsEmpty && _evictedKeys.TryRemove(key, out _)) Interlocked.Increment(ref _refetches);
        Disk.WriteSucceeded();
        return dir;
    }

    /// <summary>Makes the renames into <paramref name="directory"/> durable.</summary>
    public void SyncDirectory(string directory)
    {
        if (!_durable) return;
        FsyncDirectory(directory);
    }

    /// <summary>
    /// The disk file of a chunk this process has verified (hashed on read, or written itself), or null: a file
    /// FUSE passthrough may serve directly.
    /// </summary>
    internal string? TrustedPath(string key) => IsTrusted(key) ? DiskPath(key) : null;

    /// <summary>The chunk's disk file if there is one, checked or not.</summary>
    internal string? DiskPath(string key)
    {
        if (_chunkDir == null) return null;
        var path = PathOf(key);
        return File.Exists(path) ? path : null;
    }

    /// <summary>True when this process has verified the chunk's disk file (no I/O; the file may have gone since).</summary>
    internal bool IsTrusted(string key) => _chunkDir != null && _trustedOnDisk.ContainsKey(key);

    /// <summary>Where atomic writes are staged (cleared at start), or null for a memory-only cache.</summary>
    internal string? TmpDirectory => _tmpDir;

    /// <summary>Whether writes are made durable (fsync of file and directory).</summary>
    internal bool DurableWrites => _durable;

    /// <summary>Forgets which disk chunks were checked, as a restarted process would (tests of the restart path).</summary>
    internal void ForgetTrust() => _trustedOnDisk.Clear();

    /// <summary>
    /// The chunk's name in <see cref="Budget"/>: its digest, or for a layer-local key (verification off) "x/" and the
    /// hash its file is named by, as a scan at start finds it.
    /// </summary>
    private static string BudgetKey(string key)
        => Digests.IsSha256(key) ? key : "x/" + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(key)));

    internal string PathOf(string key)
    {
        // "sha256:HEX" -> chunks/HE/HEX ; any other key (layer-local, unverified) -> chunks/x/sha256(key)
        if (Digests.IsSha256(key))
            return Path.Combine(_chunkDir!, key.Substring(7, 2), key.Substring(7));
        var h = Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(key)));
        return Path.Combine(_chunkDir!, "x", h);
    }

    public void Dispose() => _memory.Dispose();

    internal static void FsyncDirectory(string directory)
    {
        var fd = open(directory, 0x10000 /* O_RDONLY|O_DIRECTORY */);
        if (fd < 0) return;
        try { fsync(fd); } finally { close(fd); }
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

    [DllImport("libc", SetLastError = true)]
    private static extern int fsync(int fd);

    [DllImport("libc", SetLastError = true)]
    private static extern int close(int fd);
}

/// <summary>sha256 digests in the "sha256:HEX" form the TOC uses.</summary>
internal static class Digests
{
    public static bool Matches(ReadOnlySpan<byte> data, string digest)
    {
        Span<byte> hash = stackalloc byte[32];
        SHA256.HashData(data, hash);
        return HashMatches(hash, digest);
    }

    /// <summary>True when <paramref name="digest"/> is "sha256:" and the hex of <paramref name="hash"/>.</summary>
    public static bool HashMatches(ReadOnlySpan<byte> hash, string digest)
    {
        if (!IsSha256(digest)) return false;
        Span<byte> want = stackalloc byte[32];
        if (Convert.FromHexString(digest.AsSpan(7), want, out _, out var written) != System.Buffers.OperationStatus.Done || written != 32)
            return false;
        return CryptographicOperations.FixedTimeEquals(hash, want);
    }

    /// <summary>The "sha256:" + 64 characters form (hex is checked where the digest is compared).</summary>
    public static bool IsSha256(string digest) => digest.Length == 71 && digest.StartsWith("sha256:", StringComparison.Ordinal);
}
