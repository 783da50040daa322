using Microsoft.Extensions.Logging;
using Prometheus;
using Stargz.Fuse;
using Stargz.Fuse.Handover;
using Stargz.Layer;
using Stargz.Registry;
using Stargz.Snapshotter;

namespace Stargz.Daemon;

/// <summary>
/// Where the lazy layer (src/Stargz.Layer) is adapted to the snapshotter's one seam, <see cref="IRemoteFileSystem"/>,
/// and the daemon's config is mapped onto the registry client, the layer and FUSE options.
/// </summary>
public static class RemoteLayerWiring
{
    /// <param name="root">the daemon's --root (the layer keeps its chunk cache below it, as the reference does).</param>
    /// <returns>the remote filesystem; the daemon disposes it after the snapshotter has closed.</returns>
    /// <param name="criKeychain">credentials from CRI PullImage ([cri_keychain]), asked before the docker config; null when off.</param>
    /// <param name="kubeKeychain">credentials from the cluster's image pull secrets ([kubeconfig_keychain]), asked after
    /// the docker config; null when off.</param>
    /// <summary>How long an uncached read waits for the registry to send something before it fails with EIO.</summary>
    public static long ReadTimeoutSec(DaemonConfig.BlobConfig b)
    {
        var fetching = b.FetchingTimeoutSec > 0 ? b.FetchingTimeoutSec : 300;
        return b.OutageTimeoutSec > 0 ? Math.Min(fetching, b.OutageTimeoutSec) : fetching;
    }

    /// <summary>[erofs] promote, or (not set) whether this machine can: erofs in the kernel and mkfs.erofs on the PATH.</summary>
    public static bool PromoteToErofs(DaemonConfig.ErofsConfig e, ILogger log)
    {
        var kernel = Stargz.Layer.Erofs.ErofsPromoter.KernelSupportsErofs();
        var mkfs = Stargz.Layer.Erofs.ErofsPromoter.MkfsAvailable();
        if (e.Promote == false) return false;
        if (kernel && mkfs) return true;
        var why = !kernel ? "the kernel has no erofs (/proc/filesystems)" : "mkfs.erofs (erofs-utils) is not installed";
        if (e.Promote == true) log.LogWarning("[erofs] promote = true, but {Why}: fully fetched layers stay on FUSE", why);
        else log.LogInformation("fully fetched layers are not promoted to EROFS: {Why}", why);
        return false;
    }


