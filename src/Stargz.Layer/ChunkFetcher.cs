using System.Buffers;
using System.Collections.Concurrent;
using System.Diagnostics;

namespace Stargz.Layer;

/// <summary>
/// The verified reader of one layer blob: maps a file range to its chunks, serves cached ones from
/// <see cref="ChunkCache"/>, and fetches missing ones from the blob — neighbours merged into one range, scattered
/// ones sent as one multi-range list — then decompresses, checks each chunk's digest and caches it. One fetch per
/// chunk however many callers, across all layers sharing the cache (single-flight per cache key); a fetch runs detached from the caller that started it,
/// so an interrupted reader cancels only its own wait; every fetch fails with <see cref="LayerIOException"/> (EIO) once
/// the blob has received nothing for the fetching timeout, after which the next read tries the registry again.
/// </summary>
internal sealed class ChunkFetcher : IDisposable
{
    private const long MaxMergedRange = 16L << 20;

    private readonly IRangeFetcher _blob;
    private readonly IChunkDecoder _decoder;
    private readonly ChunkCache _cache;
    private readonly FetchGate _gate;
    private readonly LayerStats _stats;
    private readonly LayerOptions _options;
    private readonly string _layerDigest;
    private readonly bool _verify;
    private readonly CancellationTokenSource _lifetime = new();
    private readonly ConcurrentDictionary<string, ChunkClaim> _inflight;
    // The last on-demand window (see NextWindow): where misses walk forward, the window grows.
    private readonly Lock _walkLock = new();
    private long _walkStart, _walkEnd, _walkSize;
    // On-demand misses seen in each aligned region of OnDemandWindowMaxBytes (saturating), under _walkLock.
    private byte[]? _regionMisses;
    // The miss that makes a region this dense brings the whole region (see NextWindow).
    private const int DenseRegionMisses = 2;
    private readonly ConcurrentDictionary<Task, byte> _loads = new();

    /// <summary>Every chunk of the layer by blob offset, for the on-demand window (null: no window).</summary>
    private readonly LayerChunk[]? _byBlobOffset;

    /// <summary>Whole regions a dense-region miss brought, kept compressed (null: no disk cache, or no regions).</summary>
    private readonly CompressedRegions? _regions;

    public ChunkFetcher(IRangeFetcher blob, IChunkDecoder decoder, ChunkCache cache, FetchGate gate, LayerStats stats,
        string layerDigest, LayerOptions options, LayerChunk[]? byBlobOffset = null)
    {
        _byBlobOffset = byBlobOffset;
        _blob = blob;
        _decoder = decoder;
        _cache = cache;
        _gate = gate;
        _stats = stats;
        _options = options = options.Normalized();
        _layerDigest = layerDigest;
        _verify = !options.DisableVerification;
        _inflight = cache.Inflight;
        if (byBlobOffset != null && options.OnDemandWindowMaxBytes > options.OnDemandWindowBytes && cache.TmpDirectory is { } tmp)
            _regions = new CompressedRegions(tmp, cache.Budget);
        Interlocked.Exchange(ref _stats.BlobSize, blob.Size);
    }

    public LayerStats Stats => _stats;

    /// <summary>Cancelled when the layer is unmounted: stops prefetch, background fetch and fetches in flight.</summary>
    public CancellationToken Lifetime => _lifetime.Token;

    internal int InflightCount => _inflight.Count;

    /// <summary>A verified disk file holding exactly this chunk's bytes, or null (verification off: never).</summary>
    internal string? TrustedDiskPath(in LayerChunk c) => _verify && c.Digest != null ? _cache.TrustedPath(c.Digest) : null;

    /// <summary>False with <c>disable_verification</c>: nothing read by this layer is checked, so nothing is trusted.</summary>
    internal bool Verifies => _verify;

    /// <summary>
    /// The chunk's disk file, checked by this process or not (null when there is none): whole-file copies are built
    /// from these and hashed as a whole against the file's digest, so they need no earlier check of each chunk.
    /// </summary>
    internal string? DiskPathOf(LayerChunk c) => _verify && c.Digest != null ? _cache.DiskPath(c.Digest) : null;

    /// <summary>True when every chunk has a disk file this process verified (dictionary lookups only, no I/O).</summary>
    internal bool AllTrustedOnDisk(LayerChunk[] chunks)
    {
        if (!_verify) return false;
        foreach (ref readonly var c in chunks.AsSpan())
            if (c.Digest == null || !_cache.IsTrusted(c.Digest)) return false;
        return true;
    }

    /// <summary>A read answered straight from a verified chunk file on disk (spliced by the FUSE bridge).</summary>
    internal void CountDiskFileRead(string? chunkKey)
    {
        Interlocked.Increment(ref _stats.CacheHits);
        if (chunkKey != null) _cache.Budget.TouchChunk(chunkKey);
    }

    internal DiskBudget Budget => _cache.Budget;

    internal ChunkCache Cache => _cache;

    internal string KeyOf(in LayerChunk c) =>
        _verify && c.Digest != null ? c.Digest : $"{_layerDigest}@{c.BlobOffset}+{c.InnerOffset}+{c.Size}";

