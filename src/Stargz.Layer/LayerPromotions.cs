using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;
using Stargz.Fuse;
using Stargz.Layer.Erofs;

namespace Stargz.Layer;

/// <summary>
/// The EROFS side of the mounted layers: a layer whose background fetch brought in every chunk is promoted (image built,
/// checked, recorded), its mounts switched to the image and its chunks dropped; mounts of a promoted layer bind the
/// image; and when the disk budget needs the room (<see cref="IImageEviction"/>), an image is evicted and its mounts go
/// back to lazy FUSE. Works on <see cref="LayerManager"/>'s table of mounts; the manager mounts, checks and releases.
/// </summary>
/// <param name="dropChunks">deletes the chunk files a layer no longer needs (the manager's, shared with release)</param>
/// <param name="removeCopies">deletes a layer's whole-file copies</param>
internal sealed class LayerPromotions(ErofsPromoter promoter, ConcurrentDictionary<string, LayerMount> mounts, FetchGate gate,
    FuseMountOptions fuse, ILogger log, CancellationToken lifetime, Func<LayerMount, string, (int Files, int Total, int Kept)> dropChunks,
    Func<LayerMount, CancellationToken, Task<int>> removeCopies) : IImageEviction
{
    private readonly ErofsPromoter _promoter = promoter;
    private readonly ConcurrentDictionary<string, LayerMount> _mounts = mounts;
    private readonly FetchGate _gate = gate;
    private readonly FuseMountOptions _fuse = fuse;
    private readonly ILogger _log = log;
    private readonly CancellationToken _lifetime = lifetime;
    private readonly Func<LayerMount, string, (int Files, int Total, int Kept)> _dropChunks = dropChunks;
    private readonly Func<LayerMount, CancellationToken, Task<int>> _removeCopies = removeCopies;
    // Promotions in flight: disposal waits for them (cancelled) before it unmounts their images.
    private readonly ConcurrentDictionary<Task, byte> _promotions = new();

    /// <summary>Waits for the promotions in flight (after the lifetime is cancelled: they remove what they had built).</summary>
    public Task WhenIdleAsync() => Task.WhenAll(_promotions.Keys);

    public bool FreeHeld() => _promoter.FreeHeld();

    /// <summary>Promotes the layer once its background fetch has brought in everything (see <see cref="PromoteWhenFetchedAsync"/>).</summary>
    public void PromoteAfterBackgroundWork(string mountpoint, LayerMount mounted)
    {
        var promotion = mounted.Layer.BackgroundWork.ContinueWith(_ => PromoteWhenFetchedAsync(mountpoint, mounted), CancellationToken.None,
            TaskContinuationOptions.None, TaskScheduler.Default).Unwrap();
        _promotions[promotion] = 0;
        _ = promotion.ContinueWith(t => _promotions.TryRemove(t, out _), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously,
            TaskScheduler.Default);
    }

    /// <summary>
    /// A layer with a checked EROFS image for this TOC (promoted earlier, by this or a previous run) is mounted from it:
    /// the image's one kernel mount is bound at <paramref name="mountpoint"/>. No FUSE, no registry, no background fetch.
    /// Null when there is no usable image (the layer is then mounted through FUSE).
    /// </summary>
    public LayerMount? TryMountPromoted(string mountpoint, RemoteLayer layer, RemoteBlobFetcher blob)
    {
        if (_promoter.Lookup(layer.Digest, layer.TocDigest) == null) return null;
        string dir;
        try { dir = _promoter.Acquire(layer.Digest); }
        catch (IOException e)
        {
            _log.LogWarning("layer {Digest}: its EROFS image cannot be mounted ({Error}); dropped, the layer is served through FUSE", layer.Digest, e.Message);
            _promoter.Drop(layer.Digest);
            return null;
        }
        try
        {
            Directory.CreateDirectory(mountpoint);
            ErofsNative.Bind(dir, mountpoint);
        }
        catch (IOException e)
        {
            _promoter.Release(layer.Digest, drop: false);
            _log.LogWarning("layer {Digest}: cannot bind its EROFS image at {MountPoint} ({Error}); served through FUSE", layer.Digest, mountpoint, e.Message);
            return null;
        }
        layer.FileSystem.PromotedRoot = dir;
        var mounted = new LayerMount(layer, null, blob) { Promoted = true };
        _mounts[mountpoint] = mounted;
        _log.LogInformation("mounted layer {Digest} of {Reference} at {MountPoint} from its EROFS image {Image}",
            layer.Digest, layer.Reference, mountpoint, _promoter.ImagePath(layer.Digest));
        return mounted;
    }

    /// <summary>
    /// After the background fetch: once every chunk is verified on disk, the layer is promoted (image built from this
    /// FUSE mount, checked, recorded), every FUSE mount of the layer is switched to the image, and the chunks the image
    /// replaces are dropped. Never throws (a failure leaves the layer on FUSE).
    /// </summary>
    private async Task PromoteWhenFetchedAsync(string mountpoint, LayerMount m)
    {
        try
        {
            if (_lifetime.IsCancellationRequested || !m.Layer.AllChunksFetched) return;
            if (!_mounts.TryGetValue(mountpoint, out var cur) || cur != m || m.Promoted) return;
            // Let the mount-time burst of other layers' fetches and the container's start settle first.
            await _gate.WaitQuietAsync(_lifetime).ConfigureAwait(false);
            var dir = await _promoter.PromoteAsync(m.Layer.Digest, m.Layer.TocDigest, mountpoint, m.Layer.FileSystem, m.Layer.FileSystem.TotalBytes,
                !m.Evicted, _lifetime).ConfigureAwait(false);
            if (dir == null)
            {
                m.PromotionError = "promotion failed (see the daemon log)";
                return;
            }
            var first = true;
            foreach (var (mp, other) in _mounts)
            {
                if (other.Promoted || other.Layer.Digest != m.Layer.Digest || other.Layer.TocDigest != m.Layer.TocDigest) continue;
                if (!first) _promoter.Acquire(m.Layer.Digest);
                if (SwitchToImage(mp, other, dir)) first = false;
                else if (!first) _promoter.Release(m.Layer.Digest, drop: false);
            }
            if (first) _promoter.Release(m.Layer.Digest, drop: false); // every mount went away meanwhile
            var (files, _, kept) = _dropChunks(m, "promoted");
            var assembled = await _removeCopies(m, _lifetime).ConfigureAwait(false);
            _log.LogInformation("layer {Digest}: {Files} chunk files and {Assembled} whole-file copies dropped after promotion ({Kept} kept for other layers)",
                m.Layer.Digest, files, assembled, kept);
        }
        catch (OperationCanceledException) when (_lifetime.IsCancellationRequested) { }
        catch (Exception e)
        {
            m.PromotionError = e.Message;
            _log.LogError(e, "layer {Digest}: promotion to EROFS failed", m.Layer.Digest);
        }
    }

    /// <summary>
    /// Puts the image beneath the FUSE mount at <paramref name="mountpoint"/> and detaches the FUSE mount: new lookups
    /// (new overlays' lowerdirs) find the image, overlays made before keep their FUSE connection until they go.
    /// </summary>
    private bool SwitchToImage(string mountpoint, LayerMount m, string dir)
    {
        lock (m)
        {
            if (m.Promoted || !_mounts.TryGetValue(mountpoint, out var cur) || cur != m) return false;
            m.Layer.FileSystem.PromotedRoot = dir;
            // The FUSE connection stays in the fd store under the layer's tag: a restart adopts it for the overlays made before.
            var tag = DetachedTag(m.Layer);
            try
            {
                ErofsNative.MountBeneath(dir, mountpoint);
                m.Server?.DetachKeepingConnection(tag);
            }
            catch (IOException e)
            {
                // An old kernel (< 6.5) or a mount propagation it refuses: detach then bind (a moment without the layer).
                _log.LogInformation("layer {Digest}: cannot mount the image beneath {MountPoint} ({Error}); detaching FUSE first", m.Layer.Digest, mountpoint, e.Message);
                m.Server?.DetachKeepingConnection(tag);
                ErofsNative.Bind(dir, mountpoint);
            }
            m.Promoted = true;
            _log.LogInformation("layer {Digest} at {MountPoint} switched to its EROFS image; its FUSE mount stays only for overlays made before",
                m.Layer.Digest, mountpoint);
            return true;
        }
    }

    /// <summary>What a detached FUSE connection of the layer is kept under in the fd store: its digest and TOC digest.</summary>
    internal static string DetachedTag(RemoteLayer layer) => layer.Digest + " " + layer.TocDigest;

    /// <summary>
    /// Evicts the layer's EROFS image (the disk budget needs its room): the promotion record goes first (new mounts and a
    /// restart no longer use it), every mount of the layer goes back to lazy FUSE (<see cref="SwitchToFuse"/>), and the
    /// image is deleted — or, while containers started on it still read it (their overlays hold the kernel's mount and
    /// so the file), kept and counted until they end. False (record put back) when a mount could not be switched.
    /// </summary>
    public bool Evict(string digest)
    {
        if (_lifetime.IsCancellationRequested) return false;
        var record = _promoter.Unrecord(digest);
        var switched = true;
        foreach (var (mp, m) in _mounts)
            if (m.Layer.Digest == digest && m.Promoted && !SwitchToFuse(mp, m)) switched = false;
        if (!switched || _promoter.InUse(digest))
        {
            // A mount kept the image (or a promotion of the layer is just binding it): it stays promoted.
            if (record != null) _promoter.Rerecord(digest, record);
            _log.LogWarning("layer {Digest}: its EROFS image could not be evicted (a mount of it could not be switched back to FUSE)", digest);
            return false;
        }
        _promoter.FreeOrHold(digest);
        return true;
    }

    /// <summary>
    /// Puts a new FUSE mount of the layer beneath the image's bind at <paramref name="mountpoint"/> and detaches the bind:
    /// new lookups (new containers' overlays) find the lazy FUSE mount, served from the cache and the registry with every
    /// chunk verified; overlays made before keep the image they hold. The background fetch starts again and the layer is
    /// promoted anew once it is complete (when the budget has room for the image).
    /// </summary>
    private bool SwitchToFuse(string mountpoint, LayerMount m)
    {
        var staging = Path.Combine(_promoter.Directory, "mnt", m.Layer.Digest.Replace(':', '-') + ".fuse");
        lock (m)
        {
            if (!m.Promoted || !_mounts.TryGetValue(mountpoint, out var cur) || cur != m) return true;
            var promotedRoot = m.Layer.FileSystem.PromotedRoot;
            // Chunks again (they were dropped at promotion): for the new mount and for connections detached before it.
            m.Layer.FileSystem.PromotedRoot = null;
            m.Layer.ChunksDropped();
            FuseServer? server = null;
            try
            {
                Directory.CreateDirectory(staging);
                ErofsNative.Detach(staging); // left by a crash
                server = FuseServer.Mount(staging, m.Layer.FileSystem, _fuse);
                try
                {
                    ErofsNative.MountBeneath(staging, mountpoint);
                    ErofsNative.Detach(staging); // the clone beneath the bind holds the connection
                    server.MovedTo(mountpoint);
                    ErofsNative.Detach(mountpoint); // the image's bind: the FUSE mount beneath it shows
                }
                catch (IOException e)
                {
                    // An old kernel (< 6.5): detach the image, then bind the FUSE mount (a moment without the layer).
                    _log.LogInformation("layer {Digest}: cannot mount FUSE beneath {MountPoint} ({Error}); detaching the image first",
                        m.Layer.Digest, mountpoint, e.Message);
                    ErofsNative.Detach(mountpoint);
                    ErofsNative.Bind(staging, mountpoint);
                    ErofsNative.Detach(staging);
                    server.MovedTo(mountpoint);
                }
            }
            catch (Exception e) when (e is IOException or TimeoutException or InvalidOperationException)
            {
                _log.LogError("layer {Digest}: cannot serve {MountPoint} through FUSE again ({Error}); it stays on its EROFS image",
                    m.Layer.Digest, mountpoint, e.Message);
                server?.Unmount();
                m.Layer.FileSystem.PromotedRoot = promotedRoot;
                return false;
            }
            finally
            {
                try { Directory.Delete(staging); } catch (IOException) { }
            }
            var fuse = server;
            m.Layer.FileSystem.PassthroughUsable = () => fuse.PassthroughUsable;
            if (m.Server != null) m.Earlier.Add(m.Server);
            m.Server = server;
            m.Promoted = false;
            m.Evicted = true;
        }
        _promoter.Release(m.Layer.Digest, drop: false);
        _log.LogInformation("layer {Digest} at {MountPoint}: EROFS image evicted, served lazily through FUSE again", m.Layer.Digest, mountpoint);
        m.Layer.RestartBackgroundWork();
        PromoteAfterBackgroundWork(mountpoint, m);
        return true;
    }
}