    /// <param name="connections">the fd store that keeps FUSE connections over a restart (systemd or supervise); null: none.</param>
    public static IRemoteFileSystem? Create(DaemonConfig config, string root, ILoggerFactory loggers, ILogger log, CriKeychain? criKeychain = null,
        KubeconfigKeychain? kubeKeychain = null, FuseConnectionStore? connections = null)
    {
        var hosts = new RegistryHostsConfig
        {
            Blob = new BlobOptions
            {
                FetchingTimeout = TimeSpan.FromSeconds(config.Blob.FetchingTimeoutSec),
                MaxRetries = (int)config.Blob.MaxRetries,
                MinWait = TimeSpan.FromMilliseconds(config.Blob.MinWaitMsec),
                MaxWait = TimeSpan.FromMilliseconds(config.Blob.MaxWaitMsec),
                ForceSingleRangeMode = config.Blob.ForceSingleRangeMode,
                StallTimeout = TimeSpan.FromSeconds(config.Blob.StallTimeoutSec),
                OutageTimeout = TimeSpan.FromSeconds(config.Blob.OutageTimeoutSec),
            },
        };
        foreach (var (host, mirrors) in config.ResolverHosts)
        {
            var endpoints = new List<EndpointConfig>(mirrors.Count);
            foreach (var m in mirrors)
                endpoints.Add(new EndpointConfig
                {
                    Host = m.Host,
                    PlainHttp = m.Insecure ? true : null,
                    RequestTimeout = m.RequestTimeoutSec > 0 ? TimeSpan.FromSeconds(m.RequestTimeoutSec) : null,
                });
            hosts.Set(host, new HostConfig { Mirrors = endpoints });
        }
        // [registry] config_path: containerd's hosts.toml directories; a host configured there is configured by it
        // alone (as the reference's plugin does), the first directory holding the host winning.
        var dirs = config.Registry.ConfigPaths;
        for (var i = dirs.Count - 1; i >= 0; i--)
        {
            if (!Directory.Exists(dirs[i])) continue;
            hosts.LoadHostsDirectory(dirs[i]);
            log.LogInformation("registry hosts from {Dir}", dirs[i]);
        }
        // Registry credentials: those kubelet sent with the image's CRI PullImage when the CRI keychain is on, then the
        // docker config of the user running the daemon, then the cluster's image pull secrets when the kubeconfig
        // keychain is on (after the docker config, as in the reference).
        // docker's config may name credential helpers (credsStore, credHelpers); they are run as docker runs them.
        var dockerConfig = new DockerConfigCredentialProvider(helpers: new CredentialHelpers(logger: loggers.CreateLogger("stargz.registry")));
        var chain = new List<ICredentialProvider>(3);
        if (criKeychain is not null) chain.Add(criKeychain);
        chain.Add(dockerConfig);
        if (kubeKeychain is not null) chain.Add(kubeKeychain);
        ICredentialProvider credentials = chain.Count == 1 ? dockerConfig : new ChainedCredentialProvider([.. chain]);
        var registry = new RegistryClient(hosts, credentials, loggers.CreateLogger("stargz.registry"));
        var options = new LayerOptions
        {
            CacheDirectory = Path.Combine(root, "stargz", "cache"),
            NoPrefetch = config.NoPrefetch,
            NoBackgroundFetch = config.NoBackgroundFetch,
            PrefetchSize = config.PrefetchSize,
            PrefetchTimeout = TimeSpan.FromSeconds(config.PrefetchTimeoutSec),
            AllowNoVerification = config.AllowNoVerification,
            DisableVerification = config.DisableVerification,
            MaxConcurrency = (int)Math.Max(1, config.MaxConcurrency),
            // A read fails once the registry has sent nothing for the shorter of the two (a moving transfer is never cut).
            FetchingTimeout = TimeSpan.FromSeconds(ReadTimeoutSec(config.Blob)),
            PrefetchChunkSize = config.Blob.PrefetchChunkSize,
            OnDemandWindowBytes = config.Blob.ChunkSize,
            // Misses walking forward through a blob double the window up to this; scattered misses bring such a region.
            OnDemandWindowMaxBytes = 1L << 20,
            // A miss in a file brings the rest of it up to this (a JRE's libjvm.so is ~8 MB compressed).
            OnDemandFileBytes = 16L << 20,
            // The reference's background task manager waits 5 s after its last mount, check or prefetch.
            BackgroundQuietPeriod = TimeSpan.FromSeconds(5),
            ResolveResultEntryTtl = TimeSpan.FromSeconds(config.ResolveResultEntryTtlSec),
            MaxCacheFds = (int)Math.Clamp(config.DirectoryCache.MaxCacheFds, 0, 4096),
            MemoryCacheEntries = (int)Math.Clamp(config.DirectoryCache.MaxLruCacheEntry, 0, 1 << 20),
            MemoryCacheBytes = config.DirectoryCache.MaxLruCacheBytes,
            DirectDiskReads = config.DirectoryCache.Direct,
            SyncAdd = config.DirectoryCache.SyncAdd,
            MaxDiskBytes = config.DirectoryCache.MaxDiskMb > 0 ? config.DirectoryCache.MaxDiskMb << 20 : 0,
            PromoteToErofs = PromoteToErofs(config.Erofs, log),
        };
        var fuse = new FuseMountOptions
        {
            // containerd and runc read the layer as other users too (the reference mounts with allow_other).
            AllowOther = true,
            AttrTimeout = TimeSpan.FromSeconds(config.Fuse.AttrTimeout),
            EntryTimeout = TimeSpan.FromSeconds(config.Fuse.EntryTimeout),
            Passthrough = config.Fuse.Passthrough,
            // One reader thread per core (2 to 4): replies are asynchronous, so more threads only add a /dev/fuse fd,
            // a splice pipe and ~170 KiB of buffers per layer (2 vs 4 threads for 16 readers: no difference measured).
            ReaderThreads = Math.Clamp(Environment.ProcessorCount, 2, 4),
            Connections = connections,
        };
        var manager = new LayerManager(registry, options, fuse, loggers.CreateLogger("stargz.layer"));
        LayerMetrics.Track(manager, registry);
        log.LogInformation("lazy layers on: chunk cache {Cache}, max_concurrency {MaxConcurrency}, prefetch {Prefetch}, background fetch {Background}, passthrough {Passthrough}, EROFS promotion {Erofs}",
            options.CacheDirectory, options.MaxConcurrency, options.NoPrefetch ? "off" : "on", options.NoBackgroundFetch ? "off" : "on",
            fuse.Passthrough ? "on" : "off", options.PromoteToErofs ? "on" : "off");
        if (connections != null)
            log.LogInformation("FUSE connections are kept in the fd store of {Manager}: running containers survive a restart ({Adoptable} kept connections to adopt)",
                connections.ManagerSocket, connections.HeldMountPoints().Count);
        LayerMetrics.TrackHandover(connections);
        return new LazyLayerFileSystem(manager, registry, connections) { CriKeychain = criKeychain };
    }
}

