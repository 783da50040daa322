using Microsoft.Extensions.Logging;
using Stargz.Snapshotter;

namespace Stargz.Daemon;

/// <summary>
/// Where the lazy layer (src/Stargz.Layer) is adapted to <see cref="IRemoteFileSystem"/>. Until that adapter lands,
/// the daemon runs as a plain overlay snapshotter: every Prepare is an ordinary snapshot, and remote snapshots found in
/// the metadata are reported as not restorable (Unavailable to anything stacked on them).
/// </summary>
public static class RemoteLayerWiring
{
    /// <param name="root">the daemon's --root (the layer keeps its caches below it, as the reference does).</param>
    /// <returns>the remote filesystem, or null for a plain overlay snapshotter. If it is (async) disposable, the daemon
    /// disposes it after the snapshotter has closed.</returns>
    public static IRemoteFileSystem? Create(DaemonConfig config, string root, ILoggerFactory loggers, ILogger log)
    {
        _ = (config, root, loggers);
        log.LogWarning("no remote filesystem is wired into this build: running as a plain overlay snapshotter (layers are downloaded by containerd)");
        return null;
    }
}
