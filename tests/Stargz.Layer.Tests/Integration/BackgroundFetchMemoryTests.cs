using Stargz.Estargz;
using Stargz.Layer.Tests.Support;
using Stargz.Layer.Tests.Unit;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// What the background fetch of a real layer from a real registry allocates, counted over the whole process, so it
/// runs alone (<see cref="AllocationCollection"/>).
/// </summary>
[Collection(nameof(AllocationCollection))]
public class BackgroundFetchMemoryTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private const int FileBytes = 4 << 20;

    private static async Task<(byte[] Blob, BuildResult Built)> BulkLayerAsync(int files, int seed)
    {
        var tar = TestTars.Write(w =>
        {
            for (var i = 0; i < files; i++) TestTars.File(w, $"bulk{i:D2}.bin", TestTars.Random(FileBytes, seed + i));
        });
        // 4 MiB chunks and batches, as ctr-remote's layers and the daemon's defaults have them.
        return await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 4 << 20, CompressionLevel = 1 }, Ct);
    }

    private static async Task<RemoteLayer> MountAndFetchAsync(LayerRig rig, string repo, string digest, BuildResult built)
    {
        // Straight to the registry: the counting proxy runs in this process and would be counted too.
        var labels = rig.Labels(repo, digest, built.TocDigest);
        labels[SnapshotLabels.Reference] = $"{rig.Registry.Host}/{repo}:latest";
        var layer = rig.Manager.GetLayer(await rig.MountAsync(labels, Ct))!;
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(120), Ct);
        Assert.Equal(FetchStageState.Done, layer.Stats.Snapshot().Background);
        return layer;
    }

    [Fact]
    public async Task TheBackgroundFetchOfALayerAllocatesFarLessThanTheLayer()
    {
        const int Files = 16;
        var (warmBlob, warmBuilt) = await BulkLayerAsync(2, 600);
        var (blob, built) = await BulkLayerAsync(Files, 700);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { BackgroundPause = TimeSpan.FromMilliseconds(1) });
        // A first layer warms up what is made once (connections, the buffers' pools).
        await MountAndFetchAsync(rig, "bgmem/warm", await rig.PushAsync("bgmem/warm", warmBlob, Ct), warmBuilt);
        var digest = await rig.PushAsync("bgmem/layer", blob, Ct);
        var before = GC.GetTotalAllocatedBytes(precise: true);
        await MountAndFetchAsync(rig, "bgmem/layer", digest, built);
        var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        TestContext.Current.TestOutputHelper?.WriteLine($"mount + background fetch of {Files} x 4 MiB: {allocated} bytes allocated");
        Assert.True(allocated < Files * (long)FileBytes / 4, $"{allocated} bytes allocated for a {Files * FileBytes}-byte layer");
    }
}
