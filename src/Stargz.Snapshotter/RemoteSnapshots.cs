using System.Collections.Concurrent;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Stargz.Estargz;

namespace Stargz.Snapshotter;

/// <summary>
/// The remote-snapshot lifecycle beside the overlay semantics of <see cref="StargzSnapshotter"/>: a Prepare carrying
/// <c>containerd.io/snapshot.ref</c> mounts its layer through <see cref="IRemoteFileSystem"/> and commits it under the
/// ref; at start remote snapshots are mounted again (kept mounts adopted through <see cref="IRemoteHandover"/>); a
/// chain holding remote snapshots is checked before use; a removed remote snapshot releases its layer. Owns the state
/// of that: which layers are unrestored, being mounted or removed, last checked, unavailable; recent fallbacks.
/// Metadata work goes through the snapshotter's store gate (<see cref="StargzSnapshotter.WithStoreAsync"/>).
/// </summary>
public sealed class RemoteSnapshots
{
    private readonly StargzSnapshotter _sn;
    private readonly MetaStore _store;
    private readonly SnapshotterOptions _opt;
    private readonly ILogger _log;
    private readonly KeyedLock _targetLocks = new();
    private readonly KeyedLock _restoreLocks = new();
    private readonly CancellationTokenSource _restoreStop = new();
    private Task _restoring = Task.CompletedTask;
    // A remote snapshot's layer being mounted again after start / being removed: the two exclude each other.
    private readonly ConcurrentDictionary<long, byte> _mounting = new();
    private readonly ConcurrentDictionary<long, byte> _removing = new();
    private readonly ConcurrentDictionary<long, DateTime> _lastChecked = new();
    private readonly ConcurrentDictionary<long, string> _unrestored = new();
    // For status: first-time remote mounts in progress, when a layer was first seen unavailable, recent fallbacks.
    private readonly ConcurrentDictionary<long, (string Namespace, string Key, IReadOnlyDictionary<string, string> Labels)> _remoteMounting = new();
    private readonly ConcurrentDictionary<long, (DateTime Since, string Error)> _unavailable = new();
    private readonly Queue<FallbackRecord> _fallbacks = new();
    private readonly DateTime _started = DateTime.UtcNow;
    private int _remoteCount;
    private int _disposed;

    internal RemoteSnapshots(StargzSnapshotter sn, MetaStore store, SnapshotterOptions opt, ILogger log)
    {
        _sn = sn;
        _store = store;
        _opt = opt;
        _log = log;
    }

    /// <summary>How many fallbacks <see cref="RecentFallbacks"/> keeps.</summary>
    public const int RecentFallbackLimit = 256;

    /// <summary>Raised once per layer that falls back to an ordinary snapshot (after it is logged).</summary>
    public event Action<FallbackRecord>? FallbackOccurred;

    /// <summary>A remote filesystem is configured: Prepares with a ref label may mount remotely.</summary>
    public bool Enabled => _opt.RemoteFileSystem != null;

    /// <summary>(remote snapshots in the store, of which not mounted) — for the daemon's gauges.</summary>
    public (int Remote, int Unrestored) RemoteSnapshotCounts()
    {
        if (Volatile.Read(ref _disposed) != 0) return (0, 0);
        return (Volatile.Read(ref _remoteCount), _unrestored.Count);
    }

    /// <summary>Remote snapshots that could not be re-mounted at start (id -> why); Check retries them.</summary>
    public IReadOnlyDictionary<long, string> UnrestoredRemoteSnapshots => _unrestored;

    private string FsDir(long id) => _sn.FsDir(id);

    // ---------------------------------------------------------------- restore

