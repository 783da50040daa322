using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// `[fuse] passthrough = true` with real containerd, runc and registry: once a lazily pulled image is fully fetched,
/// a big file opened by one container gets a whole-file copy, and the next container reads it through the kernel.
/// </summary>
public class PassthroughTests
{
    [Fact]
    public async Task WithPassthroughAFetchedBigFileIsReadByTheKernelInTheNextContainer()
    {
        Requires.PassthroughKernel();
        await using var rig = await OutageRig.StartAsync(backgroundFetch: true, extraToml: "[fuse]\npassthrough = true\n");
        // 12 MiB: several of ctr-remote's 4 MiB chunks.
        var img = await rig.PushImageAsync("passthrough/big", new Dictionary<string, int> { ["big.bin"] = 12 * 1024, ["small.bin"] = 64 }, seed: 901);
        await rig.RpullAsync(img.Estargz);
        Assert.Equal(2, await rig.WaitMetricAsync("stargz_layers_fully_fetched", v => v == 2, TimeSpan.FromSeconds(120)));

        // A first container opens the file and reads one byte: the daemon serves it and builds the copy.
        (await rig.RunAsync(img.Estargz, "pt-open", "head -c 1 /data/big.bin > /dev/null")).EnsureSuccess("head in the first container");
        Assert.Equal(1, await rig.WaitMetricAsync("stargz_assembled_files_built", v => v >= 1, TimeSpan.FromSeconds(60)));

        // The next container reads all 12 MiB right, and they do not come through the daemon: without passthrough
        // the ~11 MiB the first one never read would take at least 11 READs of 1 MiB.
        var opens = await rig.MetricAsync("stargz_layer_passthrough_opens");
        var reads = await rig.MetricAsync("stargz_layer_fuse_read_requests");
        Assert.Equal(img.Sha256["big.bin"], await rig.Sha256InContainerAsync(img.Estargz, "pt-read", "big.bin"));
        Assert.True(await rig.MetricAsync("stargz_layer_passthrough_opens") > opens, "no open was answered with a backing file");
        var readsDuring = await rig.MetricAsync("stargz_layer_fuse_read_requests") - reads;
        Assert.True(readsDuring <= 2, $"{readsDuring} READs reached the daemon while the container read the 12 MiB file");
    }
}
