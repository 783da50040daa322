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
