using Stargz.Daemon;
using Stargz.Layer;
using Stargz.Snapshotter;
using Stargz.StatusApi.V1;

namespace Stargz.Daemon.Tests;

/// <summary>How the status API combines the snapshotter's view of a remote snapshot with its layer's statistics.</summary>
public class StatusServiceTests
{
    private static readonly DateTime Since = new(2026, 12, 5, 11, 0, 0, DateTimeKind.Utc);

    private static RemoteSnapshotStatus Snap(RemoteSnapshotState state, DateTime? since = null, string? error = null) =>
        new("default", "sha256:chain", 7, "/root/snapshots/7/fs", "r.example/app:esgz", "sha256:layer", state, since, error);

    private static MountedLayerInfo Info(bool complete, long hits, long misses) => new("/root/snapshots/7/fs", "r.example/app:esgz", "sha256:layer",
        "sha256:toc", new LayerStatsSnapshot(BlobSize: 4096, FetchedBytes: 3000, RangeRequests: 5, FetchCalls: 4, ChunksFetched: 6, CacheHits: hits,
            CacheMisses: misses, Errors: 1, Prefetch: FetchStageState.Done, PrefetchTotalBytes: 1000, PrefetchFetchedBytes: 1000,
            Background: FetchStageState.Running, BackgroundTotalBytes: 3000, BackgroundDoneBytes: 500, LastError: "prefetch: boom",
            OnDemandFetchedBytes: 1500, PrefetchFetchedFromRegistry: 1000, BackgroundFetchedFromRegistry: 500), complete, 0, 0);

    [Fact]
    public void A_promoted_layer_shows_its_image_and_an_adopted_one_says_so()
    {
        var promoted = StatusSource.Describe(Snap(RemoteSnapshotState.Mounted),
            Info(true, 0, 0) with { Promoted = true, ErofsImage = "/root/stargz/erofs/sha256-x.erofs" }, (10, 10));
        Assert.Equal(LayerState.Promoted, promoted.State);
        Assert.Equal("/root/stargz/erofs/sha256-x.erofs", promoted.ErofsImage);
        Assert.False(promoted.Adopted);
        var adopted = StatusSource.Describe(Snap(RemoteSnapshotState.Mounted), Info(false, 0, 0) with { Adopted = true }, (1, 10));
        Assert.Equal(LayerState.Serving, adopted.State);
        Assert.True(adopted.Adopted);
        Assert.Equal("", adopted.ErofsImage);
    }

    [Fact]
    public void AMountedLayerIsServingWithItsBytesByWhoAskedAndItsHitRatio()
    {
        var s = StatusSource.Describe(Snap(RemoteSnapshotState.Mounted), Info(false, 3, 1), (6, 10));
        Assert.Equal(LayerState.Serving, s.State);
        Assert.Equal(("sha256:chain", "r.example/app:esgz", "sha256:layer", "sha256:toc"), (s.SnapshotKey, s.ImageReference, s.LayerDigest, s.TocDigest));
        Assert.Equal((4096L, 3000L, 1500L, 1000L, 500L, 4L), (s.Size, s.FetchedBytes, s.FetchedOnDemandBytes, s.FetchedPrefetchBytes, s.FetchedBackgroundBytes, s.FetchRequests));
        Assert.Equal((6, 10), (s.ChunksCached, s.ChunksTotal));
        Assert.Equal(0.75, s.HitRatio);
        Assert.Equal("prefetch: boom", s.LastError);
        Assert.Null(s.UnavailableSince);
    }

    [Fact]
    public void StatesFollowTheSnapshotterThenTheLayer()
    {
        Assert.Equal(LayerState.FullyFetched, StatusSource.Describe(Snap(RemoteSnapshotState.Mounted), Info(true, 0, 0), (10, 10)).State);
        Assert.Equal(0, StatusSource.Describe(Snap(RemoteSnapshotState.Mounted), Info(true, 0, 0), (10, 10)).HitRatio);
        Assert.Equal(LayerState.Mounting, StatusSource.Describe(Snap(RemoteSnapshotState.Mounting), null, (0, 0)).State);
        var down = StatusSource.Describe(Snap(RemoteSnapshotState.Unavailable, Since, "registry r.example: connection refused"), Info(false, 1, 1), (1, 10));
        Assert.Equal(LayerState.Unavailable, down.State);
        Assert.Equal(Since, down.UnavailableSince.ToDateTime());
        Assert.Equal("registry r.example: connection refused", down.LastError); // the snapshotter's error before the layer's
        var lost = StatusSource.Describe(Snap(RemoteSnapshotState.Mounted), null, (0, 0));
        Assert.Equal(LayerState.Unavailable, lost.State);
        Assert.Equal("the layer is not mounted", lost.LastError);
    }
}
