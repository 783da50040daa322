using Stargz.Estargz;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Converter.Tests;

[CollectionDefinition(nameof(AloneCollection), DisableParallelization = true)]
public sealed class AloneCollection;

/// <summary>
/// A layer much larger than what the converter may hold in memory: converting it must stream (registry -> decompress ->
/// builder -> temp file -> registry), so the live managed heap grows far less than the layer size. Runs alone so the
/// heap samples are this test's.
/// </summary>
[Collection(nameof(AloneCollection))]
public class LargeLayerTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task A_layer_of_64_MiB_converts_without_the_live_heap_growing_by_its_size()
    {
        Requires.Command("docker-registry");
        Requires.Command("umoci");
        Requires.Command("skopeo");
        const int megabytes = 64;
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("convert-large");
        var layer = work.Sub("layer");
        Directory.CreateDirectory(Path.Combine(layer, "data"));
        var rng = new Random(99);
        var buf = new byte[1 << 20];
        await using (var fs = File.Create(Path.Combine(layer, "data", "big.bin")))
            for (var i = 0; i < megabytes; i++)
            {
                rng.NextBytes(buf);
                await fs.WriteAsync(buf, Ct);
            }
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [layer]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "big/img:v1");

        using var client = new RegistryClient();
        var src = ImageReference.Parse($"{registry.Host}/big/img:v1");
        var dst = ImageReference.Parse($"{registry.Host}/big/img:esgz");

        // A first conversion fills the shared array pools (the builder's member buffers, the download buffers): those
        // stay pooled, bounded by the pools, whatever the layer size. The second conversion, into another repository
        // (so its blob is uploaded again), is the one measured.
        await new ImageConverter(client).ConvertAsync(src, dst, new ConvertOptions { WorkDirectory = work.Path, CompressionLevel = 1 }, Ct);
        dst = ImageReference.Parse($"{registry.Host}/big/second:esgz");
        GC.Collect();
        GC.WaitForPendingFinalizers();
        GC.Collect();
        var baseline = GC.GetTotalMemory(true);
        long peak = 0;
        using var stop = new CancellationTokenSource();
        var sampler = Task.Run(async () =>
        {
            // Live memory, not garbage: a full collection before each sample (cheap on a small heap).
            while (!stop.IsCancellationRequested)
            {
                GC.Collect(2, GCCollectionMode.Forced, blocking: true);
                peak = Math.Max(peak, GC.GetTotalMemory(false));
                try { await Task.Delay(20, stop.Token); } catch (OperationCanceledException) { }
            }
        }, Ct);
        ConvertResult result;
        try
        {
            result = await new ImageConverter(client).ConvertAsync(src, dst, new ConvertOptions { WorkDirectory = work.Path, CompressionLevel = 1 }, Ct);
        }
        finally
        {
            await stop.CancelAsync();
            await sampler;
        }
        var grewMiB = (peak - baseline) / (1 << 20);
        Assert.True(grewMiB < megabytes / 2, $"live managed heap grew by {grewMiB} MiB while converting a {megabytes} MiB layer");

        // And the result is right: a valid eStargz blob whose big file reads back whole.
        var l = result.Manifests.Single().Layers.Single();
        Assert.True(l.Target.Size > megabytes << 20);
        var path = Path.Combine(work.Path, "out.blob");
        await using (var fs = File.Create(path))
            await client.DownloadBlobAsync(dst, l.Target.Digest, fs, Ct);
        using var blob = new FileBlobSource(path);
        var reader = await EstargzReader.OpenAsync(blob, l.TocDigest, ct: Ct);
        var node = reader.Lookup("data/big.bin")!;
        Assert.Equal((long)megabytes << 20, node.Size);
        Assert.Equal(megabytes / 4, node.Chunks.Count);
        var last = new byte[1 << 20];
        await reader.ReadFileAsync(node, ((long)megabytes - 1) << 20, last, Ct);
        Assert.Equal(buf, last);
        Assert.Equal(l.DiffId, await reader.ComputeDiffIdAsync(Ct));
    }
}
