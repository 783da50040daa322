namespace Stargz.Layer;

/// <summary>
/// Settings of the lazy layer. Property names follow the reference daemon's config.toml keys (in comments) so the
/// daemon maps its config onto this type one to one. Zero means "the reference default" (see <see cref="Normalized"/>).
/// </summary>
public sealed record LayerOptions
{
    /// <summary>Where chunks are cached on disk (the daemon's root + "/stargz/chunks"); null = memory only.</summary>
    public string? CacheDirectory { get; init; }

    /// <summary>Upper bound of decompressed chunk bytes kept in memory; 0 or unset = the default for where chunks live.
    /// Small with a disk cache (<see cref="DefaultMemoryCacheBytes"/>): the kernel's page cache keeps what containers
    /// read and the disk cache has every fetched chunk, so the memory cache only bridges a fetch and the READs right
    /// after it. Without one (<see cref="MemoryOnlyCacheBytes"/>) it is the only cache.</summary>
    public long MemoryCacheBytes
    {
        get => _memoryCacheBytes > 0 ? _memoryCacheBytes : CacheDirectory != null ? DefaultMemoryCacheBytes : MemoryOnlyCacheBytes;
        init => _memoryCacheBytes = value;
    }

    private readonly long _memoryCacheBytes;

    /// <summary><c>[directory_cache] max_lru_cache_entry</c>: upper bound of chunks kept in memory (reference default 10).</summary>
    public int MemoryCacheEntries { get; init; } = DefaultMemoryCacheEntries;

    /// <summary><c>[directory_cache] direct</c> (the daemon's default is the reference's, true): chunks read back from the
    /// disk cache are not kept in memory; only freshly fetched ones are, for the READs that follow them.</summary>
    public bool DirectDiskReads { get; init; }

    /// <summary><c>[directory_cache] sync_add</c>: a fetched chunk is written to the disk cache before the reads waiting
    /// for it are answered (default: answered first, written right after).</summary>
    public bool SyncAdd { get; init; }

    /// <summary>The entry bound in force: none without a disk cache, where memory is the only cache (tests, benchmarks).</summary>
    internal int EffectiveMemoryEntries => CacheDirectory != null ? MemoryCacheEntries : 0;

    /// <summary>
    /// The memory cache's size with a disk cache: one 4 MiB chunk (the reference's chunk size); a READ after a chunk
    /// left memory reads it back from the disk cache. Measured against 16 MiB (5 interleaved runs): peak RSS during
    /// pull and run 52 vs 56 MiB on the python image (time and CPU within the spread, the same bytes fetched), 71 vs
    /// 77 MiB on the large image through the WAN forwarder, for 1.02x the time there and one on-demand window that
    /// ended 400 KiB later.
    /// </summary>
    public const long DefaultMemoryCacheBytes = 4L << 20;

    /// <summary>The memory cache's size without a disk cache (tests, benchmarks of the layer alone).</summary>
    public const long MemoryOnlyCacheBytes = 16L << 20;
    public const int DefaultMemoryCacheEntries = 10;

    /// <summary>
    /// <c>[erofs] promote</c>: a layer whose every chunk is fetched and verified is turned into a kernel EROFS image
    /// (checked against the TOC), and mounts of it from then on use the image instead of FUSE. Needs a disk cache.
    /// </summary>
    public bool PromoteToErofs { get; init; }

    /// <summary><c>noprefetch</c>.</summary>
    public bool NoPrefetch { get; init; }

    /// <summary><c>no_background_fetch</c>.</summary>
    public bool NoBackgroundFetch { get; init; }

    /// <summary><c>prefetch_size</c>: bytes of the blob prefetched when the layer has no landmark (0 = none).</summary>
    public long PrefetchSize { get; init; }

    /// <summary><c>prefetch_timeout_sec</c> (reference default 10).</summary>
    public TimeSpan PrefetchTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary><c>allow_no_verification</c>: mount layers whose TOC digest is not in the labels.</summary>
    public bool AllowNoVerification { get; init; }

    /// <summary><c>disable_verification</c>: do not check chunk digests (operator's explicit choice).</summary>
    public bool DisableVerification { get; init; }

    /// <summary><c>max_concurrency</c>: registry fetches in flight at once, all layers together (reference default 2).</summary>
    public int MaxConcurrency { get; init; } = 2;

    /// <summary>
    /// An uncached read fails with EIO once its layer's blob has received nothing from the registry for this long
    /// (the daemon: the shorter of <c>[blob] fetching_timeout_sec</c> and <c>outage_timeout_sec</c>); a slow transfer
    /// that keeps moving is never cut. Also bounds TOC fetches and Check.
    /// </summary>
    public TimeSpan FetchingTimeout { get; init; } = TimeSpan.FromSeconds(300);

    /// <summary><c>[blob] prefetch_chunk_size</c>: bytes per range request of prefetch and background fetch (0 = 4 MiB).</summary>
    public long PrefetchChunkSize { get; init; }

    /// <summary>
    /// <c>[blob] chunk_size</c> (the daemon's default is the reference's 50,000): an on-demand read that misses also
    /// fetches, in the same range, the uncached chunks that lie wholly inside the blob window of this many bytes
    /// (aligned to it) around each chunk it asked for, as the reference fetches whole aligned windows. Small files
    /// stored next to each other (a language runtime's library) then cost one round trip per window, not one each.
    /// 0 here: only the chunks asked for.
    /// </summary>
    public long OnDemandWindowBytes { get; init; }

