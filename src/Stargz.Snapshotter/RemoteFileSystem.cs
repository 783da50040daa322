namespace Stargz.Snapshotter;

/// <summary>
/// The one seam between the snapshotter and the lazy layer: the snapshotter knows nothing else about layers.
/// </summary>
public interface IRemoteFileSystem
{
    // Mounts the remote layer described by labels at mountpoint, or throws RemoteLayerUnavailableException (not eStargz,
    // missing TOC digest, registry unreachable...) whose Message says why; the snapshotter then falls back.
    Task MountAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct);
    Task CheckAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct); // throws if unhealthy -> Unavailable
    Task UnmountAsync(string mountpoint, CancellationToken ct); // shutdown, failed prepare: the layer's cached data is kept

    // The snapshot of this layer was removed: unmount it and free its cached data (what no other layer uses).
    Task ReleaseAsync(string mountpoint, CancellationToken ct) => UnmountAsync(mountpoint, ct);
}

/// <summary>
/// Optional, for a remote filesystem whose cache outlives the process: told at start (before anything is mounted or
/// served) the labels of every remote snapshot in the store, it drops cached data no remote snapshot refers to any more
/// (a snapshot removed while its layer was not mounted, a crash between remove and free).
/// </summary>
public interface IRemoteCacheSweeper
{
    Task SweepAsync(IReadOnlyList<IReadOnlyDictionary<string, string>> remoteSnapshotLabels, CancellationToken ct);
}

/// <summary>
/// Optional, for a remote filesystem whose mounts outlive the process (FUSE connections kept in a service manager's
/// fd store): such mounts are adopted by the next process instead of being cleared and mounted again.
/// </summary>
public interface IRemoteHandover
{
    /// <summary>A live mount left by an earlier process waits at <paramref name="mountpoint"/>: leave it mounted.</summary>
    bool Holds(string mountpoint);
    /// <summary>Restore is over: ends the kept mounts no remote snapshot took (removed meanwhile); returns how many.</summary>
    int EndUnclaimed();
    /// <summary>True when this shutdown hands the mounts over to the next process: leave them mounted.</summary>
    bool HandingOver { get; set; }
}

/// <summary>Optional: what a mounted remote layer holds in the cache, reported as its snapshot's Usage.</summary>
public interface IRemoteUsage
{
    /// <summary>(bytes, files) the layer at <paramref name="mountpoint"/> holds on disk; null when it is not mounted.</summary>
    (long Bytes, long Inodes)? Usage(string mountpoint);
}

/// <summary>The remote layer cannot be served (the snapshotter falls back to an ordinary snapshot or answers Unavailable).</summary>
public class RemoteLayerUnavailableException : Exception
{
    public RemoteLayerUnavailableException(string message) : base(message) { }
    public RemoteLayerUnavailableException(string message, Exception inner) : base(message, inner) { }
    public RemoteLayerUnavailableException(string message, Exception? inner, string reason) : base(message, inner) { Reason = reason; }

    /// <summary>Why, as a short word from a fixed set (a metrics label): the remote filesystem's classification.</summary>
    public string Reason { get; } = "other";
}
