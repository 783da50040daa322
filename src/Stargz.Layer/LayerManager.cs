using System.Collections.Concurrent;
using System.Globalization;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Stargz.Estargz;
using Stargz.Fuse;
using Stargz.Layer.Erofs;
using Stargz.Registry;

namespace Stargz.Layer;

/// <summary>A mounted layer as the daemon reports it.</summary>
/// <param name="AllChunksFetched">every chunk fetched and verified: the layer no longer needs its registry.</param>
public sealed record MountedLayerInfo(string MountPoint, string Reference, string Digest, string TocDigest, LayerStatsSnapshot Stats, bool AllChunksFetched,
    long PassthroughOpens, long ReadRequests, bool Adopted = false, long WaitedRequests = 0)
{
    /// <summary>Served by the kernel from a checked EROFS image (the mountpoint is that image), no longer through FUSE.</summary>
    public bool Promoted { get; init; }

    /// <summary>The promoted layer's EROFS image file (null when not promoted).</summary>
    public string? ErofsImage { get; init; }

    /// <summary>Why the last promotion of this layer failed (null: none failed).</summary>
    public string? PromotionError { get; init; }
}

/// <summary>
/// The seam the snapshotter uses: mount a layer (described by snapshot labels) as a lazily fetched, verified,
/// read-only FUSE filesystem; check that it still works; unmount it. One <see cref="ChunkCache"/> and one fetch
/// gate (<c>max_concurrency</c>) serve every layer. Resolved TOCs are kept for <c>resolve_result_entry_ttl_sec</c>,
/// and the other layers named in the labels are resolved ahead so their mounts find the TOC ready.
/// </summary>
public sealed class LayerManager : IAsyncDisposable
{

    private readonly RegistryClient _registry;
    private readonly LayerOptions _options;
    private readonly FuseMountOptions _fuse;
    private readonly ILogger _log;
    private readonly FetchGate _gate;
    private readonly TocResolutions _resolutions;
    private readonly ConcurrentDictionary<string, LayerMount> _mounts = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, byte> _mounting = new(StringComparer.Ordinal);
    private readonly CancellationTokenSource _disposed = new();
    private readonly TocStore? _tocs;
    private readonly ErofsPromoter? _promoter;
    private readonly LayerPromotions? _promotions;

    public LayerManager(RegistryClient registry, LayerOptions options, FuseMountOptions? fuseOptions = null, ILogger? logger = null)
    {
        _registry = registry;
        options = options.Normalized();
        _options = options;
        _fuse = fuseOptions ?? new FuseMountOptions { AllowOther = true };
        _log = logger ?? NullLogger.Instance;
        _gate = new FetchGate(options.MaxConcurrency, options.BackgroundQuietPeriod);
        Cache = new ChunkCache(options.CacheDirectory, options.MemoryCacheBytes, options.DurableDiskWrites, options.EffectiveMemoryEntries);
        Cache.Disk.Logger = _log;
        Cache.Budget.Limit = options.MaxDiskBytes;
        // The background fetch checks for room before each batch: it may end up one batch over.
        Cache.Budget.BackgroundSlack = options.EffectivePrefetchChunkSize;
        // Beside the chunk cache (ROOT/stargz/cache -> ROOT/stargz/toc): TOCs are what a restart needs to mount offline.
        if (options.CacheDirectory != null)
        {
            _tocs = new TocStore(Path.Combine(Path.GetDirectoryName(Path.GetFullPath(options.CacheDirectory).TrimEnd('/'))!, "toc"));
            Cache.Budget.ScanTocs(_tocs.Directory);
            // Promoted layers' images: ROOT/stargz/erofs, counted in the budget like the TOCs.
            var erofsDir = Path.Combine(Path.GetDirectoryName(_tocs.Directory)!, "erofs");
            if (options.PromoteToErofs)
            {
                _promoter = new ErofsPromoter(erofsDir, Cache.Budget, _log);
                _promoter.ScanAtStart();
                _promotions = new LayerPromotions(_promoter, _mounts, _gate, _fuse, _log, _disposed.Token, DropChunks, RemoveAssembledFilesAsync);
                Cache.Budget.Images = _promotions;
            }
            else
            {
                // Promotion turned off: images of an earlier run would never be used, only take space.
                ErofsPromoter.DropAll(erofsDir, _log);
            }
        }
        _resolutions = new TocResolutions(registry, options, Cache, _tocs, _log, _disposed.Token);
        // With passthrough, bigger files get whole-file copies beside the chunks (CACHE/files) once all their chunks are in.
        if (_fuse.Passthrough && options.CacheDirectory != null && Cache.TmpDirectory != null)
            Files = new AssembledFiles(Path.Combine(options.CacheDirectory, "files"), Cache.TmpDirectory, options.DurableDiskWrites, _log, Cache.Disk,
                Cache.Budget);
    }