    /// <summary>
    /// Reads up to <paramref name="destination"/>.Length bytes of a file at <paramref name="offset"/>. Returns the
    /// bytes read (0 at or past the end). Every byte returned was verified against its chunk digest.
    /// </summary>
    public ValueTask<int> ReadAsync(LayerChunk[] chunks, long fileSize, long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (offset >= fileSize || destination.IsEmpty) return new ValueTask<int>(0);
        var len = (int)Math.Min(destination.Length, fileSize - offset);
        var first = FindChunk(chunks, offset);
        var last = FindChunk(chunks, offset + len - 1);
        if (first < 0 || last < 0)
            return ValueTask.FromException<int>(new LayerIOException($"no chunk covers offset {offset} of a {fileSize}-byte file"));
        // Fast path: every chunk in memory, no allocation, no await.
        var span = destination.Span;
        for (var i = first; i <= last; i++)
        {
            ref readonly var c = ref chunks[i];
            // A chunk without a digest (verification on) goes the slow way, which refuses it with EIO.
            if ((_verify && c.Digest == null) || !_cache.TryGetMemory(KeyOf(c), out var data))
                return ReadSlowAsync(chunks, i, last, offset, len, destination, cancellationToken);
            Interlocked.Increment(ref _stats.CacheHits);
            CopyOut(c, data, offset, len, span);
        }
        return new ValueTask<int>(len);
    }

    private async ValueTask<int> ReadSlowAsync(LayerChunk[] chunks, int from, int last, long offset, int len, Memory<byte> destination, CancellationToken ct)
    {
        var count = last - from + 1;
        var results = ArrayPool<byte[]?>.Shared.Rent(count);
        try
        {
            await AcquireAsync(chunks, from, count, results, FetchPriority.OnDemand, ct).ConfigureAwait(false);
            var span = destination.Span;
            for (var i = 0; i < count; i++)
                CopyOut(chunks[from + i], results[i]!, offset, len, span);
            return len;
        }
        finally
        {
            Array.Clear(results, 0, count);
            ArrayPool<byte[]?>.Shared.Return(results);
        }
    }

    private static void CopyOut(in LayerChunk c, byte[] data, long offset, int len, Span<byte> destination)
    {
        var start = Math.Max(offset, c.FileOffset);
        var end = Math.Min(c.FileEnd, offset + len);
        if (end <= start) return;
        data.AsSpan((int)(start - c.FileOffset), (int)(end - start)).CopyTo(destination.Slice((int)(start - offset)));
    }