    /// <summary>
    /// Bound of the on-demand window while misses walk forward through the blob (each doubles it, from
    /// <see cref="OnDemandWindowBytes"/>), and, with a disk cache, the size of the aligned regions that the second
    /// scattered miss in one brings whole and keeps compressed; 0 or less than the window: neither.
    /// </summary>
    public long OnDemandWindowMaxBytes { get; init; }

    /// <summary>
    /// An on-demand miss in a file of several chunks also brings the file's other uncached chunks when they span at most
    /// this many blob bytes and the disk cache has room for them (without a disk cache, with 0, or with
    /// <see cref="NoBackgroundFetch"/>: never): those after the chunks asked for in the same range, then those before.
    /// A runtime that maps a big library or archive faults through its chunks in no order, one round trip each; the
    /// rest of the file then streams while it works, and a fault on a chunk still coming waits only until that chunk
    /// is in. (The background fetch would bring these bytes a few seconds later; without it only what is read is
    /// fetched.)
    /// </summary>
    public long OnDemandFileBytes { get; init; }

    /// <summary>
    /// <c>[directory_cache] max_disk_mb</c> in bytes (0: unbounded): the disk cache (chunks, TOCs, whole-file copies)
    /// stays within it, plus one background batch (see <see cref="DiskBudget"/>).
    /// </summary>
    public long MaxDiskBytes { get; init; }

    /// <summary>Missing chunks closer than this in the blob are fetched in one range (the gap bytes are discarded).</summary>
    public long MergeGapBytes { get; init; } = 32 << 10;

    /// <summary>
    /// Background fetch starts (and resumes) only once mounts, checks and prefetch of all layers have been quiet this
    /// long; the daemon uses the reference's 5 s, so containers that are starting do not share their cores with it.
    /// Zero: it waits only while on-demand fetches are waiting or running.
    /// </summary>
    public TimeSpan BackgroundQuietPeriod { get; init; }

    /// <summary>Pause between two background-fetch batches, so on-demand reads always find the network free.</summary>
    public TimeSpan BackgroundPause { get; init; } = TimeSpan.FromMilliseconds(50);

    /// <summary>Use <c>user.overlay.opaque</c> (overlay mounted with userxattr) instead of <c>trusted.overlay.opaque</c>.</summary>
    public bool UserXattrOpaque { get; init; }

    /// <summary>Write each chunk to disk with fsync + rename + dir fsync (crash safe). Off only for throwaway caches.</summary>
    public bool DurableDiskWrites { get; init; } = true;

    /// <summary>
    /// <c>[directory_cache] max_cache_fds</c> (reference default 10): descriptors of verified chunk files each layer
    /// keeps open to splice reads from.
    /// </summary>
    public int MaxCacheFds { get; init; } = DefaultMaxCacheFds;
    public const int DefaultMaxCacheFds = 10;

    /// <summary>
    /// Reads inside one verified chunk on disk are spliced from the chunk file (default). Off: every read of a file
    /// bigger than one chunk is copied through the memory cache (benchmarks compare the two).
    /// </summary>
    public bool SpliceFromChunkFiles { get; init; } = true;

    /// <summary><c>resolve_result_entry_ttl_sec</c> (reference default 120): how long a fetched TOC is reused.</summary>
    public TimeSpan ResolveResultEntryTtl { get; init; } = TimeSpan.FromSeconds(120);

    /// <summary>
    /// A copy where zero or negative values (an unset config key) become the reference defaults: fetching timeout
    /// 300 s, prefetch timeout 10 s, resolve TTL 120 s, max_concurrency 2, memory cache 10 chunks / 4 MiB (16 MiB without a disk cache), max_cache_fds 10.
    /// </summary>
    public LayerOptions Normalized() => this with
    {
        FetchingTimeout = FetchingTimeout > TimeSpan.Zero ? FetchingTimeout : TimeSpan.FromSeconds(300),
        PrefetchTimeout = PrefetchTimeout > TimeSpan.Zero ? PrefetchTimeout : TimeSpan.FromSeconds(10),
        ResolveResultEntryTtl = ResolveResultEntryTtl > TimeSpan.Zero ? ResolveResultEntryTtl : TimeSpan.FromSeconds(120),
        MaxConcurrency = MaxConcurrency > 0 ? MaxConcurrency : 2,
        MaxCacheFds = MaxCacheFds > 0 ? MaxCacheFds : DefaultMaxCacheFds,
        MemoryCacheEntries = MemoryCacheEntries > 0 ? MemoryCacheEntries : DefaultMemoryCacheEntries,
        PrefetchSize = Math.Max(0, PrefetchSize),
        MergeGapBytes = Math.Max(0, MergeGapBytes),
        OnDemandWindowBytes = Math.Max(0, OnDemandWindowBytes),
        OnDemandFileBytes = Math.Max(0, OnDemandFileBytes),
        BackgroundPause = BackgroundPause > TimeSpan.Zero ? BackgroundPause : TimeSpan.Zero,
        BackgroundQuietPeriod = BackgroundQuietPeriod > TimeSpan.Zero ? BackgroundQuietPeriod : TimeSpan.Zero,
    };

    internal long EffectivePrefetchChunkSize => PrefetchChunkSize > 0 ? PrefetchChunkSize : 4L << 20;
}
