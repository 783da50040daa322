using Microsoft.Extensions.Logging;

namespace Stargz.Cli.Tests;

public class OptimizeArgsTests
{
    [Fact]
    public void DefaultsRunTheImagesOwnCommandOnOverlayfsForTenSeconds()
    {
        var a = OptimizeCommand.Parse(["127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:opt"]);
        Assert.Equal("127.0.0.1:5000/app:v1", a.Source.ToString());
        Assert.Equal("127.0.0.1:5000/app:opt", a.Target.ToString());
        Assert.Empty(a.Command);
        Assert.Equal("/run/containerd/containerd.sock", a.Address);
        Assert.Equal("overlayfs", a.Snapshotter);
        Assert.Equal(TimeSpan.FromSeconds(10), a.Period);
        Assert.False(a.PlainHttp);
        Assert.False(a.Zstd);
        Assert.Null(a.RuncRoot);
        Assert.Equal(LogLevel.Warning, a.LogLevel);
    }

    [Fact]
    public void EverythingAfterDoubleDashIsTheCommandEvenWhatLooksLikeAFlag()
    {
        var a = OptimizeCommand.Parse(["--plain-http", "--zstd", "--period=2.5", "-a", "/tmp/c.sock", "-n", "ns", "--runc-root", "/tmp/runc",
            "r/a:1", "r/b:2", "--", "/bin/sh", "-c", "cat /x --period 3", "--zstd"]);
        Assert.True(a.PlainHttp);
        Assert.True(a.Zstd);
        Assert.Equal(TimeSpan.FromSeconds(2.5), a.Period);
        Assert.Equal("/tmp/c.sock", a.Address);
        Assert.Equal("ns", a.Namespace);
        Assert.Equal("/tmp/runc", a.RuncRoot);
        Assert.Equal(["/bin/sh", "-c", "cat /x --period 3", "--zstd"], a.Command);
    }

    [Theory]
    [InlineData("one argument", "r/a:1")]
    [InlineData("three arguments", "r/a:1", "r/b:1", "r/c:1")]
    [InlineData("empty command", "r/a:1", "r/b:1", "--")]
    [InlineData("zero period", "--period", "0", "r/a:1", "r/b:1")]
    [InlineData("period not a number", "--period", "soon", "r/a:1", "r/b:1")]
    [InlineData("unknown flag", "--frobnicate", "r/a:1", "r/b:1")]
    [InlineData("bad reference", "r/A:1", "r/b:1")]
    [InlineData("bad log level", "--log-level", "loud", "r/a:1", "r/b:1")]
    public void BadUsageIsAUsageError(string why, params string[] args)
    {
        var e = Assert.Throws<UsageException>(() => OptimizeCommand.Parse(args));
        Assert.False(string.IsNullOrEmpty(e.Message), why);
    }

    [Fact]
    public async Task BadUsageExitsTwoWithTheUsage()
    {
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(2, await OptimizeCommand.RunAsync(["r/a:1"], stdout, stderr, TestContext.Current.CancellationToken));
        Assert.Contains("wants SRC and DST", stderr.ToString());
        Assert.Contains("stargz image optimize", stderr.ToString());
    }

    [Fact]
    public async Task HelpPrintsTheUsageAndExitsZero()
    {
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(0, await OptimizeCommand.RunAsync(["--help"], stdout, stderr, TestContext.Current.CancellationToken));
        Assert.Contains("stargz image optimize", stdout.ToString());
        Assert.Contains("--period", stdout.ToString());
        Assert.Equal("", stderr.ToString());
    }

    [Fact]
    public async Task AMissingContainerdSocketIsNamed()
    {
        var (stdout, stderr) = (new StringWriter(), new StringWriter());
        Assert.Equal(1, await OptimizeCommand.RunAsync(["--address", "/nonexistent/c.sock", "r/a:1", "r/b:1"], stdout, stderr, TestContext.Current.CancellationToken));
        Assert.Contains("/nonexistent/c.sock does not exist", stderr.ToString());
    }
}