    /// <summary>Index of the chunk holding file offset <paramref name="offset"/>, or -1.</summary>
    internal static int FindChunk(LayerChunk[] chunks, long offset)
    {
        int lo = 0, hi = chunks.Length - 1, found = -1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >>> 1;
            if (chunks[mid].FileOffset <= offset) { found = mid; lo = mid + 1; }
            else hi = mid - 1;
        }
        if (found >= 0 && offset >= chunks[found].FileEnd) return -1;
        return found;
    }

    /// <summary>
    /// Makes chunks [start, start+count) of <paramref name="chunks"/> available; fills <paramref name="results"/>
    /// (when given) with their verified data. Cached chunks are taken as they are; chunks another caller is
    /// fetching are awaited; the rest are claimed and fetched together by one detached task.
    /// </summary>
    public async Task AcquireAsync(LayerChunk[] chunks, int start, int count, byte[]?[]? results, FetchPriority priority, CancellationToken ct)
    {
        List<(int Index, Task<byte[]> Task)>? waits = null;
        List<Pending>? claimed = null;
        for (var i = 0; i < count; i++)
        {
            ref readonly var c = ref chunks[start + i];
            if (_verify && c.Digest == null)
                throw new LayerIOException($"chunk at blob offset {c.BlobOffset} has no digest and verification is on");
            var key = KeyOf(c);
            if (_cache.TryGetMemory(key, out var data))
            {
                Interlocked.Increment(ref _stats.CacheHits);
                if (results != null) results[i] = data;
                continue;
            }
            while (true)
            {
                if (_inflight.TryGetValue(key, out var running))
                {
                    // A caller keeping the bytes joins first; a closed claim (its chunk went to disk with nobody
                    // waiting for the bytes) is spent: drop it and claim the chunk anew, which loads it from disk.
                    if (results != null && !running.TryJoin())
                    {
                        _inflight.TryRemove(new KeyValuePair<string, ChunkClaim>(key, running));
                        continue;
                    }
                    (waits ??= []).Add((i, running.Task));
                    break;
                }
                var tcs = new ChunkClaim();
                if (results != null) tcs.TryJoin(); // its own claim: it keeps the bytes too
                if (_inflight.TryAdd(key, tcs))
                {
                    (claimed ??= []).Add(new Pending(c, key, tcs));
                    (waits ??= []).Add((i, tcs.Task));
                    break;
                }
            }
        }
        if (claimed != null)
        {
            List<(long Start, long End)>? wholeRegions = null;
            List<Pending>? restAfter = null, restBefore = null;
            if (priority == FetchPriority.OnDemand && _options.OnDemandFileBytes > 0 && !_options.NoBackgroundFetch && chunks.Length > 1
                && _cache.HasDisk)
                (restAfter, restBefore) = ClaimFileRest(chunks, claimed);
            if (priority == FetchPriority.OnDemand && _options.OnDemandWindowBytes > 0 && _byBlobOffset != null)
                wholeRegions = ClaimWindowNeighbours(claimed);
            // The rest of the file after the chunks asked for rides in their range (no round trip between them); they
            // are answered as soon as they are in.
            if (restAfter != null) claimed.AddRange(restAfter);
            if (_lifetime.IsCancellationRequested)
            {
                foreach (var p in claimed) Fail(p, new LayerIOException("layer is unmounted"));
                if (restBefore != null) foreach (var p in restBefore) Fail(p, new LayerIOException("layer is unmounted"));
            }
            else
            {
                // Detached: the caller's cancellation (FUSE INTERRUPT) must not fail the other waiters.
                var load = restAfter == null && restBefore == null
                    ? Task.Run(() => LoadAsync(claimed, priority, wholeRegions), CancellationToken.None)
                    : Task.Run(() => LoadThenRestAsync(claimed, priority, wholeRegions, restBefore), CancellationToken.None);
                _loads.TryAdd(load, 0);
                _ = load.ContinueWith(static (t, s) => ((ConcurrentDictionary<Task, byte>)s!).TryRemove(t, out _), _loads,
                    CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            }
        }
        if (waits == null) return;
        foreach (var (index, task) in waits)
        {
            var data = await task.WaitAsync(ct).ConfigureAwait(false);
            Debug.Assert(results == null || !ReferenceEquals(data, ChunkClaim.NoBytes), "a joined claim completed without bytes");
            if (results != null) results[index] = data;
        }
    }

    /// <summary>A claimed chunk; <paramref name="Neighbour"/>: taken along by the on-demand window, asked for by nobody.</summary>
    private sealed record Pending(LayerChunk Chunk, string Key, ChunkClaim Completion, bool Neighbour = false);

    /// <summary>
    /// Adds to <paramref name="claimed"/> the chunks wholly inside the aligned <c>chunk_size</c> window around each
    /// chunk a reader asked for that are neither cached (memory or disk) nor being fetched. Nobody waits for them:
    /// they ride in the same range request and land in the cache for the reads that usually follow. Returns the whole
    /// regions to fetch and keep compressed instead (<see cref="CompressedRegions"/>), or null: their chunks are not
    /// claimed, nor are neighbours of a chunk such a region holds already.
    /// </summary>
    private List<(long Start, long End)>? ClaimWindowNeighbours(List<Pending> claimed)
    {
        var all = _byBlobOffset!;
        var asked = claimed.Count;
        List<(long Start, long End)>? wholeRegions = null;
        for (var a = 0; a < asked; a++)
        {
            var c = claimed[a].Chunk;
            if (_regions != null && _regions.Covers(c.BlobOffset, c.BlobEnd)) continue;
            var (start, end, region) = NextWindow(c);
            if (region)
            {
                (wholeRegions ??= []).Add((start, Math.Min(end, _blob.Size)));
                continue;
            }
            // First chunk starting at or after the window's start.
            int lo = 0, hi = all.Length;
            while (lo < hi)
            {
                var mid = (lo + hi) >>> 1;
                if (all[mid].BlobOffset < start) lo = mid + 1;
                else hi = mid;
            }
            for (var i = lo; i < all.Length && all[i].BlobOffset < end; i++)
            {
                ref readonly var n = ref all[i];
                if (n.BlobEnd > end || (_verify && n.Digest == null)) continue;
                var key = KeyOf(n);
                if (_inflight.ContainsKey(key) || _cache.Contains(key)) continue;
                var tcs = new ChunkClaim();
                if (_inflight.TryAdd(key, tcs)) claimed.Add(new Pending(n, key, tcs, Neighbour: true));
            }
        }
        return wholeRegions;
    }

    /// <summary>
    /// At an on-demand miss in the multi-chunk file <paramref name="chunks"/> (<paramref name="claimed"/> holds its
    /// chunks asked for), claims the file's other chunks that are neither cached nor being fetched, as neighbours, when
    /// they span at most <see cref="LayerOptions.OnDemandFileBytes"/> blob bytes: those after the chunks asked for, then
    /// those before them. Null when there are none or they span more (a later miss asks again: the rest shrinks as it is
    /// read), and when the disk cache has no room for them as the background fetch would find it (the rest goes to disk
    /// as the background fetch's chunks do, without evicting anything).
    /// </summary>
    private (List<Pending>? After, List<Pending>? Before) ClaimFileRest(LayerChunk[] chunks, List<Pending> claimed)
    {
        long askedEnd = 0, bytes = 0, decoded = 0;
        foreach (var p in claimed) askedEnd = Math.Max(askedEnd, p.Chunk.BlobEnd);
        List<(int Index, string Key)>? rest = null;
        for (var i = 0; i < chunks.Length; i++)
        {
            ref readonly var c = ref chunks[i];
            if (_verify && c.Digest == null) return (null, null);
            var key = KeyOf(c);
            if (_inflight.ContainsKey(key) || _cache.Contains(key)) continue;
            (rest ??= []).Add((i, key));
            bytes += c.BlobLength;
            decoded += c.Size;
        }
        if (rest == null || bytes > _options.OnDemandFileBytes || !_cache.MayAddInBackground(decoded)) return (null, null);
        List<Pending>? after = null, before = null;
        foreach (var (i, key) in rest)
        {
            var tcs = new ChunkClaim();
            if (!_inflight.TryAdd(key, tcs)) continue; // claimed meanwhile by another reader
            var p = new Pending(chunks[i], key, tcs, Neighbour: true);
            if (p.Chunk.BlobOffset >= askedEnd) (after ??= []).Add(p);
            else (before ??= []).Add(p);
        }
        return (after, before);
    }

    /// <summary>
    /// Loads what a reader asked for with the rest of its file after it (<see cref="ClaimFileRest"/>), then the part
    /// before it; chunks are answered as they arrive to readers waiting for them. The part before is not fetched when
    /// the first load failed with nothing received (the registry is not answering): its claims fail with it, so a
    /// reader that joined one gets EIO after one fetching timeout, not two.
    /// </summary>
    private async Task LoadThenRestAsync(List<Pending> claimed, FetchPriority priority, List<(long Start, long End)>? wholeRegions,
        List<Pending>? before)
    {
        var startBytes = _blob.ReceivedBytes;
        await LoadAsync(claimed, priority, wholeRegions, answerEarly: true).ConfigureAwait(false);
        if (before == null) return;
        Exception? failed = null;
        if (_blob.ReceivedBytes == startBytes)
            foreach (var p in claimed)
                if (p.Completion.Task.IsFaulted) { failed = p.Completion.Task.Exception!.InnerException; break; }
        if (failed != null) FailAll(before, () => failed as LayerIOException ?? new LayerIOException(failed.Message, failed));
        else await LoadAsync(before, priority, null, answerEarly: true).ConfigureAwait(false);
    }

    /// <summary>
    /// The blob range an on-demand miss of <paramref name="c"/> brings: the aligned <c>chunk_size</c> window around it,
    /// or, while misses walk forward through the blob (each at or just past the end of the previous window), a window
    /// twice the previous one reaching forward, up to <see cref="LayerOptions.OnDemandWindowMaxBytes"/>, as the kernel's
    /// readahead grows. A workload that opens file after file in blob order then needs ever fewer round trips.
    /// With a disk cache, scattered misses that keep landing in one aligned region of that bound (a language runtime
    /// importing modules stored side by side, in another order) bring the whole region at the second such miss, kept
    /// compressed (<see cref="CompressedRegions"/>) and decoded only where asked for: a traced python start made ~40
    /// serial requests within 5 such regions. A region with one miss costs no more than the fixed window. (Decoding and
    /// storing a whole region's chunks at once instead cost 1.14x the time and 1.7x the CPU on loopback.)
    /// </summary>
    private (long Start, long End, bool Region) NextWindow(in LayerChunk c)
    {
        var unit = _options.OnDemandWindowBytes;
        var bound = Math.Max(unit, _options.OnDemandWindowMaxBytes);
        var start = c.BlobOffset - c.BlobOffset % unit;
        var alignedEnd = (c.BlobEnd + unit - 1) / unit * unit;
        lock (_walkLock)
        {
            var forward = _walkEnd > 0 && c.BlobOffset >= _walkStart && c.BlobOffset < _walkEnd + unit;
            var dense = bound > unit && _regions != null && CountRegionMiss(c.BlobOffset / bound, bound) == DenseRegionMisses;
            long size;
            if (!forward && dense)
            {
                start = c.BlobOffset / bound * bound;
                size = bound;
            }
            else size = forward ? Math.Min(_walkSize * 2, bound) : unit;
            var end = Math.Max(alignedEnd, start + size);
            (_walkStart, _walkEnd, _walkSize) = (start, end, size);
            return (start, end, !forward && dense);
        }
    }

    /// <summary>
    /// Counts an on-demand miss in region <paramref name="region"/> (of <paramref name="regionBytes"/> each); returns the
    /// region's count (saturating).
    /// </summary>
    private int CountRegionMiss(long region, long regionBytes)
    {
        _regionMisses ??= new byte[_blob.Size / regionBytes + 1];
        if ((ulong)region >= (ulong)_regionMisses.Length) return 0;
        ref var n = ref _regionMisses[region];
        if (n < byte.MaxValue) n++;
        return n;
    }

    private async Task LoadAsync(List<Pending> claimed, FetchPriority priority, List<(long Start, long End)>? wholeRegions,
        bool answerEarly = false)
    {
        try
        {
            await LoadCoreAsync(claimed, priority, wholeRegions, answerEarly).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            // Whatever went wrong, no waiter may be left hanging on a claim nobody will complete.
            FailAll(claimed, () => e as LayerIOException ?? new LayerIOException($"loading chunks failed: {e.Message}", e));
        }
    }

    private async Task LoadCoreAsync(List<Pending> claimed, FetchPriority priority, List<(long Start, long End)>? wholeRegions,
        bool answerEarly)
    {
        List<Pending>? toFetch = null;
        // The background fetch with a disk cache only needs each chunk on disk: one found there is checked without
        // reading it into an array, unless a reader joined its claim and waits for the bytes.
        var diskOnly = priority == FetchPriority.Background && _cache.HasDisk;
        foreach (var p in claimed)
        {
            byte[]? data = null;
            if (diskOnly && !p.Completion.IsJoined)
            {
                bool found;
                try
                {
                    found = await _cache.HasOnDiskAsync(p.Key, _verify ? p.Chunk.Digest : null, p.Chunk.Size, _lifetime.Token).ConfigureAwait(false);
                }
                catch (OperationCanceledException) { found = false; }
                if (!found)
                {
                    (toFetch ??= []).Add(p);
                    continue;
                }
                if (p.Completion.TryClose())
                {
                    Interlocked.Increment(ref _stats.CacheHits);
                    Complete(p, ChunkClaim.NoBytes);
                    continue;
                }
                // A reader joined meanwhile: it gets the bytes, read below.
            }
            try
            {
                data = await _cache.TryGetAsync(p.Key, _verify ? p.Chunk.Digest : null, p.Chunk.Size,
                    keepInMemory: priority != FetchPriority.Background && !_options.DirectDiskReads, _lifetime.Token).ConfigureAwait(false);
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
            catch (OperationCanceledException) { }
            if (data != null)
            {
                Interlocked.Increment(ref _stats.CacheHits);
                Complete(p, data);
            }
            else
            {
                (toFetch ??= []).Add(p);
            }
        }
        if (toFetch != null)
        {
            var misses = 0;
            foreach (var p in toFetch) if (!p.Neighbour) misses++;
            Interlocked.Add(ref _stats.CacheMisses, misses);
            await FetchAsync(toFetch, priority, wholeRegions, answerEarly).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// For this long after a fetch of this blob failed with nothing received, a fetch of the same chunks gets only this
    /// long without progress (as long as nothing arrived since): the kernel reads a page again at once when its readahead
    /// failed, and that second read must not wait out a second fetching timeout (it would double the time to EIO); a
    /// registry that is back by then still serves it. Other chunks get the whole timeout.
    /// </summary>
    private const long RecentStallMs = 1000;
    private long _stalledAt = long.MinValue / 2;
    private long _stalledAtBytes = -1;
    private HashSet<string>? _stalledKeys;

    private async Task FetchAsync(List<Pending> pending, FetchPriority priority, List<(long Start, long End)>? wholeRegions,
        bool answerEarly)
    {
        var startBytes = _blob.ReceivedBytes;
        var limit = _options.FetchingTimeout;
        if (Environment.TickCount64 - Volatile.Read(ref _stalledAt) < RecentStallMs && startBytes == Volatile.Read(ref _stalledAtBytes)
            && limit > TimeSpan.FromMilliseconds(RecentStallMs) && Volatile.Read(ref _stalledKeys) is { } failed && AllIn(pending, failed))
            limit = TimeSpan.FromMilliseconds(RecentStallMs);
        pending.Sort(static (a, b) =>
        {
            var r = a.Chunk.BlobOffset.CompareTo(b.Chunk.BlobOffset);
            return r != 0 ? r : a.Chunk.InnerOffset.CompareTo(b.Chunk.InnerOffset);
        });
        // Merge neighbours (and chunks sharing one compressed member) into ranges.
        var groups = new List<(long Offset, long End, int First, int Last)>();
        for (var i = 0; i < pending.Count; i++)
        {
            var c = pending[i].Chunk;
            if (groups.Count > 0)
            {
                var g = groups[^1];
                if (c.BlobOffset <= g.End + _options.MergeGapBytes && Math.Max(g.End, c.BlobEnd) - g.Offset <= MaxMergedRange)
                {
                    groups[^1] = (g.Offset, Math.Max(g.End, c.BlobEnd), g.First, i);
                    continue;
                }
            }
            groups.Add((c.BlobOffset, c.BlobEnd, i, i));
        }
        var isRegion = wholeRegions == null ? null : SpanRegions(groups, wholeRegions);
        var buffers = new FetchBuffer[groups.Count];
        var ranges = new List<FetchRange>(groups.Count);
        var fetchedGroup = -1;
        long total = 0;
        for (var g = 0; g < groups.Count; g++)
        {
            var len = (int)(groups[g].End - groups[g].Offset);
            buffers[g] = FetchBuffer.Rent(len);
            // A range a kept region holds is read from it, decoded and verified as if it had just come.
            if (_regions != null && isRegion?[g] != true && _regions.TryRead(groups[g].Offset, buffers[g].Span))
                continue;
            ranges.Add(new FetchRange(groups[g].Offset, buffers[g].Memory));
            fetchedGroup = g;
            total += len;
        }
        var keepInMemory = priority != FetchPriority.Background || _options.CacheDirectory == null;
        // Bounded by the time without progress, not the total: a slow transfer that moves is never cut.
        using var timeout = new ProgressDeadline(_lifetime.Token, limit, () => _blob.ReceivedBytes);
        List<Pending>? done = null;
        List<byte[]>? doneData = null;
        // The rest of a file: a chunk a reader waits for is answered as soon as its bytes are in, not once the whole
        // range (up to OnDemandFileBytes, 0.6 s through a 200 Mbit/s link) is. (sync_add answers after the disk anyway.)
        // Not for the windows around a miss: measured, answering their chunks early saved no time there.
        EarlyAnswers? early = null;
        if (answerEarly && ranges.Count == 1 && priority != FetchPriority.Background && !_options.SyncAdd)
            early = new EarlyAnswers(this, pending, groups[fetchedGroup], buffers[fetchedGroup], done = [], doneData = []);
        try
        {
            if (ranges.Count > 0)
            {
                await _gate.EnterAsync(priority, timeout.Token).ConfigureAwait(false);
                try
                {
                    Interlocked.Increment(ref _stats.FetchCalls);
                    Interlocked.Add(ref _stats.RangeRequests, ranges.Count);
                    await _blob.FetchAsync(ranges, timeout.Token, early == null ? null : early.Arrived).ConfigureAwait(false);
                    _stats.AddFetched(priority, total);
                }
                finally
                {
                    _gate.Exit(priority);
                    early?.Close();
                }
            }
            if (!keepInMemory) StoreOnDiskOnly(pending, groups, buffers, neighboursOnly: false, answered: null);
            else
            {
                // The chunks readers asked for first: neighbours the on-demand window took along must not delay them.
                // With a disk cache the neighbours then go to disk only, as the background fetch's chunks do.
                var neighboursToDisk = _cache.HasDisk;
                for (var pass = 0; pass < (neighboursToDisk ? 1 : 2); pass++)
                for (var g = 0; g < groups.Count; g++)
                {
                    var (offset, _, firstIdx, lastIdx) = groups[g];
                    for (var i = firstIdx; i <= lastIdx; i++)
                    {
                        var p = pending[i];
                        if (p.Neighbour != (pass == 1) || early?.Answered[i] == true) continue;
                        if (DecodeToMemory(p, buffers[g].Span, offset) is not { } data) continue;
                        (done ??= []).Add(p);
                        (doneData ??= []).Add(data);
                    }
                }
                // Then the whole regions are kept, compressed, for the misses that follow in them.
                if (isRegion != null)
                    for (var g = 0; g < groups.Count; g++)
                        if (isRegion[g]) _regions!.Add(groups[g].Offset, buffers[g].Span);
                if (neighboursToDisk) StoreOnDiskOnly(pending, groups, buffers, neighboursOnly: true, answered: early?.Answered);
            }
        }
        catch (OperationCanceledException) when (_lifetime.IsCancellationRequested)
        {
            FailAll(pending, () => new LayerIOException("layer is unmounted"));
        }
        catch (OperationCanceledException)
        {
            NoteStall(startBytes, pending);
            FailAll(pending, () => new LayerIOException($"registry sent nothing for the chunk within {limit.TotalSeconds:0.#} s"));
        }
        catch (Exception e)
        {
            NoteStall(startBytes, pending);
            FailAll(pending, () => new LayerIOException($"fetching chunks failed: {e.Message}", e));
        }
        finally
        {
            foreach (var b in buffers) b.Return();
        }
        if (done == null || done.Count == 0) return;
        // Waiters already have their data (unless sync_add); now make it durable, then let later callers find it in the cache.
        HashSet<string>? dirs = null;
        for (var i = 0; i < done.Count; i++)
        {
            try
            {
                var dir = _cache.WriteDisk(done[i].Key, doneData![i], background: priority == FetchPriority.Background);
                if (dir != null) (dirs ??= []).Add(dir);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                _cache.Disk.WriteFailed($"chunk {done[i].Key}", e);
            }
        }
        if (dirs != null) foreach (var d in dirs) _cache.SyncDirectory(d);
        // sync_add: the waiters are answered only now that their chunks are on disk.
        if (_options.SyncAdd) for (var i = 0; i < done.Count; i++) done[i].Completion.TrySetResult(doneData![i]);
        foreach (var p in done) _inflight.TryRemove(new KeyValuePair<string, ChunkClaim>(p.Key, p.Completion));
    }

    /// <summary>
    /// Makes each of <paramref name="wholeRegions"/> one range: the ranges it overlaps merge into one that spans the
    /// region (and them). Returns which ranges span a region.
    /// </summary>
    private static bool[] SpanRegions(List<(long Offset, long End, int First, int Last)> groups, List<(long Start, long End)> wholeRegions)
    {
        foreach (var (start, end) in wholeRegions)
        {
            int first = -1, last = -1;
            for (var g = 0; g < groups.Count; g++)
            {
                if (groups[g].Offset >= end || groups[g].End <= start) continue;
                if (first < 0) first = g;
                last = g;
            }
            if (first < 0) continue; // none: every chunk of this region's miss was found cached meanwhile
            var merged = (Math.Min(start, groups[first].Offset), Math.Max(end, groups[last].End), groups[first].First, groups[last].Last);
            groups.RemoveRange(first, last - first + 1);
            groups.Insert(first, merged);
        }
        var isRegion = new bool[groups.Count];
        for (var g = 0; g < groups.Count; g++)
            foreach (var (start, end) in wholeRegions)
                if (groups[g].Offset <= start && groups[g].End >= end) isRegion[g] = true;
        return isRegion;
    }

    /// <summary>
    /// The background fetch with a disk cache, and the neighbours an on-demand fetch took along
    /// (<paramref name="neighboursOnly"/>): the chunks of the fetched ranges are decoded into one scratch area (mapped
    /// memory when big, unmapped after), verified and written to disk, and no array is made for them — a fresh
    /// chunk-sized array per chunk would be large-object-heap garbage that the server GC collects late, and is what made
    /// the daemon's peak memory; a region fetch takes ~60 neighbours along — unless a reader joined a chunk's claim:
    /// that one gets a copy as soon as its chunk is decoded, before the disk writes (or, joining meanwhile, before the
    /// next write), so no reader waits on the disk. A claim is closed (or completed with the copy) only once its chunk
    /// is on disk, so a reader finding it closed finds the file. These writes never evict: nobody asked for the chunks.
    /// </summary>
    private void StoreOnDiskOnly(List<Pending> pending, List<(long Offset, long End, int First, int Last)> groups, FetchBuffer[] buffers,
        bool neighboursOnly, bool[]? answered)
    {
        // Decoded and written a batch at a time, in fetch order. The background fetch's batch is one chunk (its area
        // the largest chunk, as its batches are big and seldom waited for); the neighbours' batch is all of them, up
        // to StoreAreaBytes.
        long largest = -1, total = 0;
        for (var i = 0; i < pending.Count; i++)
        {
            var p = pending[i];
            if ((neighboursOnly && !p.Neighbour) || answered?[i] == true) continue;
            largest = Math.Max(largest, p.Chunk.Size);
            total += p.Chunk.Size;
        }
        if (largest < 0) return; // none to store
        var area = FetchBuffer.Rent((int)Math.Max(largest, neighboursOnly ? Math.Min(total, StoreAreaBytes) : 1));
        var batch = new List<(int Index, int At, byte[]? Copy)>();
        HashSet<string>? dirs = null;
        List<(Pending P, byte[] Data)>? answers = null; // sync_add: answered once the directories are synced too
        try
        {
            var used = 0;
            for (var g = 0; g < groups.Count; g++)
            {
                var (offset, _, firstIdx, lastIdx) = groups[g];
                for (var i = firstIdx; i <= lastIdx; i++)
                {
                    var p = pending[i];
                    if ((neighboursOnly && !p.Neighbour) || answered?[i] == true) continue;
                    var size = (int)p.Chunk.Size;
                    if (used + size > area.Length)
                    {
                        WriteBatch();
                        used = 0;
                    }
                    if (!DecodeVerified(p, buffers[g].Span, offset, area.Span.Slice(used, size))) continue;
                    Interlocked.Increment(ref _stats.ChunksFetched);
                    batch.Add((i, used, null));
                    used += size;
                }
            }
            WriteBatch();
        }
        finally
        {
            area.Return();
        }
        if (dirs != null) foreach (var d in dirs) _cache.SyncDirectory(d);
        if (answers != null) foreach (var (p, data) in answers) Complete(p, data);

        void WriteBatch()
        {
            for (var k = 0; k < batch.Count; k++)
            {
                // Readers that joined by now get their bytes before this write (sync_add: only after the disk).
                if (!_options.SyncAdd) AnswerJoined(k);
                var (i, at, copy) = batch[k];
                var p = pending[i];
                var data = area.Span.Slice(at, (int)p.Chunk.Size);
                try
                {
                    var dir = _cache.WriteDisk(p.Key, data, background: true);
                    if (dir != null) (dirs ??= []).Add(dir);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    _cache.Disk.WriteFailed($"chunk {p.Key}", e);
                }
                // Closed even when the disk refused the chunk: nobody needs its bytes, a later reader fetches it.
                var answer = p.Completion.TryClose() ? ChunkClaim.NoBytes : copy ?? data.ToArray();
                if (_options.SyncAdd) (answers ??= []).Add((p, answer));
                else Complete(p, answer);
            }
            batch.Clear();
        }

        void AnswerJoined(int from)
        {
            for (var k = from; k < batch.Count; k++)
            {
                var (i, at, copy) = batch[k];
                var p = pending[i];
                if (copy != null || !p.Completion.IsJoined) continue;
                copy = area.Span.Slice(at, (int)p.Chunk.Size).ToArray();
                p.Completion.TrySetResult(copy);
                batch[k] = (i, at, copy);
            }
        }
    }

    /// <summary>
    /// Answers, while a single range is still arriving, the chunks of it whose bytes are all in: those a reader asked
    /// for, and neighbours a reader has joined by then. They are decoded, verified and kept in memory as the chunks
    /// answered after the fetch are, and written to disk with them (added to the fetch's done lists, also when the
    /// rest of the range then fails to come); <see cref="Answered"/> marks
    /// them so nothing decodes them again. Called from the transfer, between reads of the body; nothing after
    /// <see cref="Close"/>, so the range's buffer is never read once returned.
    /// </summary>
    private sealed class EarlyAnswers(ChunkFetcher fetcher, List<Pending> pending, (long Offset, long End, int First, int Last) group,
        FetchBuffer buffer, List<Pending> done, List<byte[]> doneData)
    {
        private readonly Lock _lock = new();
        private int _next = group.First;
        private bool _closed;
        public readonly bool[] Answered = new bool[pending.Count];

        public void Arrived(int leading)
        {
            var have = group.Offset + leading;
            lock (_lock)
            {
                if (_closed) return;
                // Sorted by blob offset: the first chunk not yet in ends the walk.
                for (; _next <= group.Last && pending[_next].Chunk.BlobEnd <= have; _next++)
                {
                    var p = pending[_next];
                    if (p.Neighbour && !p.Completion.IsJoined) continue;
                    Answered[_next] = true;
                    if (fetcher.DecodeToMemory(p, buffer.Span, group.Offset) is not { } data) continue;
                    done.Add(p);
                    doneData.Add(data);
                }
            }
        }

        public void Close()
        {
            lock (_lock) _closed = true;
        }
    }

    /// <summary>
    /// The most decoded bytes of an on-demand fetch's neighbours held before they are written (a 1 MiB region of a
    /// runtime's library decodes to ~3 MiB); more are written in parts.
    /// </summary>
    private const int StoreAreaBytes = 8 << 20;

    /// <summary>
    /// Decodes <paramref name="p"/>'s chunk from the fetched range that starts at blob offset <paramref name="rangeOffset"/>
    /// into <paramref name="data"/> and checks its digest; on failure fails the claim (EIO) and returns false.
    /// </summary>
    private bool DecodeVerified(Pending p, ReadOnlySpan<byte> range, long rangeOffset, Span<byte> data)
    {
        var c = p.Chunk;
        try
        {
            _decoder.Decode(range.Slice((int)(c.BlobOffset - rangeOffset), (int)c.BlobLength), c.InnerOffset, data);
            if (_verify && !Digests.Matches(data, c.Digest!))
                throw new LayerIOException($"chunk at blob offset {c.BlobOffset} does not match its digest {c.Digest}");
            return true;
        }
        catch (Exception e)
        {
            Fail(p, e as LayerIOException ?? new LayerIOException($"chunk at blob offset {c.BlobOffset} cannot be decoded: {e.Message}", e));
            return false;
        }
    }

    /// <summary>
    /// Decodes and verifies <paramref name="p"/>'s chunk from the range at <paramref name="rangeOffset"/> into a fresh
    /// array, keeps it in the memory cache and answers the claim's waiters (with sync_add, not yet: after the disk).
    /// Null when the chunk failed (its claim failed with EIO). The claim stays in flight until the caller wrote it.
    /// </summary>
    private byte[]? DecodeToMemory(Pending p, ReadOnlySpan<byte> range, long rangeOffset)
    {
        var data = GC.AllocateUninitializedArray<byte>((int)p.Chunk.Size);
        if (!DecodeVerified(p, range, rangeOffset, data)) return null;
        _cache.AddMemory(p.Key, data);
        Interlocked.Increment(ref _stats.ChunksFetched);
        if (!_options.SyncAdd) p.Completion.TrySetResult(data);
        return data;
    }

    /// <summary>Answers the claim's waiters, then lets later callers find the chunk in the cache instead.</summary>
    private void Complete(Pending p, byte[] data)
    {
        p.Completion.TrySetResult(data);
        _inflight.TryRemove(new KeyValuePair<string, ChunkClaim>(p.Key, p.Completion));
    }

    /// <summary>A fetch failed: when the blob received nothing meanwhile, fetches in the next moment fail at once.</summary>
    private void NoteStall(long startBytes, List<Pending> pending)
    {
        var now = _blob.ReceivedBytes;
        if (now != startBytes) return;
        var keys = new HashSet<string>(pending.Count, StringComparer.Ordinal);
        foreach (var p in pending) keys.Add(p.Key);
        Volatile.Write(ref _stalledKeys, keys);
        Volatile.Write(ref _stalledAtBytes, now);
        Volatile.Write(ref _stalledAt, Environment.TickCount64);
    }

    private static bool AllIn(List<Pending> pending, HashSet<string> keys)
    {
        foreach (var p in pending) if (!keys.Contains(p.Key)) return false;
        return true;
    }

    private void FailAll(List<Pending> pending, Func<LayerIOException> error)
    {
        var e = error();
        foreach (var p in pending)
            if (!p.Completion.Task.IsCompleted) Fail(p, e);
    }

    private void Fail(Pending p, Exception e)
    {
        _stats.RecordError(e.Message);
        // The claim goes first: a waiter woken by the failure may read again at once, and must start a new fetch
        // rather than join this failed one (it got a stale EIO after the registry had come back).
        _inflight.TryRemove(new KeyValuePair<string, ChunkClaim>(p.Key, p.Completion));
        p.Completion.TrySetException(e);
        _ = p.Completion.Task.Exception; // observed: a waiter may have gone away (interrupt)
    }

    /// <summary>
    /// Fetches every chunk of <paramref name="byBlobOffset"/>[<paramref name="next"/>.Value, <paramref name="end"/>)
    /// (sorted by blob offset) that is not cached yet, in batches of about <c>prefetch_chunk_size</c> blob bytes,
    /// one batch at a time, waiting <paramref name="pause"/> between batches. <paramref name="next"/> advances past
    /// each finished batch, so a caller that caught an error resumes where it stopped.
    /// <paramref name="progress"/> receives the blob bytes each batch covered.
    /// </summary>
    private static readonly TimeSpan BackgroundRoomPoll = TimeSpan.FromSeconds(1);

    /// <summary>
    /// The first chunk of <paramref name="chunks"/> with no file in the disk cache (a write the disk refused), or -1
    /// when all are there (a memory-only cache: always -1). File existence only, no hashing.
    /// </summary>
    internal bool HasDiskCache => _cache.HasDisk;

    /// <summary>
    /// Writes to disk the chunks of [<paramref name="from"/>, <paramref name="to"/>) that are in memory only; false
    /// when one of them is on neither (it has to be fetched).
    /// </summary>
    private bool PersistFromMemory(LayerChunk[] chunks, int from, int to)
    {
        string? lastDir = null;
        var all = true;
        for (var k = from; k < to; k++)
        {
            var key = KeyOf(chunks[k]);
            if (_cache.OnDisk(key)) continue;
            if (!_cache.TryPeekMemory(key, out var data)) { all = false; continue; }
            var dir = _cache.WriteDisk(key, data, background: true);
            if (dir != null && dir != lastDir)
            {
                _cache.SyncDirectory(dir);
                lastDir = dir;
            }
        }
        return all;
    }

    internal int FirstMissingOnDisk(LayerChunk[] chunks)
    {
        for (var i = 0; i < chunks.Length; i++)
            if (!_cache.OnDisk(KeyOf(chunks[i]))) return i;
        return -1;
    }

    internal async Task FetchAllAsync(LayerChunk[] byBlobOffset, System.Runtime.CompilerServices.StrongBox<int> next, int end,
        FetchPriority priority, TimeSpan pause, Action<long>? progress, CancellationToken ct)
    {
        var batchBytes = _options.EffectivePrefetchChunkSize;
        while (next.Value < end)
        {
            ct.ThrowIfCancellationRequested();
            var first = next.Value;
            var i = first;
            var batchStart = byBlobOffset[i].BlobOffset;
            while (i < end && (i == first || byBlobOffset[i].BlobEnd - batchStart <= batchBytes)) i++;
            var bytes = byBlobOffset[i - 1].BlobEnd - batchStart;
            var anyMissing = false;
            for (var k = first; k < i && !anyMissing; k++)
                anyMissing = !_cache.Contains(KeyOf(byBlobOffset[k]));
            // With a disk cache the point is the disk: a chunk only in memory (its write was refused when the disk was
            // full) is written from memory now.
            if (!anyMissing && _cache.HasDisk) anyMissing = !PersistFromMemory(byBlobOffset, first, i);
            if (anyMissing)
            {
                // Only a batch with something to fetch waits: a layer cached whole is known to be so at once (Check
                // then needs no registry), however busy mounts and checks are.
                if (priority == FetchPriority.Background)
                {
                    await _gate.WaitQuietAsync(ct).ConfigureAwait(false);
                    // A full cache disk: fetching more in the background would only be thrown away.
                    // Neither beyond the disk budget: the background fetch never evicts to make room.
                    while (!_cache.MayAddInBackground(bytes)) await Task.Delay(BackgroundRoomPoll, ct).ConfigureAwait(false);
                }
                await AcquireAsync(byBlobOffset, first, i - first, null, priority, ct).ConfigureAwait(false);
                if (pause > TimeSpan.Zero && i < end) await Task.Delay(pause, ct).ConfigureAwait(false);
            }
            next.Value = i;
            progress?.Invoke(bytes);
        }
    }

    /// <summary>
    /// Waits until every fetch started so far has finished, including its disk writes (waiters get their data
    /// before the chunk is written; this is for unmount and tests that restart the cache).
    /// </summary>
    public async Task DrainAsync()
    {
        while (!_loads.IsEmpty)
        {
            foreach (var t in _loads.Keys)
            {
                try { await t.ConfigureAwait(false); } catch (Exception) { /* the waiters saw it */ }
                _loads.TryRemove(t, out _);
            }
        }
    }

    /// <summary>Drops the compressed regions kept for on-demand misses: every chunk of the layer is on disk now.</summary>
    internal void DropRegions() => _regions?.Clear();

    /// <summary>Unmount: cancels prefetch, background fetch and fetches in flight (their waiters get EIO).</summary>
    public void Dispose()
    {
        // Cancelled, not disposed: fetches still finishing read the token.
        _lifetime.Cancel();
        _regions?.Dispose();
    }
}