    /// <summary>Whole-file copies for passthrough; null when the mounts do not ask for passthrough or there is no disk cache.</summary>
    internal AssembledFiles? Files { get; }

    /// <summary>Whole-file copies built for passthrough by this process (0 without passthrough).</summary>
    public long AssembledFilesBuilt => Files?.Built ?? 0;

    /// <summary>The chunk cache shared by all layers.</summary>
    public ChunkCache Cache { get; }

    public LayerOptions Options => _options;

    /// <summary>Every mounted layer with its current statistics.</summary>
    public IReadOnlyList<MountedLayerInfo> Layers
    {
        get
        {
            Cache.Budget.FreeHeldImages();
            var list = new List<MountedLayerInfo>();
            foreach (var (mp, m) in _mounts)
                list.Add(new MountedLayerInfo(mp, m.Layer.Reference, m.Layer.Digest, m.Layer.TocDigest, m.Layer.Stats.Snapshot(),
                    m.Promoted || m.Layer.AllChunksFetched, m.Server?.PassthroughOpens ?? 0, m.Server?.ReadRequests ?? 0,
                    m.Server?.Adopted ?? false, m.Server?.WaitedRequests ?? 0)
                {
                    Promoted = m.Promoted,
                    ErofsImage = m.Promoted ? _promoter?.ImagePath(m.Layer.Digest) : null,
                    PromotionError = m.PromotionError,
                });
            return list;
        }
    }

    /// <summary>The FUSE server of the mount (tests and diagnostics), or null.</summary>
    /// <summary>The TOC resolution of a layer (started by a mount or ahead of one), or null if none is cached.</summary>
    internal Task? ResolutionOf(string reference, string digest) => _resolutions.ResolutionOf(reference, digest);

    internal FuseServer? ServerOf(string mountpoint) => _mounts.TryGetValue(Path.GetFullPath(mountpoint), out var m) ? m.Server : null;

    /// <summary>Promoted layers' images evicted by this process to make room (their layers went back to lazy FUSE).</summary>
    public long ImageEvictions => _promoter?.Evicted ?? 0;

    /// <summary>Layers promoted to EROFS by this process, promotions that failed, and bytes of the images built.</summary>
    public (long Promoted, long Failures, long Bytes) PromotionCounts => _promoter is { } p ? (p.Promoted, p.Failures, p.Bytes) : (0, 0, 0);

    /// <summary>Whether the layer at <paramref name="mountpoint"/> is served from its EROFS image.</summary>
    public bool IsPromoted(string mountpoint) => _mounts.TryGetValue(Path.GetFullPath(mountpoint), out var m) && m.Promoted;

    /// <summary>The layer mounted at <paramref name="mountpoint"/>, or null.</summary>
    public RemoteLayer? GetLayer(string mountpoint) => _mounts.TryGetValue(Path.GetFullPath(mountpoint), out var m) ? m.Layer : null;

