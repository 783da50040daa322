namespace Stargz.Snapshotter;

/// <summary>A layer that was not served remotely: its snapshot was made the ordinary way (a full download).</summary>
/// <param name="Reason">a short word from a fixed set (metrics label), <see cref="RemoteLayerUnavailableException.Reason"/>.</param>
/// <param name="Message">the full cause, as logged.</param>
public sealed record FallbackRecord(DateTime At, string Namespace, string Target, string Key, string Reference, string Digest, string Reason,
    string Message);

public enum RemoteSnapshotState
{
    /// <summary>The layer is being mounted (first Prepare, or again after a restart).</summary>
    Mounting,
    /// <summary>The layer is mounted and its last check passed.</summary>
    Mounted,
    /// <summary>The layer cannot be served: not mounted after a restart, or its last check failed.</summary>
    Unavailable,
}

/// <summary>A remote snapshot as <c>stargz status</c> shows it (the layer's own statistics come from the remote filesystem).</summary>
/// <param name="MountPoint">where the layer is (to be) mounted: the snapshot's fs directory.</param>
/// <param name="UnavailableSince">when the layer was first seen unavailable (null unless <see cref="RemoteSnapshotState.Unavailable"/>).</param>
public sealed record RemoteSnapshotStatus(string Namespace, string Key, long Id, string MountPoint, string Reference, string Digest,
    RemoteSnapshotState State, DateTime? UnavailableSince, string? LastError);