    /// <summary>At start (after interrupted removes are recovered): stale mounts, cache sweep, layers mounted again.</summary>
    internal async Task RestoreAsync(string snapshotsDir, CancellationToken ct)
    {
        var handover = _opt.RemoteFileSystem as IRemoteHandover;
        foreach (var mp in Native.MountsUnder(snapshotsDir))
        {
            if (handover?.Holds(mp) == true)
            {
                _log.LogInformation("keeping mount {Mountpoint}: its FUSE connection was kept over the restart and is adopted", mp);
                continue;
            }
            try
            {
                Native.Unmount(mp, detach: true);
                _log.LogInformation("unmounted stale mount {Mountpoint} left by a previous run", mp);
            }
            catch (IOException e)
            {
                _log.LogWarning("cannot unmount stale mount {Mountpoint}: {Error}", mp, e.Message);
            }
        }
        var remotes = await _sn.WithStoreAsync(() => _store.All().Where(r => r.IsRemote).ToList(), ct);
        Volatile.Write(ref _remoteCount, remotes.Count);
        if (_opt.RemoteFileSystem is IRemoteCacheSweeper sweeper)
        {
            // Before any mount or call: nothing is being written into the cache yet.
            try { await sweeper.SweepAsync(remotes.Select(r => (IReadOnlyDictionary<string, string>)r.Labels).ToList(), ct); }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                _log.LogWarning("sweeping the remote layer cache at start failed: {Error}", e.Message);
            }
        }
        if (remotes.Count == 0)
        {
            EndUnclaimed(handover);
            return;
        }
        if (_opt.RemoteFileSystem == null)
        {
            foreach (var r in remotes)
            {
                _unrestored[r.Id] = "no remote filesystem is configured in this daemon";
                _log.LogError("remote snapshot {Key} (namespace {Namespace}, layer {Digest}) cannot be restored: no remote filesystem is configured",
                    KeyText.Short(r.Key), r.Namespace, LayerDigest(r.Labels));
            }
            return;
        }
        // Every remote snapshot counts as unrestored until its layer is mounted again, so that Check mounts it on
        // demand if asked first. The start waits a bounded time: a registry that does not answer must not keep the
        // daemon from serving (ordinary snapshots need no registry).
        foreach (var r in remotes) _unrestored[r.Id] = "being restored after start";
        _restoring = Task.Run(() => RestoreRemotesAsync(remotes, _restoreStop.Token), CancellationToken.None);
        if (await Task.WhenAny(_restoring, Task.Delay(_opt.RestoreWaitAtStart, ct)) != _restoring)
            _log.LogWarning("remote snapshots still being restored after {Wait}: serving now, the rest are restored in the background",
                _opt.RestoreWaitAtStart);
    }

    private async Task RestoreRemotesAsync(List<SnapshotRecord> remotes, CancellationToken ct)
    {
        int ok = 0;
        foreach (var r in remotes)
        {
            try
            {
                await RestoreRemoteAsync(r, ct);
                ok++;
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested) { return; }
            catch (Exception e)
            {
                // Only while still unrestored: a Remove that went through meanwhile dropped the entry for good.
                if (_unrestored.TryGetValue(r.Id, out var was) && _unrestored.TryUpdate(r.Id, e.Message, was)) MarkUnavailable(r.Id, e.Message);
                _log.LogError("remote snapshot {Key} (namespace {Namespace}, layer {Digest}) could not be restored: {Error}",
                    KeyText.Short(r.Key), r.Namespace, LayerDigest(r.Labels), KeyText.Bound(e.Message, r.Key));
            }
        }
        _log.LogInformation("restored {Restored} of {Total} remote snapshots", ok, remotes.Count);
        EndUnclaimed(_opt.RemoteFileSystem as IRemoteHandover);
    }

    private void EndUnclaimed(IRemoteHandover? handover)
    {
        if (handover == null) return;
        int n = handover.EndUnclaimed();
        if (n > 0) _log.LogInformation("ended {Count} kept mounts whose snapshots were removed while the daemon was down", n);
    }

    /// <summary>Mounts an unrestored remote snapshot's layer again (one at a time per snapshot; no-op once mounted).</summary>
    private async Task RestoreRemoteAsync(SnapshotRecord r, CancellationToken ct)
    {
        using var held = await _restoreLocks.AcquireAsync(r.Id.ToString(System.Globalization.CultureInfo.InvariantCulture), ct);
        if (!_unrestored.ContainsKey(r.Id)) return;
        _mounting[r.Id] = 0;
        Interlocked.MemoryBarrier();
        try
        {
            // Being removed, or removed meanwhile (Remove renames the dir away first): nothing to mount.
            if (_removing.ContainsKey(r.Id)) throw new IOException($"snapshot {r.Key} is being removed");
            if (!Directory.Exists(_sn.SnapshotDir(r.Id))) throw new IOException($"snapshot dir of {r.Key} is gone");
            // A kept mount is not touched before it is adopted: a stat of it would wait for the server being restored.
            if (_opt.RemoteFileSystem is not IRemoteHandover h || !h.Holds(FsDir(r.Id))) Directory.CreateDirectory(FsDir(r.Id));
            await _opt.RemoteFileSystem!.MountAsync(FsDir(r.Id), r.Labels, ct);
            _lastChecked[r.Id] = DateTime.UtcNow;
            _unrestored.TryRemove(r.Id, out _);
            _unavailable.TryRemove(r.Id, out _);
        }
        finally { _mounting.TryRemove(r.Id, out _); }
    }

    // ---------------------------------------------------------------- prepare

    /// <summary>Single flight per chainID: the first caller mounts and commits; the rest wait and see AlreadyExists.</summary>
    internal Task<IDisposable> LockTargetAsync(string ns, string target, CancellationToken ct)
        => _targetLocks.AcquireAsync(ns + "\u0000" + target, ct);

    /// <summary>Mounts the layer remotely and commits it under <paramref name="target"/>; false means fall back.</summary>
    internal async Task<bool> TryMountAsync(SnapshotRecord rec, string target, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        var fs = FsDir(rec.Id);
        var sw = Stopwatch.StartNew();
        _remoteMounting[rec.Id] = (rec.Namespace, rec.Key, labels);
        try
        {
            await _opt.RemoteFileSystem!.MountAsync(fs, labels, ct);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            var reason = (e as RemoteLayerUnavailableException)?.Reason ?? "other";
            _log.LogInformation("layer {Digest} for {Target} (key {Key}) is not served remotely, falling back to an ordinary snapshot ({FallbackReason}): {Reason}",
                LayerDigest(labels), KeyText.Short(target), KeyText.Short(rec.Key), reason, KeyText.Bound(e.Message, target, rec.Key));
            var source = LayerSource.FromLabels(labels);
            RecordFallback(new FallbackRecord(DateTime.UtcNow, rec.Namespace, target, rec.Key, source.Reference ?? "", source.Digest ?? "", reason, e.Message));
            return false;
        }
        finally { _remoteMounting.TryRemove(rec.Id, out _); }
        try
        {
            var commitLabels = new Dictionary<string, string>(labels, StringComparer.Ordinal) { [SnapshotLabels.RemoteSnapshot] = SnapshotLabels.RemoteSnapshotValue };
            await _sn.WithStoreAsync(() =>
            {
                var cur = _store.Get(rec.Namespace, rec.Key) ?? throw SnapshotterException.NotFound($"active snapshot {rec.Key} vanished");
                if (_store.Get(rec.Namespace, target) != null) throw SnapshotterException.AlreadyExists($"target snapshot {target} already exists");
                cur.Key = target;
                cur.Kind = SnapshotKind.Committed;
                cur.Labels = commitLabels;
                cur.Created = cur.Updated = DateTime.UtcNow;
                _store.Update(cur);
                return 0;
            }, CancellationToken.None);
        }
        catch
        {
            try { await _opt.RemoteFileSystem!.UnmountAsync(fs, CancellationToken.None); }
            catch (Exception ue) when (ue is not OperationCanceledException)
            {
                _log.LogWarning("cannot unmount remote layer at {Mountpoint} after a failed commit of {Target}: {Error}", fs, KeyText.Short(target), ue.Message);
            }
            throw;
        }
        _lastChecked[rec.Id] = DateTime.UtcNow;
        Interlocked.Increment(ref _remoteCount);
        _log.LogInformation("remote snapshot {Target} (layer {Digest}) mounted in {Ms} ms", KeyText.Short(target), LayerDigest(labels), sw.ElapsedMilliseconds);
        return true;
    }

    // ---------------------------------------------------------------- remove

    /// <summary>Inside Remove's gate, before its layer is released: a layer being mounted again refuses the Remove.</summary>
    internal void BeginRemove(SnapshotRecord rec, string key)
    {
        _removing[rec.Id] = 0;
        Interlocked.MemoryBarrier();
        // Its layer mount (restore after start) is in flight: removing the dir under it would leak the mount.
        if (_mounting.ContainsKey(rec.Id))
            throw SnapshotterException.FailedPrecondition($"cannot remove snapshot {key} now: its layer is being mounted again after the start; retry");
    }

    /// <summary>Remove is over (done or failed): a restore may mount this id again.</summary>
    internal void EndRemove(long id) => _removing.TryRemove(id, out _);

    /// <summary>The snapshot is being removed (Remove; containerd's GC): the layer goes and its cached data with it.</summary>
    internal async Task ReleaseAsync(SnapshotRecord rec, CancellationToken ct)
    {
        var fs = FsDir(rec.Id);
        if (rec.IsRemote && _opt.RemoteFileSystem != null && !_unrestored.ContainsKey(rec.Id))
        {
            try { await _opt.RemoteFileSystem.ReleaseAsync(fs, ct); }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                _log.LogWarning("remote filesystem failed to release {Mountpoint} of {Key}: {Error}", fs, KeyText.Short(rec.Key), e.Message);
            }
        }
    }

    /// <summary>Remove's commit failed after the layer was unmounted: the next Check mounts it again instead of trusting a stale result.</summary>
    internal void RemoveFailed(SnapshotRecord rec)
    {
        if (!rec.IsRemote) return;
        _unrestored[rec.Id] = "remove failed after the layer was unmounted";
        _lastChecked.TryRemove(rec.Id, out _);
    }

    /// <summary>Remove committed: forget the snapshot's state.</summary>
    internal void Removed(SnapshotRecord rec)
    {
        _lastChecked.TryRemove(rec.Id, out _);
        _unrestored.TryRemove(rec.Id, out _);
        _unavailable.TryRemove(rec.Id, out _);
        if (rec.IsRemote) Interlocked.Decrement(ref _remoteCount);
    }

    // ---------------------------------------------------------------- status

    private void MarkUnavailable(long id, string error) =>
        _unavailable.AddOrUpdate(id, static (_, e) => (DateTime.UtcNow, e), static (_, old, e) => (old.Since, e), error);

    private void RecordFallback(FallbackRecord f)
    {
        lock (_fallbacks)
        {
            _fallbacks.Enqueue(f);
            while (_fallbacks.Count > RecentFallbackLimit) _fallbacks.Dequeue();
        }
        try { FallbackOccurred?.Invoke(f); }
        catch (Exception e) { _log.LogWarning("fallback observer failed: {Error}", e.Message); }
    }

    /// <summary>The last <see cref="RecentFallbackLimit"/> layers that fell back to an ordinary snapshot, oldest first.</summary>
    public IReadOnlyList<FallbackRecord> RecentFallbacks()
    {
        lock (_fallbacks) return [.. _fallbacks];
    }

    /// <summary>Every remote snapshot (and remote mount in progress) with its state, for <c>stargz status</c>.</summary>
    public async Task<IReadOnlyList<RemoteSnapshotStatus>> RemoteStatusAsync(CancellationToken ct)
    {
        var remotes = await _sn.WithStoreAsync(() =>
        {
            var list = new List<SnapshotRecord>();
            foreach (var r in _store.All()) if (r.IsRemote) list.Add(r);
            return list;
        }, ct);
        var result = new List<RemoteSnapshotStatus>(remotes.Count + _remoteMounting.Count);
        foreach (var (id, m) in _remoteMounting)
        {
            var source = LayerSource.FromLabels(m.Labels);
            result.Add(new RemoteSnapshotStatus(m.Namespace, m.Key, id, FsDir(id), source.Reference ?? "", source.Digest ?? "",
                RemoteSnapshotState.Mounting, null, null));
        }
        foreach (var r in remotes)
        {
            var source = LayerSource.FromLabels(r.Labels);
            var (reference, digest) = (source.Reference ?? "", source.Digest ?? "");
            RemoteSnapshotState state;
            DateTime? since = null;
            string? error = null;
            if (_unavailable.TryGetValue(r.Id, out var u))
            {
                state = _mounting.ContainsKey(r.Id) ? RemoteSnapshotState.Mounting : RemoteSnapshotState.Unavailable;
                (since, error) = (u.Since, u.Error);
            }
            else if (_unrestored.TryGetValue(r.Id, out var why))
            {
                // Not mounted since start: being restored, or not restorable without a remote filesystem.
                state = _mounting.ContainsKey(r.Id) || _opt.RemoteFileSystem != null && why == "being restored after start"
                    ? RemoteSnapshotState.Mounting : RemoteSnapshotState.Unavailable;
                if (state == RemoteSnapshotState.Unavailable) (since, error) = (_started, why);
            }
            else state = RemoteSnapshotState.Mounted;
            result.Add(new RemoteSnapshotStatus(r.Namespace, r.Key, r.Id, FsDir(r.Id), reference, digest, state, since, error));
        }
        return result;
    }

    // ---------------------------------------------------------------- check

    /// <summary>Checks every remote layer in <paramref name="chain"/>; Unavailable if one cannot be served.</summary>
    internal async Task CheckAsync(List<SnapshotRecord> chain, CancellationToken ct)
    {
        foreach (var r in chain)
        {
            if (!r.IsRemote) continue;
            var fs = FsDir(r.Id);
            var fsys = _opt.RemoteFileSystem;
            if (fsys == null)
                throw SnapshotterException.Unavailable($"layer {LayerDigest(r.Labels)} of remote snapshot {r.Key} cannot be served: no remote filesystem is configured");
            if (_unrestored.ContainsKey(r.Id))
            {
                try
                {
                    await RestoreRemoteAsync(r, ct);
                    _log.LogInformation("remote snapshot {Key} (layer {Digest}) restored on demand", KeyText.Short(r.Key), LayerDigest(r.Labels));
                    continue;
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    throw SnapshotterException.Unavailable($"layer {LayerDigest(r.Labels)} of remote snapshot {r.Key} is not mounted: {e.Message}", e);
                }
            }
            if (!_opt.CheckAlways && _lastChecked.TryGetValue(r.Id, out var at) && DateTime.UtcNow - at < _opt.CheckValidInterval)
                continue;
            try
            {
                await fsys.CheckAsync(fs, r.Labels, ct);
                _lastChecked[r.Id] = DateTime.UtcNow;
                _unavailable.TryRemove(r.Id, out _);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                _lastChecked.TryRemove(r.Id, out _);
                MarkUnavailable(r.Id, e.Message);
                _log.LogWarning("layer {Digest} of remote snapshot {Key} is unavailable: {Error}", LayerDigest(r.Labels), KeyText.Short(r.Key), KeyText.Bound(e.Message, r.Key));
                throw SnapshotterException.Unavailable($"layer {LayerDigest(r.Labels)} of remote snapshot {r.Key} is unavailable: {e.Message}", e);
            }
        }
    }

    /// <summary>The layer's digest as messages quote it (label values are a client's: shortened).</summary>
    public static string LayerDigest(IReadOnlyDictionary<string, string> labels)
        => LayerSource.FromLabels(labels).Digest is { } d ? KeyText.Short(d)
         : labels.TryGetValue(SnapshotLabels.SnapshotRef, out d) ? KeyText.Short(d) : "(unknown digest)";

    // ---------------------------------------------------------------- shutdown

    /// <summary>A background restore ends first, so that what it mounted is unmounted by <see cref="ShutdownAsync"/>.</summary>
    internal async Task StopRestoringAsync()
    {
        _restoreStop.Cancel();
        try { await _restoring; }
        catch (Exception e) { _log.LogWarning("background restore ended with {Error}", e.Message); }
    }

    /// <summary>Inside the snapshotter's gate at shutdown: unmounts remote layers (restored at next start) unless handed over.</summary>
    internal async Task ShutdownAsync()
    {
        Volatile.Write(ref _disposed, 1);
        if (_opt.RemoteFileSystem is IRemoteHandover { HandingOver: true })
            _log.LogInformation("shutdown: remote layers stay mounted for the next daemon to adopt");
        else if (_opt.RemoteFileSystem != null)
        {
            foreach (var r in _store.All().Where(r => r.IsRemote && !_unrestored.ContainsKey(r.Id)))
            {
                try { await _opt.RemoteFileSystem.UnmountAsync(FsDir(r.Id), CancellationToken.None); }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    _log.LogWarning("shutdown: cannot unmount remote layer {Key} at {Mountpoint}: {Error}", KeyText.Short(r.Key), FsDir(r.Id), e.Message);
                }
            }
        }
    }
}
