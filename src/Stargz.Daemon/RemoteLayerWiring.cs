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
    public static IRemoteFileSystem? Create(DaemonConfig config, ILogger log)
    {
        _ = config;
        log.LogWarning("no remote filesystem is wired into this build: running as a plain overlay snapshotter (layers are downloaded by containerd)");
        return null;
    }
}
