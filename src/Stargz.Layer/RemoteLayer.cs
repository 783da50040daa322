using System.Runtime.CompilerServices;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Layer;

/// <summary>
/// One resolved layer: its TOC, node tree and verified chunk reader, plus the mount-time prefetch and the
/// background fetch of everything else. Prefetch covers the blob up to <c>.prefetch.landmark</c> (nothing with
/// <c>.no.prefetch.landmark</c>, else <c>prefetch_size</c>), in large ranges, bounded by <c>prefetch_timeout_sec</c>;
/// the background fetch follows at low priority and stops when the layer is disposed (unmounted).
/// </summary>
public sealed class RemoteLayer : IAsyncDisposable
{
    /// <summary>Between background passes while the registry is away: 1 s doubling to a minute.</summary>
    private static readonly Backoff RegistryAwayBackoff = new(TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60));
    private readonly LayerOptions _options;
    private readonly LayerChunk[] _byBlobOffset;
    private Task _work = Task.CompletedTask;
    private int _disposed;

    internal RemoteLayer(string reference, string digest, ResolvedToc toc, IRangeFetcher blob, ChunkCache cache, FetchGate gate, LayerOptions options,
        AssembledFiles? assembled = null)
    {
        Reference = reference;
        Digest = digest;
        TocDigest = toc.TocDigest;
        Reader = toc.Reader;
        _options = options = options.Normalized();
        Stats = new LayerStats();
        _byBlobOffset = CollectChunks(toc.Reader);
        Fetcher = new ChunkFetcher(blob, new EstargzChunkDecoder(toc.Reader.Compression), cache, gate, Stats, digest, options, _byBlobOffset);
        FileSystem = new LayerFileSystem(toc.Reader.Root, Fetcher, options.UserXattrOpaque, options.MaxCacheFds, options.SpliceFromChunkFiles, assembled);
    }

    public string Reference { get; }
    public string Digest { get; }
    public string TocDigest { get; }
    public LayerStats Stats { get; }
    internal EstargzReader Reader { get; }
    internal ChunkFetcher Fetcher { get; }
    internal LayerFileSystem FileSystem { get; }

    /// <summary>Finishes when prefetch and background fetch are over (done, failed, or stopped).</summary>
    public Task BackgroundWork => _work;

    /// <summary>
    /// True once every chunk of the layer has been fetched and verified (by prefetch and background fetch) and has its
    /// file on disk; false again once the disk budget evicted one of them (Check then asks the registry).
    /// </summary>
    public bool AllChunksFetched
    {
        get
        {
            if (Volatile.Read(ref _allFetched) == 0) return false;
            var evictions = Fetcher.Budget.Evictions;
            if (evictions == Volatile.Read(ref _checkedAtEvictions)) return true;
            // Something was evicted since the last look: is every chunk of this layer still on disk?
            if (Fetcher.FirstMissingOnDisk(_byBlobOffset) >= 0)
            {
                Volatile.Write(ref _allFetched, 0);
                return false;
            }
            Volatile.Write(ref _checkedAtEvictions, evictions);
            return true;
        }
    }
    private int _allFetched;
    private long _checkedAtEvictions;

    /// <summary>Chunks of the layer in the cache (on disk; in memory when there is no disk cache) and in all.</summary>
    /// <remarks>A walk over every chunk (dictionary look-ups): for status queries, not for the read path.</remarks>
    public (int Cached, int Total) ChunkCounts()
    {
        var cached = 0;
        var disk = Fetcher.HasDiskCache;
        foreach (var c in _byBlobOffset)
        {
            var key = Fetcher.KeyOf(c);
            if (disk ? Fetcher.Cache.OnDisk(key) : Fetcher.Cache.Contains(key)) cached++;
        }
        return (cached, _byBlobOffset.Length);
    }

    /// <summary>Where the prefetch ends in the blob (0 = no prefetch).</summary>
    public long PrefetchEnd { get; private set; }

    private static LayerChunk[] CollectChunks(EstargzReader reader)
    {
        var all = new List<LayerChunk>();
        var seen = new HashSet<(long, long)>();
        foreach (var node in reader.Tree.Nodes)
        {
            if (!node.IsRegular) continue;
            foreach (var c in node.Chunks)
                if (seen.Add((c.BlobOffset, c.InnerOffset))) all.Add(c);
        }
        all.Sort(static (a, b) =>
        {
            var r = a.BlobOffset.CompareTo(b.BlobOffset);
            return r != 0 ? r : a.InnerOffset.CompareTo(b.InnerOffset);
        });
        return all.ToArray();
    }

    /// <summary>The chunk cache keys of every chunk of this layer (chunk digests; layer-local keys when unverified).</summary>
    internal HashSet<string> ChunkKeys()
    {
        var keys = new HashSet<string>(_byBlobOffset.Length, StringComparer.Ordinal);
        foreach (var c in _byBlobOffset) keys.Add(Fetcher.KeyOf(c));
        return keys;
    }

    /// <summary>Content digests of the layer's files of more than one chunk (the ones that may have whole-file copies).</summary>
    internal HashSet<string> FileDigests()
    {
        var digests = new HashSet<string>(StringComparer.Ordinal);
        foreach (var node in Reader.Tree.Nodes)
            if (node.IsRegular && node.Chunks.Count > 1 && node.Entry.Digest is { } d) digests.Add(d);
        return digests;
    }

    /// <summary>The layer's chunk files were dropped (it was promoted): it is no longer fully fetched.</summary>
    internal void ChunksDropped() => Volatile.Write(ref _allFetched, 0);

    /// <summary>
    /// Starts the background fetch again (no prefetch) after the layer's promoted image was evicted: it fills the cache
    /// back as room allows, so the layer can be promoted again. Does nothing while an earlier run goes on.
    /// </summary>
    internal void RestartBackgroundWork()
    {
        if (!_work.IsCompleted || Volatile.Read(ref _disposed) != 0) return;
        _work = Task.Run(() => RunAsync(0));
    }

    /// <summary>Starts prefetch then background fetch; returns at once (the mount never waits for them).</summary>
    internal void StartBackgroundWork(long? prefetchSizeLabel)
    {
        long end = 0;
        if (!_options.NoPrefetch && !Reader.HasNoPrefetchLandmark)
            end = Reader.PrefetchLandmarkOffset ?? prefetchSizeLabel ?? _options.PrefetchSize;
        PrefetchEnd = end;
        _work = Task.Run(() => RunAsync(end));
    }

    private async Task RunAsync(long prefetchEnd)
    {
        var lifetime = Fetcher.Lifetime;
        var split = 0;
        while (split < _byBlobOffset.Length && _byBlobOffset[split].BlobOffset < prefetchEnd) split++;
        if (split > 0)
        {
            Interlocked.Exchange(ref Stats.PrefetchTotalBytes, _byBlobOffset[split - 1].BlobEnd - _byBlobOffset[0].BlobOffset);
            Volatile.Write(ref Stats.PrefetchState, (int)FetchStageState.Running);
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(lifetime);
            timeout.CancelAfter(_options.PrefetchTimeout);
            try
            {
                await Fetcher.FetchAllAsync(_byBlobOffset, new StrongBox<int>(0), split, FetchPriority.Prefetch, TimeSpan.Zero,
                    b => Interlocked.Add(ref Stats.PrefetchFetchedBytes, b), timeout.Token).ConfigureAwait(false);
                Volatile.Write(ref Stats.PrefetchState, (int)FetchStageState.Done);
            }
            catch (Exception e) when (e is OperationCanceledException or LayerIOException)
            {
                Volatile.Write(ref Stats.PrefetchState, (int)FetchStageState.Failed);
                if (lifetime.IsCancellationRequested) return;
                Stats.RecordError(e is OperationCanceledException
                    ? $"prefetch did not finish within {_options.PrefetchTimeout.TotalSeconds:0.#} s"
                    : $"prefetch: {e.Message}");
            }
        }
        if (split >= _byBlobOffset.Length && Volatile.Read(ref Stats.PrefetchState) != (int)FetchStageState.Failed
            && await MarkAllFetchedAsync().ConfigureAwait(false))
            return;
        if (_options.NoBackgroundFetch) return;
        // Prefetch covered the whole layer but some of it did not reach the disk: the background pass covers it all.
        if (split >= _byBlobOffset.Length) split = 0;
        Interlocked.Exchange(ref Stats.BackgroundTotalBytes, _byBlobOffset[^1].BlobEnd - _byBlobOffset[split].BlobOffset);
        Volatile.Write(ref Stats.BackgroundState, (int)FetchStageState.Running);
        var next = new StrongBox<int>(split);
        var outages = 0;
        while (true)
        {
            try
            {
                await Fetcher.FetchAllAsync(_byBlobOffset, next, _byBlobOffset.Length, FetchPriority.Background, _options.BackgroundPause,
                    b => Interlocked.Add(ref Stats.BackgroundDoneBytes, b), lifetime).ConfigureAwait(false);
                // Every chunk has its file on disk; without a disk cache, prefetch may have given up on its part and
                // counts only when it finished.
                if (!Fetcher.HasDiskCache && split > 0 && Volatile.Read(ref Stats.PrefetchState) != (int)FetchStageState.Done)
                {
                    Volatile.Write(ref Stats.BackgroundState, (int)FetchStageState.Done);
                    return;
                }
                if (await MarkAllFetchedAsync().ConfigureAwait(false))
                {
                    Volatile.Write(ref Stats.BackgroundState, (int)FetchStageState.Done);
                    return;
                }
                // Some chunks never reached the disk (it was full): not fully fetched. Another pass from the first of
                // them (cached batches are skipped at once) a little later; the pass itself waits for room.
                await Task.Delay(CacheDiskHealth.FullRetryInterval, lifetime).ConfigureAwait(false);
                next.Value = Math.Max(0, Fetcher.FirstMissingOnDisk(_byBlobOffset));
                Interlocked.Exchange(ref Stats.BackgroundDoneBytes, 0);
                Interlocked.Exchange(ref Stats.BackgroundTotalBytes, _byBlobOffset[^1].BlobEnd - _byBlobOffset[next.Value].BlobOffset);
            }
            catch (OperationCanceledException)
            {
                Volatile.Write(ref Stats.BackgroundState, (int)FetchStageState.Failed);
                return;
            }
            catch (LayerIOException)
            {
                // The registry is away: try again later, from where it stopped.
                try { await Task.Delay(RegistryAwayBackoff.Delay(outages++), lifetime).ConfigureAwait(false); }
                catch (OperationCanceledException)
                {
                    Volatile.Write(ref Stats.BackgroundState, (int)FetchStageState.Failed);
                    return;
                }
            }
        }
    }

    /// <summary>
    /// Readers get a chunk before it is written to disk: the layer counts as fully fetched once those writes are done
    /// too and every chunk has its file (a full disk may have refused some), so every chunk is then verified on disk
    /// (Check, passthrough copies and restarts rely on it). False when one is missing.
    /// </summary>
    private async Task<bool> MarkAllFetchedAsync()
    {
        await Fetcher.DrainAsync().ConfigureAwait(false);
        var evictions = Fetcher.Budget.Evictions;
        if (Fetcher.FirstMissingOnDisk(_byBlobOffset) >= 0) return false;
        Volatile.Write(ref _checkedAtEvictions, evictions);
        Volatile.Write(ref _allFetched, 1);
        Fetcher.DropRegions(); // their chunks are on disk now: the files and fds go
        return true;
    }

    /// <summary>Stops prefetch and background fetch and fails reads still waiting; waits for disk writes in flight.</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 1) return;
        Fetcher.Dispose();
        try { await _work.ConfigureAwait(false); } catch (Exception) { /* recorded in stats */ }
        await Fetcher.DrainAsync().ConfigureAwait(false);
        FileSystem.CloseChunkFiles();
    }
}
