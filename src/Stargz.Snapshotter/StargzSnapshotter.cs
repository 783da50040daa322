using System.Collections.Concurrent;
using System.Diagnostics;
using Containerd.Types;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Snapshotter;

public sealed class SnapshotterOptions
{
    /// <summary>Root dir: metadata.db and snapshots/ID/{fs,work} live below it.</summary>
    public required string Root { get; init; }

    /// <summary>The lazy layer; null runs a pure overlay snapshotter (remote snapshots are never created).</summary>
    public IRemoteFileSystem? RemoteFileSystem { get; init; }

    /// <summary>How long a successful Check of a remote layer stays valid ([blob] valid_interval).</summary>
    public TimeSpan CheckValidInterval { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Check remote layers on every call ([blob] check_always).</summary>
    public bool CheckAlways { get; init; }

    /// <summary>Force overlay's userxattr option on/off; null detects (needed inside a user namespace).</summary>
    public bool? UserXattr { get; init; }

    /// <summary>
    /// How long the start waits for remote snapshots to be mounted again before serving; those not mounted by then
    /// (a registry that does not answer) go on being restored in the background, and on demand by Check.
    /// </summary>
    public TimeSpan RestoreWaitAtStart { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// Remove only drops the metadata (and releases a remote layer); the snapshot's directory tree is deleted by the
    /// next Cleanup, as containerd's and the reference's AsynchronousRemove option do. Removing a large upper dir then
    /// no longer holds up containerd's GC.
    /// </summary>
    public bool AsyncRemove { get; init; }
}

/// <summary>
/// containerd's overlayfs snapshotter semantics plus one hook: remote layers mounted through
/// <see cref="IRemoteFileSystem"/>. Namespaces are kept apart (empty string when no namespace header arrives);
/// keys are opaque. Every call's metadata work is one LiteDB transaction under <c>_gate</c>; slow work (remote
/// mounts, disk usage, syncfs) runs outside it. Remote Prepares single-flight per (namespace, chainID).
/// </summary>
public sealed class StargzSnapshotter : IAsyncDisposable
{
    public const string TargetRefLabel = "containerd.io/snapshot.ref";
    public const string RemoteLabel = "containerd.io/snapshot/remote";
    public const string RemoteLabelValue = "remote snapshot";

    private readonly SnapshotterOptions _opt;
    private readonly ILogger _log;
    private readonly MetaStore _store;
    private readonly string _snapshotsDir;
    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly KeyedLock _targetLocks = new();
    private readonly KeyedLock _commitLocks = new();
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

    /// <summary>How many fallbacks <see cref="RecentFallbacks"/> keeps.</summary>
    public const int RecentFallbackLimit = 256;

    /// <summary>Raised once per layer that falls back to an ordinary snapshot (after it is logged).</summary>
    public event Action<FallbackRecord>? FallbackOccurred;
    private readonly bool _indexOff;
    private readonly bool _userXattr;
    private int _disposed;
    private readonly int _rootLock;

    public string Root => _opt.Root;
    public bool HasRemoteFileSystem => _opt.RemoteFileSystem != null;

    /// <summary>(remote snapshots in the store, of which not mounted) — for the daemon's gauges.</summary>
    public (int Remote, int Unrestored) RemoteSnapshotCounts()
    {
        if (Volatile.Read(ref _disposed) != 0) return (0, 0);
        return (Volatile.Read(ref _remoteCount), _unrestored.Count);
    }

    private int _remoteCount;

    /// <summary>Remote snapshots that could not be re-mounted at start (id -> why); Check retries them.</summary>
    public IReadOnlyDictionary<long, string> UnrestoredRemoteSnapshots => _unrestored;

    private StargzSnapshotter(SnapshotterOptions opt, ILogger log)
    {
        _opt = opt;
        _log = log;
        Directory.CreateDirectory(opt.Root);
        // One daemon per root: two processes writing one LiteDB file would corrupt it.
        _rootLock = Native.TryLockFile(Path.Combine(opt.Root, "lock"))
            ?? throw new IOException($"root {opt.Root} is in use by another snapshotter process (lock {Path.Combine(opt.Root, "lock")} is held)");
        _snapshotsDir = Path.Combine(opt.Root, "snapshots");
        Directory.CreateDirectory(_snapshotsDir);
        try { _store = new MetaStore(Path.Combine(opt.Root, "metadata.db")); }
        catch
        {
            Native.CloseFd(_rootLock);
            throw;
        }
        _indexOff = File.Exists("/sys/module/overlay/parameters/index");
        _userXattr = opt.UserXattr ?? InUserNamespace();
    }

    /// <summary>Opens the store under the root and restores remote snapshots (stale mounts unmounted, layers re-mounted).</summary>
    public static async Task<StargzSnapshotter> OpenAsync(SnapshotterOptions opt, ILogger? log, CancellationToken ct)
    {
        var s = new StargzSnapshotter(opt, log ?? NullLogger.Instance);
        try
        {
            await s.RestoreAsync(ct);
        }
        catch
        {
            await s.DisposeAsync();
            throw;
        }
        return s;
    }

    private static bool InUserNamespace()
    {
        try
        {
            var map = File.ReadAllText("/proc/self/uid_map").Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            return !(map.Length >= 3 && map[0] == "0" && map[1] == "0" && map[2] == "4294967295");
        }
        catch (IOException) { return false; }
    }

    public string SnapshotDir(long id) => Path.Combine(_snapshotsDir, id.ToString(System.Globalization.CultureInfo.InvariantCulture));
    public string FsDir(long id) => Path.Combine(SnapshotDir(id), "fs");
    public string WorkDir(long id) => Path.Combine(SnapshotDir(id), "work");

    // ---------------------------------------------------------------- restore

    private async Task RestoreAsync(CancellationToken ct)
    {
        await RecoverInterruptedRemovesAsync(ct);
        var handover = _opt.RemoteFileSystem as IRemoteHandover;
        foreach (var mp in Native.MountsUnder(_snapshotsDir))
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
        List<SnapshotRecord> remotes;
        await _gate.WaitAsync(ct);
        try { remotes = _store.All().Where(r => r.IsRemote).ToList(); }
        finally { _gate.Release(); }
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
            if (!Directory.Exists(SnapshotDir(r.Id))) throw new IOException($"snapshot dir of {r.Key} is gone");
            // A kept mount is not touched before it is adopted: a stat of it would wait for the server being restored.
            if (_opt.RemoteFileSystem is not IRemoteHandover h || !h.Holds(FsDir(r.Id))) Directory.CreateDirectory(FsDir(r.Id));
            await _opt.RemoteFileSystem!.MountAsync(FsDir(r.Id), r.Labels, ct);
            _lastChecked[r.Id] = DateTime.UtcNow;
            _unrestored.TryRemove(r.Id, out _);
            _unavailable.TryRemove(r.Id, out _);
        }
        finally { _mounting.TryRemove(r.Id, out _); }
    }

    /// <summary>
    /// A crash inside Remove's transaction (dir renamed to rm-ID, metadata not yet committed) leaves a live snapshot
    /// without its dir: move it back. rm-ID dirs of deleted snapshots are left for Cleanup.
    /// </summary>
    private async Task RecoverInterruptedRemovesAsync(CancellationToken ct)
    {
        HashSet<long> live;
        await _gate.WaitAsync(ct);
        try { live = _store.InTransaction(() => _store.All().Select(r => r.Id).ToHashSet()); }
        finally { _gate.Release(); }
        foreach (var dir in Directory.GetDirectories(_snapshotsDir, "rm-*"))
        {
            if (!long.TryParse(Path.GetFileName(dir)[3..], out var id) || !live.Contains(id)) continue;
            if (Directory.Exists(SnapshotDir(id))) continue;
            Directory.Move(dir, SnapshotDir(id));
            Native.FsyncDir(_snapshotsDir);
            _log.LogWarning("snapshot id {Id}: remove was interrupted before its metadata commit; dir moved back", id);
        }
    }

    // ---------------------------------------------------------------- API

    public Task<IReadOnlyList<Mount>> PrepareAsync(string ns, string key, string parent, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
        => CreateAsync(ns, SnapshotKind.Active, key, parent, labels, ct);

    public Task<IReadOnlyList<Mount>> ViewAsync(string ns, string key, string parent, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
        => CreateAsync(ns, SnapshotKind.View, key, parent, labels, ct);

    private async Task<IReadOnlyList<Mount>> CreateAsync(string ns, SnapshotKind kind, string key, string parent,
        IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        if (string.IsNullOrEmpty(key)) throw SnapshotterException.InvalidArgument($"snapshot key must not be empty");
        ValidateLabels(labels);
        parent ??= "";
        if (parent.Length > 0)
            await CheckChainAsync(ns, parent, ct);

        if (kind == SnapshotKind.Active && _opt.RemoteFileSystem != null && labels.TryGetValue(TargetRefLabel, out var target) && target.Length > 0)
        {
            // Single flight per chainID: the first caller mounts and commits; the rest wait and see AlreadyExists.
            using var _ = await _targetLocks.AcquireAsync(ns + "\u0000" + target, ct);
            var rec = await WithStoreAsync(() =>
            {
                if (_store.Get(ns, target) != null)
                    throw SnapshotterException.AlreadyExists($"target snapshot {target} already exists");
                return CreateRecord(ns, kind, key, parent, labels);
            }, ct);
            bool remote;
            try { remote = await TryRemoteAsync(rec, target, labels, ct); }
            catch
            {
                // Cancelled or the commit failed: containerd never learns this key, so nobody else would remove it.
                await DropAsync(rec);
                throw;
            }
            if (remote) throw SnapshotterException.AlreadyExists($"target snapshot {target} (remote snapshot)");
            return await MountsForAsync(rec, ct);
        }

        var created = await WithStoreAsync(() => CreateRecord(ns, kind, key, parent, labels), ct);
        _log.LogDebug("created {Kind} snapshot {Key} (id {Id}, parent {Parent})", kind, KeyText.Short(key), created.Id, KeyText.Short(parent));
        return await MountsForAsync(created, ct);
    }

    /// <summary>Mounts the layer remotely and commits it under <paramref name="target"/>; false means fall back.</summary>
    private async Task<bool> TryRemoteAsync(SnapshotRecord rec, string target, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
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
            RecordFallback(new FallbackRecord(DateTime.UtcNow, rec.Namespace, target, rec.Key, LabelOr(labels, "containerd.io/snapshot/remote/stargz.reference",
                "containerd.io/snapshot/cri.image-ref"), LabelOr(labels, "containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest"),
                reason, e.Message));
            return false;
        }
        finally { _remoteMounting.TryRemove(rec.Id, out _); }
        try
        {
            var commitLabels = new Dictionary<string, string>(labels, StringComparer.Ordinal) { [RemoteLabel] = RemoteLabelValue };
            await WithStoreAsync(() =>
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

    /// <summary>Inside a transaction: validate, allocate an id, make the dirs under a temp name, rename into place.</summary>
    private SnapshotRecord CreateRecord(string ns, SnapshotKind kind, string key, string parent, IReadOnlyDictionary<string, string> labels)
    {
        if (_store.Get(ns, key) != null) throw SnapshotterException.AlreadyExists($"snapshot {key} already exists");
        SnapshotRecord? parentRec = null;
        if (parent.Length > 0)
        {
            parentRec = _store.Get(ns, parent) ?? throw SnapshotterException.NotFound($"parent snapshot {parent} does not exist");
            if (parentRec.Kind != SnapshotKind.Committed)
                throw SnapshotterException.InvalidArgument($"parent {parent} is not a committed snapshot");
        }
        var now = DateTime.UtcNow;
        var rec = new SnapshotRecord
        {
            Id = _store.NextId(), Namespace = ns, Key = key, Parent = parent, Kind = kind, Created = now, Updated = now,
            Labels = new Dictionary<string, string>(labels, StringComparer.Ordinal),
        };
        var temp = Path.Combine(_snapshotsDir, "new-" + Guid.NewGuid().ToString("N"));
        var final = SnapshotDir(rec.Id);
        Directory.CreateDirectory(Path.Combine(temp, "fs"));
        File.SetUnixFileMode(Path.Combine(temp, "fs"), (UnixFileMode)0b111_101_101);
        if (kind == SnapshotKind.Active) Directory.CreateDirectory(Path.Combine(temp, "work"));
        // As containerd's overlay snapshotter: the new upper dir takes the owner of the parent's root, so an image
        // whose / belongs to a non-root user keeps it in the container.
        if (parentRec != null && Native.Owner(FsDir(parentRec.Id)) is { } owner && owner != (0, 0))
            Native.Chown(Path.Combine(temp, "fs"), owner.Uid, owner.Gid);
        var renamed = false;
        try
        {
            _store.Insert(rec);
            if (Directory.Exists(final))
            {
                // Left by a crash between rename and metadata commit: the id was never committed, so the dir is an orphan.
                _log.LogWarning("removing orphan snapshot dir {Dir} (id {Id} was never committed)", final, rec.Id);
                RemoveDirTree(final);
            }
            Directory.Move(temp, final);
            renamed = true;
            Native.FsyncDir(_snapshotsDir);
            FaultInjection.Hit("create:after-rename");
            return rec;
        }
        catch
        {
            RemoveDirTree(renamed ? final : temp);
            throw;
        }
    }

    public async Task<IReadOnlyList<Mount>> MountsAsync(string ns, string key, CancellationToken ct)
    {
        var rec = await WithStoreAsync(() => _store.Get(ns, key) ?? throw SnapshotterException.NotFound($"snapshot {key} does not exist"), ct);
        await CheckChainAsync(ns, key, ct);
        return await MountsForAsync(rec, ct);
    }

    private async Task<IReadOnlyList<Mount>> MountsForAsync(SnapshotRecord rec, CancellationToken ct)
    {
        var parents = await WithStoreAsync(() => Ancestors(rec.Namespace, rec.Parent).Select(p => p.Id).ToList(), ct);
        var m = new Mount();
        if (parents.Count == 0 || (rec.Kind == SnapshotKind.View && parents.Count == 1))
        {
            var src = parents.Count == 0 ? FsDir(rec.Id) : FsDir(parents[0]);
            m.Type = "bind";
            m.Source = src;
            m.Options.Add(rec.Kind == SnapshotKind.Active ? "rw" : "ro");
            m.Options.Add("rbind");
            return [m];
        }
        m.Type = "overlay";
        m.Source = "overlay";
        if (_indexOff) m.Options.Add("index=off");
        if (_userXattr) m.Options.Add("userxattr");
        if (rec.Kind == SnapshotKind.Active)
        {
            m.Options.Add("workdir=" + WorkDir(rec.Id));
            m.Options.Add("upperdir=" + FsDir(rec.Id));
        }
        m.Options.Add("lowerdir=" + string.Join(':', parents.Select(FsDir)));
        return [m];
    }

    /// <summary>The chain from <paramref name="key"/> down to the base layer (key first). Inside the gate.</summary>
    private List<SnapshotRecord> Ancestors(string ns, string key)
    {
        var list = new List<SnapshotRecord>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        while (key.Length > 0)
        {
            if (!seen.Add(key)) throw new InvalidOperationException($"parent cycle at snapshot {key}");
            var r = _store.Get(ns, key) ?? throw SnapshotterException.NotFound($"snapshot {key} (in a parent chain) does not exist");
            list.Add(r);
            key = r.Parent;
        }
        return list;
    }

    public async Task CommitAsync(string ns, string name, string key, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        if (string.IsNullOrEmpty(name)) throw SnapshotterException.InvalidArgument($"commit name must not be empty");
        ValidateLabels(labels);
        // Single flight per (namespace, name) and per key: one commit computes usage and syncs, the rest see the outcome.
        using var byName = await _commitLocks.AcquireAsync("n\u0000" + ns + "\u0000" + name, ct);
        using var byKey = await _commitLocks.AcquireAsync("k\u0000" + ns + "\u0000" + key, ct);
        var rec = await WithStoreAsync(() =>
        {
            var r = _store.Get(ns, key) ?? throw SnapshotterException.NotFound($"active snapshot {key} does not exist");
            if (r.Kind != SnapshotKind.Active) throw SnapshotterException.FailedPrecondition($"snapshot {key} is not active ({r.Kind})");
            if (_store.Get(ns, name) != null) throw SnapshotterException.AlreadyExists($"snapshot {name} already exists");
            return r;
        }, ct);
        // Usage and durability outside the gate: a big layer must not stall every other call.
        var fs = FsDir(rec.Id);
        var (size, inodes) = DiskUsage.Of(fs);
        Native.SyncFs(fs);
        FaultInjection.Hit("commit:after-usage");
        await WithStoreAsync(() =>
        {
            var r = _store.Get(ns, key) ?? throw SnapshotterException.NotFound($"active snapshot {key} does not exist");
            if (r.Id != rec.Id || r.Kind != SnapshotKind.Active) throw SnapshotterException.FailedPrecondition($"snapshot {key} changed during commit");
            if (_store.Get(ns, name) != null) throw SnapshotterException.AlreadyExists($"snapshot {name} already exists");
            r.Key = name;
            r.Kind = SnapshotKind.Committed;
            r.Labels = new Dictionary<string, string>(labels, StringComparer.Ordinal);
            r.Created = r.Updated = DateTime.UtcNow;
            r.Size = size;
            r.Inodes = inodes;
            _store.Update(r);
            return 0;
        }, ct);
        _log.LogDebug("committed {Key} as {Name} ({Size} bytes, {Inodes} inodes)", KeyText.Short(key), KeyText.Short(name), size, inodes);
    }

    public async Task RemoveAsync(string ns, string key, CancellationToken ct)
    {
        string? trash = null;
        long? removing = null;
        await _gate.WaitAsync(ct);
        try
        {
            ThrowIfDisposed();
            var rec = _store.InTransaction(() =>
            {
                var r = _store.Get(ns, key) ?? throw SnapshotterException.NotFound($"snapshot {key} does not exist");
                if (_store.HasChildren(ns, key)) throw SnapshotterException.FailedPrecondition($"cannot remove snapshot {key}: it has children");
                return r;
            });
            if (rec.IsRemote)
            {
                removing = rec.Id;
                _removing[rec.Id] = 0;
                Interlocked.MemoryBarrier();
                // Its layer mount (restore after start) is in flight: removing the dir under it would leak the mount.
                if (_mounting.ContainsKey(rec.Id))
                    throw SnapshotterException.FailedPrecondition($"cannot remove snapshot {key} now: its layer is being mounted again after the start; retry");
            }
            await ReleaseLayerAsync(rec, ct);
            trash = Path.Combine(_snapshotsDir, "rm-" + rec.Id.ToString(System.Globalization.CultureInfo.InvariantCulture));
            var dir = SnapshotDir(rec.Id);
            var moved = false;
            try
            {
                _store.InTransaction(() =>
                {
                    _store.Delete(rec);
                    if (Directory.Exists(dir))
                    {
                        Directory.Move(dir, trash);
                        moved = true;
                        FaultInjection.Hit("remove:after-rename");
                    }
                });
            }
            catch
            {
                if (moved && !Directory.Exists(dir)) Directory.Move(trash, dir);
                // The layer is already unmounted: the next Check mounts it again instead of trusting a stale result.
                if (rec.IsRemote)
                {
                    _unrestored[rec.Id] = "remove failed after the layer was unmounted";
                    _lastChecked.TryRemove(rec.Id, out _);
                }
                throw;
            }
            FaultInjection.Hit("remove:after-commit");
            if (!moved) trash = null;
            _lastChecked.TryRemove(rec.Id, out _);
            _unrestored.TryRemove(rec.Id, out _);
            _unavailable.TryRemove(rec.Id, out _);
            if (rec.IsRemote) Interlocked.Decrement(ref _remoteCount);
            _log.LogDebug("removed snapshot {Key} (id {Id})", KeyText.Short(key), rec.Id);
        }
        finally
        {
            if (removing is long id) _removing.TryRemove(id, out _);
            _gate.Release();
        }
        if (trash == null) return;
        if (_opt.AsyncRemove) _log.LogDebug("snapshot {Key} removed; its dir {Dir} is left for Cleanup (async_remove)", KeyText.Short(key), trash);
        else RemoveDirTree(trash);
    }

    /// <summary>Best-effort removal of a snapshot this process just created and could not hand out.</summary>
    private async Task DropAsync(SnapshotRecord rec)
    {
        try
        {
            foreach (var mp in Native.MountsUnder(SnapshotDir(rec.Id))) Native.Unmount(mp, detach: true);
            await WithStoreAsync(() =>
            {
                var cur = _store.Get(rec.Namespace, rec.Key);
                if (cur != null && cur.Id == rec.Id) _store.Delete(cur);
                return 0;
            }, CancellationToken.None);
            RemoveDirTree(SnapshotDir(rec.Id));
        }
        catch (Exception e) when (e is IOException or SnapshotterException or UnauthorizedAccessException)
        {
            _log.LogWarning("cannot drop snapshot {Key} (id {Id}) after a failed remote prepare: {Error} (Cleanup retries)", KeyText.Short(rec.Key), rec.Id, KeyText.Bound(e.Message, rec.Key));
        }
    }

    private async Task ReleaseLayerAsync(SnapshotRecord rec, CancellationToken ct)
    {
        var fs = FsDir(rec.Id);
        if (rec.IsRemote && _opt.RemoteFileSystem != null && !_unrestored.ContainsKey(rec.Id))
        {
            // The snapshot is being removed (Remove; containerd's GC): the layer goes and its cached data with it.
            try { await _opt.RemoteFileSystem.ReleaseAsync(fs, ct); }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                _log.LogWarning("remote filesystem failed to release {Mountpoint} of {Key}: {Error}", fs, KeyText.Short(rec.Key), e.Message);
            }
        }
        foreach (var mp in Native.MountsUnder(SnapshotDir(rec.Id)))
        {
            try { Native.Unmount(mp, detach: true); }
            catch (IOException e)
            {
                throw SnapshotterException.FailedPrecondition($"cannot unmount {mp} of snapshot {rec.Key}: {e.Message}");
            }
        }
    }

    public Task<bool> ExistsAsync(string ns, string key, CancellationToken ct)
        => WithStoreAsync(() => _store.Get(ns, key) != null, ct);

    public Task<SnapshotRecord> StatAsync(string ns, string key, CancellationToken ct)
        => WithStoreAsync(() => _store.Get(ns, key) ?? throw SnapshotterException.NotFound($"snapshot {key} does not exist"), ct);

    /// <summary>Updates labels only. Field paths: none (replace labels), "labels", "labels.KEY"; anything else is InvalidArgument.</summary>
    public Task<SnapshotRecord> UpdateAsync(string ns, string name, IReadOnlyDictionary<string, string> labels, IReadOnlyList<string> paths, CancellationToken ct)
        => WithStoreAsync(() =>
        {
            ValidateLabels(labels);
            var r = _store.Get(ns, name) ?? throw SnapshotterException.NotFound($"snapshot {name} does not exist");
            if (paths.Count == 0)
                r.Labels = new Dictionary<string, string>(labels, StringComparer.Ordinal);
            foreach (var p in paths)
            {
                if (p == "labels")
                    r.Labels = new Dictionary<string, string>(labels, StringComparer.Ordinal);
                else if (p.StartsWith("labels.", StringComparison.Ordinal))
                {
                    var k = p["labels.".Length..];
                    if (labels.TryGetValue(k, out var v)) r.Labels[k] = v;
                    else r.Labels.Remove(k);
                }
                else throw SnapshotterException.InvalidArgument($"cannot update field {p} of snapshot {name}");
            }
            r.Updated = DateTime.UtcNow;
            _store.Update(r);
            return r;
        }, ct);

    public Task<List<SnapshotRecord>> ListAsync(string ns, IEnumerable<string> filters, CancellationToken ct)
    {
        var f = SnapshotFilter.Parse(filters);
        return WithStoreAsync(() => _store.InNamespace(ns).Where(f.Match).OrderBy(r => r.Id).ToList(), ct);
    }

    public async Task<(long Size, long Inodes)> UsageAsync(string ns, string key, CancellationToken ct)
    {
        var r = await StatAsync(ns, key, ct);
        if (r.Kind == SnapshotKind.Active) return DiskUsage.Of(FsDir(r.Id));
        // A remote snapshot holds its layer's cached chunks (and TOC, whole-file copies): that is its disk usage.
        if (r.IsRemote && _opt.RemoteFileSystem is IRemoteUsage usage && usage.Usage(FsDir(r.Id)) is { } u) return u;
        return (r.Size, r.Inodes);
    }

    /// <summary>Removes snapshot dirs with no metadata (crash leftovers, new-*/rm-* dirs), unmounting what they hold.</summary>
    public async Task<int> CleanupAsync(CancellationToken ct)
    {
        var removed = 0;
        await _gate.WaitAsync(ct);
        try
        {
            ThrowIfDisposed();
            var live = _store.InTransaction(() => _store.All().Select(r => r.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToHashSet());
            foreach (var dir in Directory.GetDirectories(_snapshotsDir))
            {
                if (live.Contains(Path.GetFileName(dir))) continue;
                foreach (var mp in Native.MountsUnder(dir))
                {
                    try { Native.Unmount(mp, detach: true); }
                    catch (IOException e) { _log.LogWarning("cleanup cannot unmount {Mountpoint}: {Error}", mp, e.Message); }
                }
                _log.LogInformation("cleanup removes orphan snapshot dir {Dir}", dir);
                RemoveDirTree(dir);
                removed++;
            }
        }
        finally { _gate.Release(); }
        return removed;
    }

    // ---------------------------------------------------------------- status

    private void MarkUnavailable(long id, string error) =>
        _unavailable.AddOrUpdate(id, static (_, e) => (DateTime.UtcNow, e), static (_, old, e) => (old.Since, e), error);

    private static string LabelOr(IReadOnlyDictionary<string, string> labels, string key, string fallback) =>
        labels.TryGetValue(key, out var v) && v.Length > 0 ? v : labels.TryGetValue(fallback, out v) ? v : "";

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
        var remotes = await WithStoreAsync(() =>
        {
            var list = new List<SnapshotRecord>();
            foreach (var r in _store.All()) if (r.IsRemote) list.Add(r);
            return list;
        }, ct);
        var result = new List<RemoteSnapshotStatus>(remotes.Count + _remoteMounting.Count);
        foreach (var (id, m) in _remoteMounting)
            result.Add(new RemoteSnapshotStatus(m.Namespace, m.Key, id, FsDir(id), LabelOr(m.Labels, "containerd.io/snapshot/remote/stargz.reference",
                "containerd.io/snapshot/cri.image-ref"), LabelOr(m.Labels, "containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest"),
                RemoteSnapshotState.Mounting, null, null));
        foreach (var r in remotes)
        {
            var reference = LabelOr(r.Labels, "containerd.io/snapshot/remote/stargz.reference", "containerd.io/snapshot/cri.image-ref");
            var digest = LabelOr(r.Labels, "containerd.io/snapshot/remote/stargz.digest", "containerd.io/snapshot/cri.layer-digest");
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

    /// <summary>Checks every remote layer in the chain from <paramref name="key"/> down; Unavailable if one cannot be served.</summary>
    private async Task CheckChainAsync(string ns, string key, CancellationToken ct)
    {
        var chain = await WithStoreAsync(() => Ancestors(ns, key), ct);
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

    /// <summary>containerd's own rule (labels.Validate): a label's key and value together are at most this many bytes.</summary>
    public const int MaxLabelBytes = 4096;

    /// <summary>Refuses labels containerd itself would refuse (so only direct clients ever meet it).</summary>
    private static void ValidateLabels(IReadOnlyDictionary<string, string> labels)
    {
        foreach (var (k, v) in labels)
        {
            if (k.Length + v.Length <= MaxLabelBytes / 3) continue;
            var n = System.Text.Encoding.UTF8.GetByteCount(k) + System.Text.Encoding.UTF8.GetByteCount(v);
            if (n > MaxLabelBytes)
                throw SnapshotterException.InvalidArgument($"label {KeyText.Short(k)}: key and value are {n} bytes, more than the {MaxLabelBytes} allowed");
        }
    }

    /// <summary>The layer's digest as messages quote it (label values are a client's: shortened).</summary>
    public static string LayerDigest(IReadOnlyDictionary<string, string> labels)
        => labels.TryGetValue("containerd.io/snapshot/remote/stargz.digest", out var d) ? KeyText.Short(d)
         : labels.TryGetValue("containerd.io/snapshot/cri.layer-digest", out d) ? KeyText.Short(d)
         : labels.TryGetValue(TargetRefLabel, out d) ? KeyText.Short(d) : "(unknown digest)";

    // ---------------------------------------------------------------- plumbing

    private async Task<T> WithStoreAsync<T>(Func<T> body, CancellationToken ct)
    {
        await _gate.WaitAsync(ct);
        try
        {
            ThrowIfDisposed();
            return _store.InTransaction(body);
        }
        finally { _gate.Release(); }
    }

    private void ThrowIfDisposed()
    {
        if (Volatile.Read(ref _disposed) != 0) throw SnapshotterException.Unavailable($"snapshotter is shutting down");
    }

    private void RemoveDirTree(string dir)
    {
        // Never recurse into a mount: deleting through it would destroy what it serves.
        var mounted = Directory.Exists(dir) ? Native.MountsUnder(dir) : [];
        if (mounted.Count > 0)
        {
            _log.LogWarning("not removing {Dir}: {Mountpoint} is still mounted (Cleanup retries)", dir, mounted[0]);
            return;
        }
        try { Directory.Delete(dir, recursive: true); }
        catch (DirectoryNotFoundException) { }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.LogWarning("cannot remove {Dir}: {Error} (Cleanup retries)", dir, e.Message);
        }
    }

    /// <summary>Waits for in-flight metadata work, unmounts remote layers (restored at next start), closes the store.</summary>
    public async ValueTask DisposeAsync()
    {
        // A background restore ends first, so that what it mounted is unmounted below.
        _restoreStop.Cancel();
        try { await _restoring; }
        catch (Exception e) { _log.LogWarning("background restore ended with {Error}", e.Message); }
        await _gate.WaitAsync();
        try
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
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
            _store.Dispose();
            Native.CloseFd(_rootLock);
        }
        finally { _gate.Release(); }
    }
}
