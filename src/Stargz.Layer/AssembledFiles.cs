using System.Buffers;
using System.Collections.Concurrent;
using System.Security.Cryptography;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Win32.SafeHandles;

namespace Stargz.Layer;

/// <summary>
/// Whole-file copies of regular files whose chunks are all verified on disk, for FUSE passthrough: the kernel hands an
/// open's reads to one backing file, not to a list of chunk files. Keyed by the file's TOC digest (sha256 of its
/// content), so a file several layers share is stored once, under CACHE/files. A copy is built in the background from
/// the chunk files, one at a time, hashed while it is written and kept only when it matches the digest; a copy left by
/// an earlier process is hashed again before this one uses it. Nothing here ever blocks a FUSE request.
/// </summary>
internal sealed class AssembledFiles : IDisposable
{
    private const int CopyBufferBytes = 1 << 20;
    private static readonly TimeSpan RetryAfterFailure = TimeSpan.FromMinutes(1);

    private readonly string _dir;
    private readonly string _tmpDir;
    private readonly bool _durable;
    private readonly ILogger _log;
    // Copies this process built or hashed: usable as backing files without another check.
    private readonly ConcurrentDictionary<string, byte> _trusted = new(StringComparer.Ordinal);
    // Copies an earlier process left (found at start), not hashed yet: the first open of such a file has it checked.
    private readonly ConcurrentDictionary<string, byte> _unverified = new(StringComparer.Ordinal);
    // One build per digest however many opens ask for it.
    private readonly ConcurrentDictionary<string, Task> _inflight = new(StringComparer.Ordinal);
    // A build that failed (a chunk file gone, disk full, digest mismatch) is not tried again at every open.
    private readonly ConcurrentDictionary<string, long> _failedAt = new(StringComparer.Ordinal);
    // One build or removal at a time: builds are background work and must not compete with each other for the disk.
    private readonly SemaphoreSlim _one = new(1, 1);
    private readonly CancellationTokenSource _lifetime = new();
    private long _built, _reused, _rejected, _failed;

    private readonly CacheDiskHealth? _disk;
    private readonly DiskBudget? _budget;

    public AssembledFiles(string directory, string tmpDirectory, bool durableWrites, ILogger? logger = null, CacheDiskHealth? disk = null,
        DiskBudget? budget = null)
    {
        _disk = disk;
        _budget = budget;
        if (budget != null)
            budget.CopyEvicted = d =>
            {
                _trusted.TryRemove(d, out _);
                _unverified.TryRemove(d, out _);
            };
        _dir = directory;
        _tmpDir = tmpDirectory;
        _durable = durableWrites;
        _log = logger ?? NullLogger.Instance;
        Directory.CreateDirectory(_dir);
        foreach (var sub in Directory.EnumerateDirectories(_dir))
            foreach (var f in Directory.EnumerateFiles(sub))
            {
                var name = Path.GetFileName(f);
                if (name.Length == 64 && Path.GetFileName(sub) == name[..2]) _unverified.TryAdd("sha256:" + name, 0);
            }
    }

    /// <summary>True when an earlier process left a copy of this file that has not been checked yet (no I/O).</summary>
    public bool HasUncheckedCopy(string digest) => _unverified.ContainsKey(digest);

    /// <summary>Copies built (and verified) by this process.</summary>
    public long Built => Interlocked.Read(ref _built);
    /// <summary>Copies left by an earlier process that hashed right and were kept.</summary>
    public long Reused => Interlocked.Read(ref _reused);
    /// <summary>Copies found wrong (length or digest) and deleted.</summary>
    public long Rejected => Interlocked.Read(ref _rejected);
    /// <summary>Builds that gave up (a chunk file gone or unreadable, digest mismatch, disk full).</summary>
    public long Failed => Interlocked.Read(ref _failed);

    /// <summary>The verified copy of the file with content digest <paramref name="digest"/>, or null.</summary>
    public string? TrustedPath(string digest)
    {
        if (!_trusted.ContainsKey(digest)) return null;
        var path = PathOf(digest);
        if (File.Exists(path)) return path;
        _trusted.TryRemove(digest, out _);
        return null;
    }