/// <summary>The seam implemented by the layer manager: layer errors become "cannot be served remotely".</summary>
public sealed class LazyLayerFileSystem(LayerManager manager, RegistryClient registry, FuseConnectionStore? connections = null)
    : IRemoteFileSystem, IRemoteCacheSweeper, IRemoteUsage, IRemoteHandover, IAsyncDisposable
{
    public LayerManager Manager => manager;

    public bool Holds(string mountpoint) => connections?.Holds(mountpoint) == true;

    public int EndUnclaimed()
    {
        if (connections == null) return 0;
        int n = connections.CloseUnclaimed();
        LayerMetrics.RestoreDone();
        return n;
    }

    /// <summary>Set on SIGTERM when an fd store keeps the connections: shutdown leaves the layers mounted for the next daemon.</summary>
    public bool HandingOver
    {
        get => connections != null && manager.HandingOver;
        set => manager.HandingOver = value && connections != null;
    }

    /// <summary>The CRI keychain, whose credentials of images without a remote snapshot are dropped by the start-up sweep.</summary>
    public CriKeychain? CriKeychain { get; init; }

    public Task SweepAsync(IReadOnlyList<IReadOnlyDictionary<string, string>> remoteSnapshotLabels, CancellationToken ct)
    {
        var live = new List<string>(remoteSnapshotLabels.Count);
        foreach (var l in remoteSnapshotLabels)
        {
            if (l.TryGetValue(Stargz.Estargz.SnapshotLabels.Digest, out var d) || l.TryGetValue(Stargz.Estargz.SnapshotLabels.CriLayerDigest, out d)) live.Add(d.Trim());
        }
        manager.SweepOrphans(live);
        if (CriKeychain is { } keychain)
        {
            // Persisted credentials of images removed while the daemon was down (or not through CRI) go too.
            var images = new List<string>(remoteSnapshotLabels.Count);
            foreach (var l in remoteSnapshotLabels)
            {
                if (l.TryGetValue(Stargz.Estargz.SnapshotLabels.CriImageRef, out var r)) images.Add(r.Trim());
                if (l.TryGetValue(Stargz.Estargz.SnapshotLabels.Reference, out r)) images.Add(r.Trim());
            }
            keychain.Retain(images);
        }
        return Task.CompletedTask;
    }

    public (long Bytes, long Inodes)? Usage(string mountpoint) => manager.CachedUsage(mountpoint);

    public async Task MountAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        try
        {
            await manager.MountAsync(mountpoint, labels, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
        {
            // Not eStargz, no TOC digest, registry down, FUSE refused: the snapshotter falls back and logs this.
            throw new RemoteLayerUnavailableException(e.Message, e, e is LayerResolveException lr ? lr.Reason : FallbackReasons.MountFailed);
        }
    }

    public async Task CheckAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        try
        {
            await manager.CheckAsync(mountpoint, labels, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
        {
            throw new RemoteLayerUnavailableException($"layer at {mountpoint} cannot be served: {e.Message}", e);
        }
    }

    public Task UnmountAsync(string mountpoint, CancellationToken ct) => manager.UnmountAsync(mountpoint, ct);

    public async Task ReleaseAsync(string mountpoint, CancellationToken ct)
    {
        try
        {
            await manager.ReleaseAsync(mountpoint, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
        {
            throw new RemoteLayerUnavailableException($"layer at {mountpoint} cannot be released: {e.Message}", e);
        }
    }

    public async ValueTask DisposeAsync()
    {
        await manager.DisposeAsync().ConfigureAwait(false);
        if (HandingOver) return; // the process ends now; in-flight fetches must not fail the reads they serve
        registry.Dispose();
        connections?.Dispose();
    }
}

/// <summary>Prometheus gauges of the lazy layers, refreshed on each scrape.</summary>
public static class LayerMetrics
{
    private static readonly Gauge Mounted = Prometheus.Metrics.CreateGauge(
        "stargz_layers_mounted", "Remote layers mounted through FUSE.");
    private static readonly Gauge FetchedBytes = Prometheus.Metrics.CreateGauge(
        "stargz_layer_fetched_bytes", "Compressed bytes fetched from registries by the mounted layers.");
    private static readonly Gauge BlobBytes = Prometheus.Metrics.CreateGauge(
        "stargz_layer_blob_bytes", "Total size of the mounted layers' blobs.");
    private static readonly Gauge CacheHits = Prometheus.Metrics.CreateGauge(
        "stargz_layer_cache_hits", "Chunk cache hits of the mounted layers.");
    private static readonly Gauge CacheMisses = Prometheus.Metrics.CreateGauge(
        "stargz_layer_cache_misses", "Chunk cache misses of the mounted layers.");
    private static readonly Gauge Errors = Prometheus.Metrics.CreateGauge(
        "stargz_layer_errors", "Fetch/verify errors of the mounted layers.");
    private static readonly Gauge BackgroundDone = Prometheus.Metrics.CreateGauge(
        "stargz_layer_background_fetched_bytes", "Bytes the background fetch has brought in.");
    private static readonly Gauge BackgroundTotal = Prometheus.Metrics.CreateGauge(
        "stargz_layer_background_total_bytes", "Bytes the background fetch has to bring in.");
    private static readonly Gauge FullyFetched = Prometheus.Metrics.CreateGauge(
        "stargz_layers_fully_fetched", "Mounted layers with every chunk fetched and verified (served without the registry).");
    private static readonly Gauge PassthroughOpens = Prometheus.Metrics.CreateGauge(
        "stargz_layer_passthrough_opens", "Opens of the mounted layers' files answered with a kernel backing file (reads skip the daemon).");
    private static readonly Gauge ReadRequests = Prometheus.Metrics.CreateGauge(
        "stargz_layer_fuse_read_requests", "FUSE READ requests that reached the daemon (passthrough reads and page-cache hits never do).");
    private static readonly Gauge AssembledFiles = Prometheus.Metrics.CreateGauge(
        "stargz_assembled_files_built", "Whole-file copies built from verified chunks for passthrough since the daemon started.");

    private static readonly Gauge RegistryStalls = Prometheus.Metrics.CreateGauge(
        "stargz_registry_stalls", "Registry requests abandoned after receiving nothing for [blob] stall_timeout_sec (retried on a fresh connection or the next mirror).");
    private static readonly Gauge RegistryRetries = Prometheus.Metrics.CreateGauge(
        "stargz_registry_retries", "Registry requests tried again after a failure (5xx, refused, reset, stalled).");

    private static readonly Gauge DiskWriteErrors = Prometheus.Metrics.CreateGauge(
        "stargz_cache_disk_write_errors", "Writes to the cache disk (chunks, TOCs, whole-file copies) that failed (full, EIO); reads were served regardless.");
    private static readonly Gauge DiskNoSpace = Prometheus.Metrics.CreateGauge(
        "stargz_cache_disk_no_space_errors", "Of the failed cache disk writes, those for want of space (ENOSPC, EDQUOT).");
    private static readonly Gauge DiskReadErrors = Prometheus.Metrics.CreateGauge(
        "stargz_cache_disk_read_errors", "Reads of cached files that failed (EIO); the data was fetched again.");
    private static readonly Gauge CacheBytes = Prometheus.Metrics.CreateGauge(
        "stargz_cache_disk_bytes", "Bytes the disk cache holds (chunks, TOCs, whole-file copies).");
    private static readonly Gauge CacheLimit = Prometheus.Metrics.CreateGauge(
        "stargz_cache_disk_limit_bytes", "[directory_cache] max_disk_mb in bytes (0: unbounded).");
    private static readonly Gauge CacheEvictions = Prometheus.Metrics.CreateGauge(
        "stargz_cache_evictions", "Cache files evicted to stay within max_disk_mb.");
    private static readonly Gauge CacheEvictedBytes = Prometheus.Metrics.CreateGauge(
        "stargz_cache_evicted_bytes", "Bytes evicted to stay within max_disk_mb.");
    private static readonly Gauge CacheRefetches = Prometheus.Metrics.CreateGauge(
        "stargz_cache_refetched_chunks", "Chunks fetched again (and verified) after their file had been evicted.");
    private static readonly Gauge DiskFull = Prometheus.Metrics.CreateGauge(
        "stargz_cache_disk_full", "1 while the cache disk is full (the last write failed for want of space and none has worked since).");

    private static readonly Gauge AdoptedMounts = Prometheus.Metrics.CreateGauge(
        "stargz_fuse_adopted_mounts", "Mounted layers whose FUSE connection this daemon took over from the previous one (kept in the fd store over a restart).");
    private static readonly Gauge WaitedRequests = Prometheus.Metrics.CreateGauge(
        "stargz_fuse_waited_requests", "FUSE requests of adopted mounts that waited for this daemon (queued while none served, or sent again after the previous one died).");
    private static readonly Gauge RestoreSeconds = Prometheus.Metrics.CreateGauge(
        "stargz_restore_seconds", "Seconds from this daemon's start until every remote snapshot was restored and kept connections adopted (0 until then).");
    private static readonly Gauge KeptConnections = Prometheus.Metrics.CreateGauge(
        "stargz_fuse_kept_connections_pending", "FUSE connections passed back by the fd store at start and not adopted yet.");

    /// <summary>Restore has finished: the time since the process started.</summary>
    public static void RestoreDone() =>
        RestoreSeconds.Set((DateTime.Now - System.Diagnostics.Process.GetCurrentProcess().StartTime).TotalSeconds);

    public static void TrackHandover(FuseConnectionStore? connections)
    {
        if (connections != null)
            Prometheus.Metrics.DefaultRegistry.AddBeforeCollectCallback(() => KeptConnections.Set(connections.Unclaimed));
    }
    private static readonly Gauge PromotedLayers = Prometheus.Metrics.CreateGauge(
        "stargz_layers_promoted", "Mounted layers served by the kernel from their EROFS image instead of FUSE.");
    private static readonly Gauge Promotions = Prometheus.Metrics.CreateGauge(
        "stargz_erofs_promotions", "Layers promoted to EROFS (image built and checked against the TOC) since the daemon started.");
    private static readonly Gauge PromotionFailures = Prometheus.Metrics.CreateGauge(
        "stargz_erofs_promotion_failures", "Promotions to EROFS that failed (build, mount or check against the TOC); those layers stay on FUSE.");
    private static readonly Gauge PromotionBytes = Prometheus.Metrics.CreateGauge(
        "stargz_erofs_promoted_bytes", "Bytes of the EROFS images built since the daemon started.");
    private static readonly Gauge ImageEvictions = Prometheus.Metrics.CreateGauge(
        "stargz_erofs_image_evictions", "EROFS images evicted to stay within max_disk_mb since the daemon started (their layers went back to lazy FUSE).");

    public static void Track(LayerManager manager, RegistryClient registry) =>
        Prometheus.Metrics.DefaultRegistry.AddBeforeCollectCallback(() =>
        {
            var disk = manager.Cache.Disk;
            var budget = manager.Cache.Budget;
            CacheBytes.Set(budget.Used);
            CacheLimit.Set(budget.Limit);
            CacheEvictions.Set(budget.Evictions);
            CacheEvictedBytes.Set(budget.EvictedBytes);
            CacheRefetches.Set(manager.Cache.Refetches);
            DiskWriteErrors.Set(disk.WriteErrors);
            DiskNoSpace.Set(disk.NoSpaceErrors);
            DiskReadErrors.Set(disk.ReadErrors);
            DiskFull.Set(disk.IsFull ? 1 : 0);
            RegistryStalls.Set(registry.StallCount);
            RegistryRetries.Set(registry.RetryCount);
            long fetched = 0, blob = 0, hits = 0, misses = 0, errors = 0, bgDone = 0, bgTotal = 0, complete = 0, passthrough = 0, reads = 0, promoted = 0, adopted = 0, waited = 0;
            var layers = manager.Layers;
            foreach (var l in layers)
            {
                fetched += l.Stats.FetchedBytes;
                blob += l.Stats.BlobSize;
                hits += l.Stats.CacheHits;
                misses += l.Stats.CacheMisses;
                errors += l.Stats.Errors;
                bgDone += l.Stats.BackgroundDoneBytes;
                bgTotal += l.Stats.BackgroundTotalBytes;
                if (l.AllChunksFetched) complete++;
                if (l.Promoted) promoted++;
                passthrough += l.PassthroughOpens;
                reads += l.ReadRequests;
                if (l.Adopted) adopted++;
                waited += l.WaitedRequests;
            }
            AdoptedMounts.Set(adopted);
            WaitedRequests.Set(waited);
            Mounted.Set(layers.Count);
            FetchedBytes.Set(fetched);
            BlobBytes.Set(blob);
            CacheHits.Set(hits);
            CacheMisses.Set(misses);
            Errors.Set(errors);
            BackgroundDone.Set(bgDone);
            BackgroundTotal.Set(bgTotal);
            FullyFetched.Set(complete);
            PassthroughOpens.Set(passthrough);
            ReadRequests.Set(reads);
            AssembledFiles.Set(manager.AssembledFilesBuilt);
            var (promotions, failures, bytes) = manager.PromotionCounts;
            PromotedLayers.Set(promoted);
            Promotions.Set(promotions);
            PromotionFailures.Set(failures);
            PromotionBytes.Set(bytes);
            ImageEvictions.Set(manager.ImageEvictions);
        });
}
