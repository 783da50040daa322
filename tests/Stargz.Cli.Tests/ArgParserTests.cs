namespace Stargz.Cli.Tests;

/// <summary>The one parser every `stargz` command uses: what a user may type and what it refuses.</summary>
public class ArgParserTests
{
    private static ArgParser Parser() => new ArgParser()
        .Value("--chunk-size", "-c").Value("--prioritize").Switch("--zstd", "--zstdchunked");

    [Fact]
    public void ValuesComeSeparatelyOrAfterEquals_AliasesShareAKey_AndTheLastValueWins()
    {
        var a = Parser().Parse(["--chunk-size", "10", "-c", "20", "--chunk-size=30", "--prioritize=/a=b", "--prioritize", "/c",
            "--zstdchunked", "in", "-", "out"]);
        Assert.Equal("30", a.Last("--chunk-size"));
        Assert.Equal(["10", "20", "30"], a.All("--chunk-size"));
        Assert.Equal(["/a=b", "/c"], a.All("--prioritize"));
        Assert.True(a.Has("--zstd"));
        Assert.Equal(["in", "-", "out"], a.Positional);
    }

    [Fact]
    public void AbsentOptionsAreNullOrEmpty()
    {
        var a = Parser().Parse(["x"]);
        Assert.False(a.Has("--zstd"));
        Assert.Null(a.Last("--chunk-size"));
        Assert.Null(a.Int("--chunk-size"));
        Assert.Empty(a.All("--prioritize"));
    }

    [Fact]
    public void ASwitchGivenAValueIsStillOn()
    {
        Assert.True(Parser().Parse(["--zstd=false"]).Has("--zstd"));
    }

    [Theory]
    [InlineData("unknown flag --bogus", "--bogus")]
    [InlineData("unknown flag --bogus", "--bogus=1")]
    [InlineData("unknown flag -x", "-x")]
    [InlineData("--chunk-size needs a value", "in", "--chunk-size")]
    [InlineData("-c needs a value", "-c")]
    public void BadCommandLinesSayWhy(string message, params string[] args)
    {
        var e = Assert.Throws<UsageException>(() => Parser().Parse(args));
        Assert.Equal(message, e.Message);
    }

    [Fact]
    public void IntegersAreCheckedAgainstTheirMinimum()
    {
        Assert.Equal(7, Parser().Parse(["-c", "7"]).Int("--chunk-size", min: 1));
        Assert.Equal(-3, Parser().Parse(["-c", "-3"]).Int("--chunk-size"));
        var e = Assert.Throws<UsageException>(() => Parser().Parse(["-c", "0"]).Int("--chunk-size", min: 1));
        Assert.Equal("--chunk-size wants an integer of at least 1, not \"0\"", e.Message);
        e = Assert.Throws<UsageException>(() => Parser().Parse(["-c", "many"]).Int("--chunk-size"));
        Assert.Equal("--chunk-size wants an integer, not \"many\"", e.Message);
    }
}