    /// <summary>
    /// Resolves the layer the labels describe (footer + TOC, TOC digest checked) and mounts it at
    /// <paramref name="mountpoint"/>. Returns once the mount serves requests; prefetch and background fetch go on
    /// afterwards. Throws <see cref="LayerResolveException"/> (with the reason) when the layer cannot be served
    /// lazily, so the caller can fall back to a normal pull.
    /// </summary>
    public async Task MountAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        _gate.NotePriorityWork();
        try { await MountCoreAsync(mountpoint, labels, ct).ConfigureAwait(false); }
        finally { _gate.NotePriorityWork(); }
    }

    private async Task MountCoreAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        mountpoint = Path.GetFullPath(mountpoint);
        var source = LayerSource.FromLabels(labels);
        var reference = source.Reference
            ?? throw new LayerResolveException($"no image reference label ({SnapshotLabels.Reference} or {SnapshotLabels.CriImageRef})", reason: FallbackReasons.NoLabels);
        var digest = source.Digest
            ?? throw new LayerResolveException($"no layer digest label ({SnapshotLabels.Digest} or {SnapshotLabels.CriLayerDigest})", reason: FallbackReasons.NoLabels);
        var tocDigest = source.TocDigest;
        if (tocDigest == null && !_options.DisableVerification && !(_options.AllowNoVerification && source.SkipVerify))
            throw new LayerResolveException(
                $"layer {digest} has no TOC digest label ({SnapshotLabels.TocDigest}); refusing to mount it unverified " +
                (_options.AllowNoVerification
                    ? $"without the {SnapshotLabels.SkipVerify} label (rpull --skip-content-verify)"
                    : $"(needs allow_no_verification in the config and the {SnapshotLabels.SkipVerify} label: rpull --skip-content-verify)"), reason: FallbackReasons.NoTocDigest);
        if (tocDigest == null)
            _log.LogWarning("layer {Digest} of {Reference}: no TOC digest label; mounting it unverified ({Why})", digest, reference,
                _options.DisableVerification ? "disable_verification" : "allow_no_verification and " + SnapshotLabels.SkipVerify);
        var prefetchSize = source.PrefetchSize;
        ImageReference imageRef;
        try { imageRef = ImageReference.Parse(reference); }
        catch (Exception e) { throw new LayerResolveException($"bad image reference '{reference}': {e.Message}", e, FallbackReasons.NoLabels); }

        // The image's other layers are resolved at the same time as this one, not after it: containerd prepares them
        // one by one, and over a slow link each would otherwise start its own chain of round trips.
        _resolutions.ResolveAhead(imageRef, digest, source);
        var resolved = await _resolutions.ResolveAsync(imageRef, digest, source.Urls, ct).ConfigureAwait(false);
        if (tocDigest != null && !string.Equals(tocDigest, resolved.Toc.TocDigest, StringComparison.Ordinal))
            throw new LayerResolveException($"layer {digest}: TOC digest {resolved.Toc.TocDigest} does not match the label's {tocDigest}", reason: FallbackReasons.BadToc);

        // One mount per mountpoint at a time; mounts of different layers go in parallel.
        if (!_mounting.TryAdd(mountpoint, 0)) throw new InvalidOperationException($"{mountpoint} is being mounted already");
        try
        {
            if (_mounts.ContainsKey(mountpoint)) throw new InvalidOperationException($"{mountpoint} is already mounted");
            // A connection kept over a restart is adopted as it is (a stat of it would wait for this very server).
            if (_fuse.Connections?.Holds(mountpoint) != true && FuseServer.IsDeadMount(mountpoint)) FuseServer.CleanupDeadMount(mountpoint);
            var layer = new RemoteLayer(reference, digest, resolved.Toc, resolved.Blob, Cache, _gate, _options, Files);
            // A kept FUSE connection is adopted even when the layer was promoted since: containers still read through it.
            if (_fuse.Connections?.Holds(mountpoint) != true && _promotions?.TryMountPromoted(mountpoint, layer, resolved.Blob) is { } promoted)
            {
                AdoptDetached(mountpoint, promoted);
                return;
            }
            FuseServer server;
            try
            {
                // Not cancellable once started: a mount made after the caller gave up would leak.
                server = await Task.Run(() => FuseServer.Mount(mountpoint, layer.FileSystem, _fuse), CancellationToken.None).ConfigureAwait(false);
            }
            catch
            {
                await layer.DisposeAsync().ConfigureAwait(false);
                throw;
            }
            layer.FileSystem.PassthroughUsable = () => server.PassthroughUsable;
            var mounted = new LayerMount(layer, server, resolved.Blob);
            _mounts[mountpoint] = mounted;
            AdoptDetached(mountpoint, mounted);
            layer.StartBackgroundWork(prefetchSize);
            _promotions?.PromoteAfterBackgroundWork(mountpoint, mounted);
            if (server.Adopted)
                _log.LogInformation("adopted the kept FUSE connection of layer {Digest} of {Reference} at {MountPoint} ({Waited} requests had waited)",
                    digest, reference, mountpoint, server.WaitedRequests);
            else
                _log.LogInformation("mounted layer {Digest} of {Reference} at {MountPoint} (prefetch to {PrefetchEnd})",
                    digest, reference, mountpoint, layer.PrefetchEnd);
        }
        finally
        {
            _mounting.TryRemove(mountpoint, out _);
        }
    }

    /// <summary>
    /// Throws when the layer at <paramref name="mountpoint"/> is not mounted, its FUSE connection is gone, or
    /// its registry does not answer (the blob's connection is refreshed on the way).
    /// </summary>
    public async Task CheckAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        _gate.NotePriorityWork();
        mountpoint = Path.GetFullPath(mountpoint);
        if (!_mounts.TryGetValue(mountpoint, out var m)) throw new InvalidOperationException($"no layer is mounted at {mountpoint}");
        // A promoted layer is its checked image, mounted by the kernel: no registry, no FUSE server to ask.
        if (m.Promoted)
        {
            if (!FuseServer.IsMountPoint(mountpoint)) throw new IOException($"the EROFS mount of layer {m.Layer.Digest} at {mountpoint} is gone");
            return;
        }
        if (m.Server == null || m.Server.Completion.IsCompleted || FuseServer.IsDeadMount(mountpoint))
            throw new IOException($"the FUSE mount at {mountpoint} is gone");
        // Every chunk is verified on disk: the layer is served whatever the registry does.
        if (_options.CacheDirectory != null && m.Layer.AllChunksFetched) return;
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        timeout.CancelAfter(_options.FetchingTimeout);
        await m.Blob.CheckAsync(timeout.Token).ConfigureAwait(false);
    }

    /// <summary>Unmounts the layer at <paramref name="mountpoint"/>, stops its prefetch and background fetch.</summary>
    public async Task UnmountAsync(string mountpoint, CancellationToken ct)
    {
        mountpoint = Path.GetFullPath(mountpoint);
        if (!_mounts.TryRemove(mountpoint, out var m))
            throw new InvalidOperationException($"no layer is mounted at {mountpoint}");
        await StopAsync(m, mountpoint).WaitAsync(ct).ConfigureAwait(false);
        _log.LogInformation("unmounted layer {Digest} from {MountPoint}", m.Layer.Digest, mountpoint);
    }

    /// <summary>
    /// The layer's snapshot was removed: unmounts it as <see cref="UnmountAsync"/> does, then drops from the cache
    /// (memory and disk) every chunk of the layer that no other mounted layer uses. Chunks are shared by digest
    /// across layers and images, so a chunk another mounted layer has stays. Shutdown uses <see cref="UnmountAsync"/>,
    /// which keeps the cache for the next start. A layer still being mounted meanwhile that needs a dropped chunk
    /// fetches it again (only mounted layers are counted).
    /// </summary>
    public async Task ReleaseAsync(string mountpoint, CancellationToken ct)
    {
        mountpoint = Path.GetFullPath(mountpoint);
        if (!_mounts.TryRemove(mountpoint, out var m))
            throw new InvalidOperationException($"no layer is mounted at {mountpoint}");
        // Stopped first: the layer's fetches and disk writes are over before its chunks are dropped.
        await StopAsync(m, mountpoint).WaitAsync(ct).ConfigureAwait(false);
        var (files, total, kept) = DropChunks(m, "released");
        var assembled = await RemoveAssembledFilesAsync(m, ct).ConfigureAwait(false);
        var digestStillMounted = false;
        foreach (var (_, other) in _mounts) digestStillMounted |= other.Layer.Digest == m.Layer.Digest;
        if (!digestStillMounted) _promoter?.Drop(m.Layer.Digest);
        if (!digestStillMounted && _tocs != null)
        {
            try
            {
                _tocs.Delete(m.Layer.Digest);
                Cache.Budget.Removed(CacheFileKind.Toc, _tocs.PathFor(m.Layer.Digest));
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                _log.LogWarning("cannot remove the stored TOC of released layer {Digest}: {Error}", m.Layer.Digest, e.Message);
            }
        }
        _log.LogInformation("released layer {Digest} from {MountPoint}: {Files} cached chunk files and {Assembled} whole-file copies removed, {Shared} chunks kept for other layers",
            m.Layer.Digest, mountpoint, files, assembled, kept);
    }

    /// <summary>
    /// Deletes the cached chunks of <paramref name="m"/>'s layer that no other mounted layer still reads through FUSE
    /// (a promoted layer reads none). Returns (files removed, chunks of the layer, chunks kept for others).
    /// </summary>
    private (int Files, int Total, int Kept) DropChunks(LayerMount m, string why)
    {
        var keys = m.Layer.ChunkKeys();
        var total = keys.Count;
        foreach (var (_, other) in _mounts)
        {
            if (keys.Count == 0) break;
            if (other == m || other.Promoted) continue;
            foreach (var k in other.Layer.ChunkKeys()) keys.Remove(k);
        }
        var files = 0;
        foreach (var k in keys)
        {
            try { if (Cache.Remove(k)) files++; }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                _log.LogWarning("cannot remove cached chunk {Key} of {Why} layer {Digest}: {Error}", k, why, m.Layer.Digest, e.Message);
            }
        }
        return (files, total, total - keys.Count);
    }

    /// <summary>
    /// After a restart: the FUSE connections of this mountpoint's layer that an earlier process had detached when it promoted
    /// the layer (containers started before the promotion still read through them) are served again, from the image when
    /// the layer is promoted, else from the cache and the registry.
    /// </summary>
    private void AdoptDetached(string mountpoint, LayerMount m)
    {
        if (_fuse.Connections is not { } store) return;
        var tag = LayerPromotions.DetachedTag(m.Layer);
        foreach (var c in store.TakeDetached(mountpoint, t => t == tag))
        {
            try
            {
                var server = FuseServer.AdoptDetached(c, m.Layer.FileSystem, _fuse);
                lock (m) m.Earlier.Add(server);
                _log.LogInformation("adopted a detached FUSE connection of layer {Digest} at {MountPoint} (containers started before its promotion; {Waited} requests had waited)",
                    m.Layer.Digest, mountpoint, server.WaitedRequests);
            }
            catch (Exception e) when (e is IOException or InvalidOperationException)
            {
                _log.LogWarning("layer {Digest}: cannot adopt a detached FUSE connection of {MountPoint}: {Error}", m.Layer.Digest, mountpoint, e.Message);
            }
        }
    }

    /// <summary>
    /// What the layer at <paramref name="mountpoint"/> holds on disk: its chunks' files (shared ones too), its whole-file
    /// copies and its stored TOC, as (bytes, files); null when no layer is mounted there. From the budget's index, no I/O.
    /// </summary>
    public (long Bytes, long Files)? CachedUsage(string mountpoint)
    {
        if (!_mounts.TryGetValue(Path.GetFullPath(mountpoint), out var m)) return null;
        long bytes = 0, files = 0;
        foreach (var k in m.Layer.ChunkKeys())
        {
            var n = Cache.DiskBytesOf(k);
            if (n > 0) { bytes += n; files++; }
        }
        if (Files != null)
            foreach (var d in m.Layer.FileDigests())
            {
                var n = Cache.Budget.SizeOf(CacheFileKind.Copy, d);
                if (n > 0) { bytes += n; files++; }
            }
        if (_tocs != null)
        {
            var n = Cache.Budget.SizeOf(CacheFileKind.Toc, _tocs.PathFor(m.Layer.Digest));
            if (n > 0) { bytes += n; files++; }
        }
        if (_promoter != null)
        {
            var n = Cache.Budget.SizeOf(CacheFileKind.Image, m.Layer.Digest);
            if (n > 0) { bytes += n; files++; }
        }
        return (bytes, files);
    }

    /// <summary>
    /// At start, before anything is mounted: drops the stored TOCs of layers no remote snapshot refers to any more and
    /// the chunks and whole-file copies that only such layers used (a snapshot removed while its layer was not mounted, or
    /// a crash between remove and free). The chunks to keep are read from the live layers' stored TOCs; if one of them has
    /// none, its chunks are unknown and only TOCs are dropped. Returns the files deleted.
    /// </summary>
    public int SweepOrphans(IReadOnlyCollection<string> liveLayerDigests)
    {
        if (_tocs == null || !Directory.Exists(_tocs.Directory)) return 0;
        var live = new HashSet<string>(liveLayerDigests, StringComparer.Ordinal);
        var dead = new List<string>();
        foreach (var f in Directory.EnumerateFiles(_tocs.Directory, "*.toc"))
        {
            var name = Path.GetFileNameWithoutExtension(f);
            var dash = name.IndexOf('-');
            var digest = dash > 0 ? name[..dash] + ":" + name[(dash + 1)..] : name;
            if (!live.Contains(digest)) dead.Add(digest);
        }
        // EROFS images of layers no snapshot refers to any more.
        var images = 0;
        if (_promoter != null)
            foreach (var d in _promoter.ImageDigests().ToList())
                if (!live.Contains(d))
                {
                    _promoter.Drop(d);
                    images++;
                }
        // Chunks come only from layers whose TOC was stored; none of a layer no snapshot refers to: nothing to sweep.
        if (dead.Count == 0) return images;
        var keepChunks = new HashSet<string>(StringComparer.Ordinal);
        var keepCopies = new HashSet<string>(StringComparer.Ordinal);
        var complete = true;
        foreach (var d in live)
        {
            var stored = _tocs.TryLoad(d, out var problem);
            if (problem != null) _log.LogWarning("{Problem}", problem);
            if (stored is not { } st) { complete = false; continue; }
            foreach (var node in st.Toc.Reader.Tree.Nodes)
            {
                if (!node.IsRegular) continue;
                foreach (var c in node.Chunks) if (c.Digest != null) keepChunks.Add(c.Digest);
                if (node.Chunks.Count > 1 && node.Entry.Digest is { } fd) keepCopies.Add(fd);
            }
        }
        var removed = 0;
        if (complete)
        {
            foreach (var k in Cache.Budget.ChunkKeys.ToList())
                if (Digests.IsSha256(k) && !keepChunks.Contains(k) && Cache.Remove(k)) removed++;
            if (Files != null)
            {
                var orphans = Cache.Budget.CopyDigests.Where(d => !keepCopies.Contains(d)).ToList();
                if (orphans.Count > 0) removed += Files.RemoveAsync(orphans, CancellationToken.None).GetAwaiter().GetResult();
            }
        }
        else
        {
            _log.LogWarning("start-up sweep: a remote snapshot's layer has no stored TOC, so its chunks are unknown; only stored TOCs of removed layers are dropped");
        }
        foreach (var d in dead)
        {
            try
            {
                _tocs.Delete(d);
                Cache.Budget.Removed(CacheFileKind.Toc, _tocs.PathFor(d));
                removed++;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                _log.LogWarning("start-up sweep: cannot remove the stored TOC of removed layer {Digest}: {Error}", d, e.Message);
            }
        }
        _log.LogInformation("start-up sweep: {Removed} cache files and {Images} EROFS images of {Layers} layers no snapshot refers to were removed",
            removed, images, dead.Count);
        return removed + images;
    }

    /// <summary>Deletes the whole-file copies of the released layer's files that no mounted layer has.</summary>
    private async Task<int> RemoveAssembledFilesAsync(LayerMount released, CancellationToken ct)
    {
        if (Files == null) return 0;
        var digests = released.Layer.FileDigests();
        foreach (var (_, other) in _mounts)
        {
            if (digests.Count == 0) break;
            foreach (var d in other.Layer.FileDigests()) digests.Remove(d);
        }
        return digests.Count == 0 ? 0 : await Files.RemoveAsync(digests, ct).ConfigureAwait(false);
    }

    private async Task StopAsync(LayerMount m, string mountpoint)
    {
        await m.Layer.DisposeAsync().ConfigureAwait(false); // fails waiting reads first, so unmount is not busy on them
        if (!m.Promoted)
        {
            await Task.Run(() => m.Server!.Unmount()).ConfigureAwait(false);
            return;
        }
        // The image's bind at the mountpoint, then one user less of its kernel mount. A FUSE connection still kept by an
        // overlay made before the promotion was detached already; it ends with that overlay (or this process).
        try { ErofsNative.Detach(mountpoint); }
        catch (IOException e) { _log.LogWarning("cannot unmount the EROFS image of layer {Digest} at {MountPoint}: {Error}", m.Layer.Digest, mountpoint, e.Message); }
        _promoter?.Release(m.Layer.Digest, drop: false);
    }

    /// <summary>
    /// Set before <see cref="DisposeAsync"/> when the mounts' connections are kept for the next process: they are left
    /// mounted and served until this process exits (a request it has read but not answered then is sent again to
    /// the next one), and their layers are not stopped (stopping would fail reads waiting on them).
    /// </summary>
    public bool HandingOver { get; set; }

    public async ValueTask DisposeAsync()
    {
        if (_disposed.IsCancellationRequested) return;
        _disposed.Cancel();
        if (HandingOver)
        {
            _log.LogInformation("handing {Count} mounted layers over to the next daemon", _mounts.Count);
            return;
        }
        // PromoteWhenFetchedAsync never throws; cancelled, it removes what it had built.
        if (_promotions != null) await _promotions.WhenIdleAsync().ConfigureAwait(false);
        foreach (var mp in _mounts.Keys)
            if (_mounts.TryRemove(mp, out var m))
                await StopAsync(m, mp).ConfigureAwait(false);
        _promoter?.Dispose();
        _gate.Dispose();
        Files?.Dispose();
        Cache.Dispose();
        _disposed.Dispose();
    }
}
