using Stargz.Converter.Tests;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Cli.Tests;

/// <summary>`stargz image convert` against a real registry: what it prints, what it pushes, how it refuses bad usage.</summary>
public class ConvertCommandTests(SourceImageFixture fixture) : IClassFixture<SourceImageFixture>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Command_converts_and_prints_one_line_per_layer_or_explains_bad_usage()
    {
        var f = await fixture.GetAsync();
        var dst = $"{f.Registry.Host}/out/cli:esgz";
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        var code = await ConvertCommand.RunAsync(["--plain-http", "--chunk-size", "1048576", "--prioritize", "/data/hello.txt", f.Reference, dst],
            stdout, stderr, Ct);
        Assert.True(code == 0, stderr.ToString());
        var lines = stdout.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Equal(SourceImageFixture.LayerCount, lines.Count(l => l.StartsWith("layer ", StringComparison.Ordinal) && l.Contains(" converted")));
        using var client = new RegistryClient();
        var m = await client.ResolveAsync(ImageReference.Parse(dst), null, Ct);
        Assert.Contains(m.Digest, lines[^1]);
        foreach (var l in m.Layers)
            Assert.Contains(lines, x => x.Contains(l.Digest) && x.Contains("toc=" + l.Annotation(LayerLabels.TocDigestAnnotation)));

        var help = new StringWriter();
        Assert.Equal(0, await ConvertCommand.RunAsync(["--help"], help, new StringWriter(), Ct));
        Assert.Contains("--zstd", help.ToString());
        var err = new StringWriter();
        Assert.Equal(2, await ConvertCommand.RunAsync(["--chunk-size", "zero", f.Reference, dst], new StringWriter(), err, Ct));
        Assert.Contains("--chunk-size", err.ToString());
        err = new StringWriter();
        Assert.Equal(2, await ConvertCommand.RunAsync([f.Reference], new StringWriter(), err, Ct));
        Assert.Contains("SRC and DST", err.ToString());
        err = new StringWriter();
        Assert.Equal(1, await ConvertCommand.RunAsync([$"{f.Registry.Host}/src/nothing:here", dst], new StringWriter(), err, Ct));
        Assert.Contains("src/nothing", err.ToString());
        using var cancelled = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        await cancelled.CancelAsync();
        Assert.Equal(130, await ConvertCommand.RunAsync(["--zstd", f.Reference, $"{f.Registry.Host}/out/cli:zstd"], new StringWriter(), new StringWriter(), cancelled.Token));
    }
}