    /// <summary>
    /// Starts building (or re-checking) the copy of a file in the background unless it is trusted, being built, or
    /// failed less than a minute ago. <paramref name="chunkPath"/> gives the disk file of a chunk (null when there is
    /// none); the chunks must cover the file from 0 to <paramref name="size"/> in order. The copy is kept only if all
    /// its bytes hash to <paramref name="digest"/>, so the chunk files need not have been checked one by one.
    /// Returns the build (completed when nothing was started), for tests.
    /// </summary>
    public Task Schedule(string digest, long size, LayerChunk[] chunks, Func<LayerChunk, string?> chunkPath)
    {
        if (_trusted.ContainsKey(digest) || _lifetime.IsCancellationRequested || !Digests.IsSha256(digest)) return Task.CompletedTask;
        if (_failedAt.TryGetValue(digest, out var at) && Environment.TickCount64 - at < (long)RetryAfterFailure.TotalMilliseconds)
            return Task.CompletedTask;
        if (_inflight.TryGetValue(digest, out var running)) return running;
        var start = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var build = start.Task.ContinueWith(_ => BuildAsync(digest, size, chunks, chunkPath), CancellationToken.None,
            TaskContinuationOptions.None, TaskScheduler.Default).Unwrap();
        if (!_inflight.TryAdd(digest, build)) return _inflight.TryGetValue(digest, out running) ? running : Task.CompletedTask;
        _ = build.ContinueWith(static (t, s) =>
        {
            var (map, key) = ((ConcurrentDictionary<string, Task>, string))s!;
            map.TryRemove(new KeyValuePair<string, Task>(key, t));
        }, (_inflight, digest), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        start.SetResult(); // only the winner of TryAdd runs the build
        return build;
    }

    private async Task BuildAsync(string digest, long size, LayerChunk[] chunks, Func<LayerChunk, string?> chunkPath)
    {
        var ct = _lifetime.Token;
        try { await _one.WaitAsync(ct).ConfigureAwait(false); }
        catch (OperationCanceledException) { return; }
        string? tmp = null;
        try
        {
            if (_trusted.ContainsKey(digest)) return;
            var final = PathOf(digest);
            if (File.Exists(final))
            {
                var good = HashesTo(final, size, digest, ct);
                _unverified.TryRemove(digest, out _);
                if (good)
                {
                    _trusted.TryAdd(digest, 0);
                    Interlocked.Increment(ref _reused);
                    return;
                }
                Interlocked.Increment(ref _rejected);
                _log.LogWarning("assembled file {Digest}: the copy on disk does not match its digest; building it again", digest);
                File.Delete(final);
                _budget?.Removed(CacheFileKind.Copy, digest);
            }
            // A copy is optional: within the disk budget only if room can be made (never by evicting pinned files).
            if (_budget != null && !_budget.MakeRoom(size, evictBelow: CacheFileKind.Chunk))
            {
                _failedAt[digest] = Environment.TickCount64;
                return;
            }
            tmp = Path.Combine(_tmpDir, "file-" + Guid.NewGuid().ToString("N"));
            Copy(chunks, size, chunkPath, tmp, digest, ct);
            Directory.CreateDirectory(Path.GetDirectoryName(final)!);
            File.Move(tmp, final, overwrite: true);
            tmp = null;
            _budget?.Added(CacheFileKind.Copy, digest, final, size);
            if (_durable) ChunkCache.FsyncDirectory(Path.GetDirectoryName(final)!);
            _trusted.TryAdd(digest, 0);
            _failedAt.TryRemove(digest, out _);
            Interlocked.Increment(ref _built);
            _disk?.WriteSucceeded();
            _log.LogDebug("assembled file {Digest} ({Size} bytes) from {Chunks} chunks for passthrough", digest, size, chunks.Length);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested) { }
        catch (Exception e)
        {
            Interlocked.Increment(ref _failed);
            _failedAt[digest] = Environment.TickCount64;
            // A disk that refuses the copy (full, EIO) is reported once in a while, not once per file.
            if (_disk != null && e is IOException && !File.Exists(PathOf(digest))) _disk.WriteFailed($"a whole-file copy of {digest} (its reads stay with the chunk cache)", e);
            else _log.LogWarning("cannot assemble file {Digest} for passthrough ({Error}); its reads stay with the chunk cache", digest, e.Message);
        }
        finally
        {
            if (tmp != null)
            {
                try { File.Delete(tmp); } catch (IOException) { }
            }
            _one.Release();
        }
    }

    /// <summary>Writes the chunks' bytes into <paramref name="tmp"/>, hashing them on the way; throws unless they are the file.</summary>
    private void Copy(LayerChunk[] chunks, long size, Func<LayerChunk, string?> chunkPath, string tmp, string digest, CancellationToken ct)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(CopyBufferBytes);
        try
        {
            using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            using (var output = new FileStream(tmp, new FileStreamOptions
            {
                Mode = FileMode.CreateNew, Access = FileAccess.Write, Share = FileShare.None, BufferSize = 0, PreallocationSize = size,
            }))
            {
                long pos = 0;
                foreach (var c in chunks)
                {
                    if (c.FileOffset != pos)
                        throw new InvalidDataException($"the chunks do not cover the file in order (chunk at {c.FileOffset}, expected {pos})");
                    var path = chunkPath(c) ?? throw new IOException($"chunk {c.Digest} at file offset {c.FileOffset} is not on disk");
                    using var input = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
                    if (!Pump(input, c.Size, sha, buffer, output, ct))
                        throw new InvalidDataException($"chunk file {path} is not {c.Size} bytes long");
                    pos += c.Size;
                }
                if (pos != size) throw new InvalidDataException($"the chunks hold {pos} bytes of a {size}-byte file");
                if (_durable) output.Flush(flushToDisk: true);
            }
            Span<byte> got = stackalloc byte[32];
            sha.GetHashAndReset(got);
            if (!Digests.HashMatches(got, digest))
                throw new InvalidDataException($"the chunks' bytes hash to sha256:{Convert.ToHexStringLower(got)}, not to the TOC's {digest}");
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private static bool HashesTo(string path, long size, string digest, CancellationToken ct)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(CopyBufferBytes);
        try
        {
            using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            if (!Pump(h, size, sha, buffer, null, ct)) return false;
            Span<byte> got = stackalloc byte[32];
            sha.GetHashAndReset(got);
            return Digests.HashMatches(got, digest);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>
    /// Reads all of <paramref name="input"/> into <paramref name="sha"/> (and <paramref name="output"/> when given);
    /// false unless it is exactly <paramref name="length"/> bytes long.
    /// </summary>
    private static bool Pump(SafeFileHandle input, long length, IncrementalHash sha, byte[] buffer, Stream? output, CancellationToken ct)
    {
        if (RandomAccess.GetLength(input) != length) return false;
        for (long done = 0; done < length;)
        {
            ct.ThrowIfCancellationRequested();
            var n = RandomAccess.Read(input, buffer.AsSpan(0, (int)Math.Min(buffer.Length, length - done)), done);
            if (n <= 0) return false;
            sha.AppendData(buffer, 0, n);
            output?.Write(buffer, 0, n);
            done += n;
        }
        return true;
    }

    /// <summary>
    /// Deletes the copies of <paramref name="digests"/> (their layers were released and no mounted layer has them);
    /// waits for a build in progress first. Returns how many files were deleted.
    /// </summary>
    public async Task<int> RemoveAsync(IEnumerable<string> digests, CancellationToken ct)
    {
        await _one.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            var removed = 0;
            foreach (var d in digests)
            {
                if (!Digests.IsSha256(d)) continue;
                _trusted.TryRemove(d, out _);
                _unverified.TryRemove(d, out _);
                _failedAt.TryRemove(d, out _);
                var path = PathOf(d);
                try
                {
                    if (!File.Exists(path)) continue;
                    File.Delete(path);
                    _budget?.Removed(CacheFileKind.Copy, d);
                    removed++;
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    _log.LogWarning("cannot remove assembled file {Digest}: {Error}", d, e.Message);
                }
            }
            return removed;
        }
        finally
        {
            _one.Release();
        }
    }

    /// <summary>
    /// A read of the copy of <paramref name="digest"/> failed (EIO on the cache disk): it is counted, no longer used and
    /// deleted if the disk lets it; it is not rebuilt for a while (a failing disk would fail the build too).
    /// </summary>
    public void Unreadable(string digest, Exception error)
    {
        _disk?.ReadFailed($"whole-file copy {digest}", error);
        _trusted.TryRemove(digest, out _);
        _unverified.TryRemove(digest, out _);
        _failedAt[digest] = Environment.TickCount64;
        try
        {
            File.Delete(PathOf(digest));
            _budget?.Removed(CacheFileKind.Copy, digest);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }

    /// <summary>Forgets which copies were checked, as a restarted process would (tests of the restart path).</summary>
    internal void ForgetTrust() => _trusted.Clear();

    internal string PathOf(string digest) => Path.Combine(_dir, digest.Substring(7, 2), digest.Substring(7));

    /// <summary>Stops builds (a build in progress gives up at its next chunk).</summary>
    public void Dispose() => _lifetime.Cancel();
}
