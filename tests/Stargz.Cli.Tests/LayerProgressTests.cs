using Stargz.Containerd;
using Stargz.Converter;
using Stargz.Converter.Tests;
using Stargz.Registry;

namespace Stargz.Cli.Tests;

/// <summary>
/// The per-layer progress of `image convert` and `image rpull`: what the libraries report (a real conversion against
/// a real registry), how a report becomes a bar, and that without a terminal the commands keep their plain lines.
/// </summary>
public class LayerProgressTests(SourceImageFixture fixture) : IClassFixture<SourceImageFixture>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task ConversionReportsEveryLayerFromQueuedThroughItsBytesToDone()
    {
        var f = await fixture.GetAsync();
        var events = new List<LayerConvertProgress>();
        var hosts = new RegistryHostsConfig();
        hosts.Set(f.Registry.Host, new HostConfig { Origin = new EndpointConfig { Host = f.Registry.Host, PlainHttp = true } });
        using var client = new RegistryClient(hosts, new DockerConfigCredentialProvider());
        var src = ImageReference.Parse(f.Reference);
        await new ImageConverter(client).ConvertAsync(src, ImageReference.Parse($"{f.Registry.Host}/out/progress:esgz"),
            new ConvertOptions { LayerProgress = new InlineProgress<LayerConvertProgress>(e => { lock (events) events.Add(e); }) }, Ct);
        var manifest = await client.ResolveAsync(src, null, Ct);
        Assert.Equal(SourceImageFixture.LayerCount, manifest.Layers.Count);
        foreach (var layer in manifest.Layers)
        {
            var mine = events.Where(e => e.Digest == layer.Digest).ToList();
            Assert.Equal(LayerConvertStage.Queued, mine[0].Stage);
            Assert.Equal(LayerConvertStage.Done, mine[^1].Stage);
            Assert.All(mine, e => Assert.Equal(layer.Size, e.Size));
            // The download's bytes only grow, and reach the layer's size before it is pushed.
            var bytes = mine.Where(e => e.Stage == LayerConvertStage.Converting).Select(e => e.Bytes).ToList();
            Assert.Equal(bytes.Order(), bytes);
            Assert.Equal(layer.Size, bytes[^1]);
            var stages = mine.Select(e => e.Stage).Distinct().ToList();
            Assert.Equal([LayerConvertStage.Queued, LayerConvertStage.Converting, LayerConvertStage.Pushing, LayerConvertStage.Done], stages);
            var bar = LayerProgressView.Describe(mine[^1]);
            Assert.True(bar.Done && bar.Value == bar.Max && bar.Max == layer.Size);
        }
    }

    [Fact]
    public void PullStagesBecomeBarsThatEndFullForRemoteExistingAndAppliedLayers()
    {
        static LayerBar D(LayerPullStage s, long bytes = 0) => LayerProgressView.Describe(new LayerPullProgress(0, "sha256:x", 1000, s, bytes));
        Assert.Equal(new LayerBar("preparing", 0, 1000, false), D(LayerPullStage.Preparing));
        Assert.Equal(new LayerBar("downloading", 400, 1000, false), D(LayerPullStage.Downloading, 400));
        Assert.Equal(1000, D(LayerPullStage.Downloading, 5000).Value); // never past the end
        Assert.Equal(new LayerBar("applying", 1000, 1000, false), D(LayerPullStage.Applying, 1000));
        Assert.Equal(new LayerBar("applied", 1000, 1000, true), D(LayerPullStage.Applied, 1000));
        Assert.Equal(new LayerBar("remote snapshot (lazy)", 1000, 1000, true), D(LayerPullStage.Remote, 1000));
        Assert.Equal(new LayerBar("already unpacked", 1000, 1000, true), D(LayerPullStage.Existing, 1000));
        Assert.Equal("copying (already eStargz)", LayerProgressView.Describe(new LayerConvertProgress("d", 10, LayerConvertStage.Copying, 3)).Status);
    }

    [Fact]
    public void WithoutATerminalTheCommandsPrintLinesNotBars()
    {
        // The commands' writers in the tests (and any redirected stdout) are not a terminal: lines, as ctr-remote prints.
        Assert.False(LayerProgressView.UseBars(new StringWriter()));
    }
}
