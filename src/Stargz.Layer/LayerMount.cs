using Stargz.Fuse;

namespace Stargz.Layer;

/// <summary>A mounted layer: through FUSE (<see cref="Server"/>), or, once <see cref="Promoted"/>, an EROFS image bound at the mountpoint.
/// After a promotion the FUSE server stays until the kernel ends its connection (the last overlay made over it is gone);
/// after an eviction of the image a new FUSE server serves the mountpoint and the earlier ones go to <see cref="Earlier"/>.</summary>
internal sealed class LayerMount(RemoteLayer layer, FuseServer? server, RemoteBlobFetcher blob)
{
    public RemoteLayer Layer { get; } = layer;
    public FuseServer? Server { get; set; } = server;
    /// <summary>Detached FUSE servers of this mountpoint still serving overlays made before a promotion.</summary>
    public readonly List<FuseServer> Earlier = [];
    public RemoteBlobFetcher Blob { get; } = blob;
    public volatile bool Promoted;
    /// <summary>Its image was evicted: a promotion again waits for room, it does not evict another image.</summary>
    public volatile bool Evicted;
    public volatile string? PromotionError;
}
