using Containerd.Types;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Stargz.Estargz;

namespace Stargz.Snapshotter;

/// <summary>
/// containerd's overlayfs snapshotter semantics (its <c>overlay.go</c>: prepare, view, commit, remove, walk, usage,
/// mounts over the metadata store) with one hook: a Prepare carrying a ref label, a chain holding remote snapshots
/// and a Remove of one go through <see cref="Remote"/>, which owns the remote-layer lifecycle. Keys are opaque.
/// Every call's metadata work is one LiteDB transaction under <c>_gate</c>; slow work (remote mounts, disk usage,
/// syncfs) runs outside it.
/// </summary>
public sealed class StargzSnapshotter : IAsyncDisposable
{
    private readonly SnapshotterOptions _opt;
    private readonly ILogger _log;
    private readonly MetaStore _store;
    private readonly string _snapshotsDir;
    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly KeyedLock _commitLocks = new();
    private readonly bool _indexOff;
    private readonly bool _userXattr;
    private int _disposed;
    private readonly int _rootLock;

    public string Root => _opt.Root;
    public bool HasRemoteFileSystem => _opt.RemoteFileSystem != null;

    /// <summary>The remote-snapshot lifecycle: restore, check, release, status and fallbacks.</summary>
    public RemoteSnapshots Remote { get; }

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
        Remote = new RemoteSnapshots(this, _store, opt, log);
        _indexOff = File.Exists("/sys/module/overlay/parameters/index");
        _userXattr = opt.UserXattr ?? InUserNamespace();
    }

    /// <summary>Opens the store under the root and restores remote snapshots (stale mounts unmounted, layers re-mounted).</summary>
    public static async Task<StargzSnapshotter> OpenAsync(SnapshotterOptions opt, ILogger? log, CancellationToken ct)
    {
        var s = new StargzSnapshotter(opt, log ?? NullLogger.Instance);
        try
        {
            await s.RecoverInterruptedRemovesAsync(ct);
            await s.Remote.RestoreAsync(s._snapshotsDir, ct);
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

        if (kind == SnapshotKind.Active && Remote.Enabled && labels.TryGetValue(SnapshotLabels.SnapshotRef, out var target) && target.Length > 0)
        {
            // Single flight per chainID: the first caller mounts and commits; the rest wait and see AlreadyExists.
            using var _ = await Remote.LockTargetAsync(ns, target, ct);
            var rec = await WithStoreAsync(() =>
            {
                if (_store.Get(ns, target) != null)
                    throw SnapshotterException.AlreadyExists($"target snapshot {target} already exists");
                return CreateRecord(ns, kind, key, parent, labels);
            }, ct);
            bool remote;
            try { remote = await Remote.TryMountAsync(rec, target, labels, ct); }
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
                Remote.BeginRemove(rec, key);
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
                Remote.RemoveFailed(rec);
                throw;
            }
            FaultInjection.Hit("remove:after-commit");
            if (!moved) trash = null;
            Remote.Removed(rec);
            _log.LogDebug("removed snapshot {Key} (id {Id})", KeyText.Short(key), rec.Id);
        }
        finally
        {
            if (removing is long id) Remote.EndRemove(id);
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
        await Remote.ReleaseAsync(rec, ct);
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

    // ---------------------------------------------------------------- check

    /// <summary>Checks every remote layer in the chain from <paramref name="key"/> down; Unavailable if one cannot be served.</summary>
    private async Task CheckChainAsync(string ns, string key, CancellationToken ct)
    {
        var chain = await WithStoreAsync(() => Ancestors(ns, key), ct);
        await Remote.CheckAsync(chain, ct);
    }

    /// <summary>containerd's own rule (labels.Validate): a label's key and value together are at most this many bytes.</summary>
    public const int MaxLabelBytes = SnapshotLabels.MaxBytes;

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

    // ---------------------------------------------------------------- plumbing

    /// <summary>Runs <paramref name="body"/> as one metadata transaction under the store's gate.</summary>
    internal async Task<T> WithStoreAsync<T>(Func<T> body, CancellationToken ct)
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
        await Remote.StopRestoringAsync();
        await _gate.WaitAsync();
        try
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
            await Remote.ShutdownAsync();
            _store.Dispose();
            Native.CloseFd(_rootLock);
        }
        finally { _gate.Release(); }
    }
}
