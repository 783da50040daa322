using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using Stargz.Layer;
using Stargz.Snapshotter;
using Stargz.StatusApi.V1;

namespace Stargz.Daemon;

/// <summary>What the status API reads: the snapshotter (keys, states, fallbacks) and the lazy layers (statistics).</summary>
/// <param name="remote">the lazy layer filesystem; null when the daemon runs without remote layers.</param>
public sealed class StatusSource(StargzSnapshotter snapshotter, LazyLayerFileSystem? remote)
{
    public async Task<GetStatusResponse> GetAsync(CancellationToken ct)
    {
        var snaps = await snapshotter.Remote.RemoteStatusAsync(ct).ConfigureAwait(false);
        var mounted = new Dictionary<string, MountedLayerInfo>(StringComparer.Ordinal);
        if (remote != null)
            foreach (var l in remote.Manager.Layers) mounted[l.MountPoint] = l;
        var resp = new GetStatusResponse { Time = Timestamp.FromDateTime(DateTime.UtcNow) };
        foreach (var s in snaps)
        {
            var mp = Path.GetFullPath(s.MountPoint);
            mounted.TryGetValue(mp, out var info);
            var layer = info != null ? remote!.Manager.GetLayer(mp) : null;
            resp.Layers.Add(Describe(s, info, layer?.ChunkCounts() ?? (0, 0)));
        }
        foreach (var f in snapshotter.Remote.RecentFallbacks())
            resp.Fallbacks.Add(new Fallback
            {
                Time = Timestamp.FromDateTime(DateTime.SpecifyKind(f.At, DateTimeKind.Utc)),
                Namespace = f.Namespace,
                SnapshotKey = f.Target,
                ImageReference = f.Reference,
                LayerDigest = f.Digest,
                Reason = f.Reason,
                Message = f.Message,
            });
        return resp;
    }

    /// <summary>One layer's status: the snapshotter's state, refined by the layer's own (mounted, fully fetched).</summary>
    public static LayerStatus Describe(RemoteSnapshotStatus s, MountedLayerInfo? info, (int Cached, int Total) chunks)
    {
        var st = new LayerStatus
        {
            Namespace = s.Namespace,
            SnapshotKey = s.Key,
            ImageReference = s.Reference,
            LayerDigest = s.Digest,
            MountPoint = s.MountPoint,
        };
        string? error = s.LastError;
        DateTime? since = s.UnavailableSince;
        switch (s.State)
        {
            case RemoteSnapshotState.Mounting: st.State = LayerState.Mounting; break;
            case RemoteSnapshotState.Unavailable: st.State = LayerState.Unavailable; break;
            default:
                if (info == null)
                {
                    // The store says remote, the layer manager has no mount: nothing can be read from it.
                    st.State = LayerState.Unavailable;
                    error ??= "the layer is not mounted";
                }
                else st.State = info.Promoted ? LayerState.Promoted : info.AllChunksFetched ? LayerState.FullyFetched : LayerState.Serving;
                break;
        }
        if (info != null)
        {
            var x = info.Stats;
            st.TocDigest = info.TocDigest;
            st.Size = x.BlobSize;
            st.FetchedBytes = x.FetchedBytes;
            st.FetchedOnDemandBytes = x.OnDemandFetchedBytes;
            st.FetchedPrefetchBytes = x.PrefetchFetchedFromRegistry;
            st.FetchedBackgroundBytes = x.BackgroundFetchedFromRegistry;
            st.FetchRequests = x.FetchCalls;
            st.CacheHits = x.CacheHits;
            st.CacheMisses = x.CacheMisses;
            st.HitRatio = x.CacheHits + x.CacheMisses > 0 ? (double)x.CacheHits / (x.CacheHits + x.CacheMisses) : 0;
            st.Errors = x.Errors;
            error ??= x.LastError;
            if (info.ErofsImage != null) st.ErofsImage = info.ErofsImage;
            st.Adopted = info.Adopted;
        }
        st.ChunksCached = chunks.Cached;
        st.ChunksTotal = chunks.Total;
        if (error != null) st.LastError = error;
        if (since is { } t && st.State == LayerState.Unavailable) st.UnavailableSince = Timestamp.FromDateTime(DateTime.SpecifyKind(t, DateTimeKind.Utc));
        return st;
    }
}

/// <summary>The status API (protos/stargz/status/v1/status.proto), served beside the snapshots service. A request
/// that is not valid protobuf gets InvalidArgument naming the method and message, as on the snapshots service
/// (<see cref="MalformedRequests"/>, bound by <see cref="BindService"/>).</summary>
[BindServiceMethod(typeof(StatusGrpcService), nameof(BindService))]
public sealed class StatusGrpcService(StatusSource source) : Stargz.StatusApi.V1.Status.StatusBase
{
    /// <summary>The generated binding with checking request marshallers (found by Grpc.AspNetCore through the attribute).</summary>
    public static void BindService(ServiceBinderBase binder, Stargz.StatusApi.V1.Status.StatusBase? service)
        => Stargz.StatusApi.V1.Status.BindService(MalformedRequests.Wrap(binder), service);

    public override Task<GetStatusResponse> Get(GetStatusRequest request, ServerCallContext context) => source.GetAsync(context.CancellationToken);
}
