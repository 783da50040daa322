using Microsoft.Extensions.Logging;

namespace Stargz.Cli.Tests;

public class RpullArgsTests
{
    [Fact]
    public void DefaultsAreThoseOfCtrRemote()
    {
        var a = RpullCommand.Parse(["127.0.0.1:5000/app:esgz"]);
        Assert.Equal("/run/containerd/containerd.sock", a.Address);
        Assert.Equal(Environment.GetEnvironmentVariable("CONTAINERD_NAMESPACE") is { Length: > 0 } ns ? ns : "default", a.Namespace);
        Assert.Equal("stargz", a.Snapshotter);
        Assert.False(a.PlainHttp);
        Assert.Null(a.User);
        Assert.Equal(LogLevel.Warning, a.LogLevel);
        Assert.Empty(a.Labels);
        Assert.False(a.SkipContentVerify);
        Assert.Equal("127.0.0.1:5000/app:esgz", a.Reference);
    }

    [Fact]
    public void FlagsTakeValuesSeparatelyOrWithEquals()
    {
        var a = RpullCommand.Parse(["--address=/tmp/c.sock", "-n", "k8s.io", "--snapshotter", "overlayfs", "--plain-http", "--user", "u:p:x",
            "--platform", "linux/arm64/v8", "--label", "a=1", "--label=b=2=3", "--log-level", "debug", "--skip-content-verify", "r/x:y"]);
        Assert.Equal("/tmp/c.sock", a.Address);
        Assert.Equal("k8s.io", a.Namespace);
        Assert.Equal("overlayfs", a.Snapshotter);
        Assert.True(a.PlainHttp);
        Assert.Equal("u:p:x", a.User);
        Assert.Equal("linux/arm64/v8", a.Platform.ToString());
        Assert.Equal("1", a.Labels["a"]);
        Assert.Equal("2=3", a.Labels["b"]);
        Assert.Equal(LogLevel.Debug, a.LogLevel);
        Assert.True(a.SkipContentVerify);
        Assert.Equal("r/x:y", a.Reference);
    }

    [Theory]
    [InlineData("needs an image reference")]
    [InlineData("takes one image reference", "a", "b")]
    [InlineData("unknown flag --skip-verify", "--skip-verify", "a")]
    [InlineData("--address needs a value", "a", "--address")]
    [InlineData("--user wants USER:PASSWORD", "--user", "nocolon", "a")]
    [InlineData("--label x: want KEY=VALUE", "--label", "x", "a")]
    [InlineData("--log-level loud", "--log-level", "loud", "a")]
    [InlineData("invalid platform", "--platform", "linux", "a")]
    [InlineData("must not be empty", "--namespace", "", "a")]
    [InlineData("--hosts-dir /no/such/dir: no such directory", "--hosts-dir", "/no/such/dir", "a")]
    public void BadArgumentsAreUsageErrorsThatSayWhy(string message, params string[] args)
    {
        var e = Assert.Throws<UsageException>(() => RpullCommand.Parse(args));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public async Task UsageErrorsExit2AndAMissingSocketExits1()
    {
        var o = new StringWriter();
        var e = new StringWriter();
        Assert.Equal(2, await RpullCommand.RunAsync(["--bogus", "a"], o, e, TestContext.Current.CancellationToken));
        Assert.Contains("unknown flag --bogus", e.ToString());
        e = new StringWriter();
        Assert.Equal(2, await RpullCommand.RunAsync(["UPPER/case:x"], o, e, TestContext.Current.CancellationToken));
        Assert.Contains("invalid image reference", e.ToString());
        e = new StringWriter();
        var sock = Path.Combine(Path.GetTempPath(), "no-such-" + Guid.NewGuid().ToString("N") + ".sock");
        Assert.Equal(1, await RpullCommand.RunAsync(["--address", sock, "r/x:y"], o, e, TestContext.Current.CancellationToken));
        Assert.Contains($"containerd socket {sock} does not exist", e.ToString());
    }
}
