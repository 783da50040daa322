namespace Stargz.Layer;

/// <summary>What the daemon reports about one mounted layer. Counters only grow; read them with <see cref="Snapshot"/>.</summary>
public sealed class LayerStats
{
    internal long BlobSize;
    internal long FetchedBytes;        // compressed bytes received from the registry (all priorities)
    internal long RangeRequests;       // ranges asked of the registry (a multi-range request counts each range)
    internal long FetchCalls;
    // FetchedBytes split by who asked (the fetch's priority; a chunk is counted once, by the fetch that brought it).
    internal long OnDemandFetchedBytes;
    internal long PrefetchRegistryBytes;
    internal long BackgroundRegistryBytes;          // calls to the blob (one HTTP request each when multi-range works)
    internal long ChunksFetched;
    internal long CacheHits;
    internal long CacheMisses;
    internal long Errors;
    internal long PrefetchTotalBytes;
    internal long PrefetchFetchedBytes;
    internal int PrefetchState;        // 0 not started/none, 1 running, 2 done, 3 failed
    internal long BackgroundTotalBytes;
    internal long BackgroundDoneBytes;
    internal int BackgroundState;      // 0 not started/off, 1 running, 2 done, 3 stopped/failed
    private string? _lastError;

    public string? LastError => Volatile.Read(ref _lastError);

    internal void RecordError(string message)
    {
        Interlocked.Increment(ref Errors);
        Volatile.Write(ref _lastError, message);
    }

    public LayerStatsSnapshot Snapshot() => new(
        Interlocked.Read(ref BlobSize),
        Interlocked.Read(ref FetchedBytes),
        Interlocked.Read(ref RangeRequests),
        Interlocked.Read(ref FetchCalls),
        Interlocked.Read(ref ChunksFetched),
        Interlocked.Read(ref CacheHits),
        Interlocked.Read(ref CacheMisses),
        Interlocked.Read(ref Errors),
        (FetchStageState)Volatile.Read(ref PrefetchState),
        Interlocked.Read(ref PrefetchTotalBytes),
        Interlocked.Read(ref PrefetchFetchedBytes),
        (FetchStageState)Volatile.Read(ref BackgroundState),
        Interlocked.Read(ref BackgroundTotalBytes),
        Interlocked.Read(ref BackgroundDoneBytes),
        LastError,
        Interlocked.Read(ref OnDemandFetchedBytes),
        Interlocked.Read(ref PrefetchRegistryBytes),
        Interlocked.Read(ref BackgroundRegistryBytes));

    internal void AddFetched(FetchPriority priority, long bytes)
    {
        Interlocked.Add(ref FetchedBytes, bytes);
        switch (priority)
        {
            case FetchPriority.OnDemand: Interlocked.Add(ref OnDemandFetchedBytes, bytes); break;
            case FetchPriority.Prefetch: Interlocked.Add(ref PrefetchRegistryBytes, bytes); break;
            default: Interlocked.Add(ref BackgroundRegistryBytes, bytes); break;
        }
    }
}

public enum FetchStageState
{
    None = 0,
    Running = 1,
    Done = 2,
    Failed = 3,
}

/// <param name="BlobSize">the layer blob's size (bytes total).</param>
/// <param name="FetchedBytes">compressed bytes fetched from the registry.</param>
/// <param name="RangeRequests">ranges requested from the registry.</param>
/// <param name="FetchCalls">blob requests (a multi-range request is one).</param>
/// <param name="OnDemandFetchedBytes">of <paramref name="FetchedBytes"/>, those fetched for a reader waiting in the kernel.</param>
/// <param name="PrefetchFetchedFromRegistry">of <paramref name="FetchedBytes"/>, those fetched by the mount-time prefetch.</param>
/// <param name="BackgroundFetchedFromRegistry">of <paramref name="FetchedBytes"/>, those fetched by the background fetch.</param>
public readonly record struct LayerStatsSnapshot(
    long BlobSize,
    long FetchedBytes,
    long RangeRequests,
    long FetchCalls,
    long ChunksFetched,
    long CacheHits,
    long CacheMisses,
    long Errors,
    FetchStageState Prefetch,
    long PrefetchTotalBytes,
    long PrefetchFetchedBytes,
    FetchStageState Background,
    long BackgroundTotalBytes,
    long BackgroundDoneBytes,
    string? LastError,
    long OnDemandFetchedBytes = 0,
    long PrefetchFetchedFromRegistry = 0,
    long BackgroundFetchedFromRegistry = 0);
