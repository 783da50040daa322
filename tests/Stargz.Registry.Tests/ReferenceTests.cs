namespace Stargz.Registry.Tests;

public class ReferenceTests
{
    [Theory]
    [InlineData("busybox", "docker.io", "library/busybox", "latest", null, "docker.io/library/busybox:latest")]
    [InlineData("library/busybox:1.36", "docker.io", "library/busybox", "1.36", null, "docker.io/library/busybox:1.36")]
    [InlineData("index.docker.io/foo/bar", "docker.io", "foo/bar", "latest", null, "docker.io/foo/bar:latest")]
    [InlineData("ghcr.io/stargz-containers/python:3.9-esgz", "ghcr.io", "stargz-containers/python", "3.9-esgz", null, "ghcr.io/stargz-containers/python:3.9-esgz")]
    [InlineData("127.0.0.1:5000/img:esgz", "127.0.0.1:5000", "img", "esgz", null, "127.0.0.1:5000/img:esgz")]
    [InlineData("localhost/a/b/c", "localhost", "a/b/c", "latest", null, "localhost/a/b/c:latest")]
    [InlineData("[::1]:5000/x/y:t", "[::1]:5000", "x/y", "t", null, "[::1]:5000/x/y:t")]
    [InlineData("reg.example.com:443/a-b__c.d/e@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "reg.example.com:443", "a-b__c.d/e", null, "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "reg.example.com:443/a-b__c.d/e@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")]
    [InlineData("busybox:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "docker.io", "library/busybox", "1",
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "docker.io/library/busybox:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")]
    public void Parse_normalises(string input, string host, string repo, string? tag, string? digest, string full)
    {
        var r = ImageReference.Parse(input);
        Assert.Equal(host, r.Host);
        Assert.Equal(repo, r.Repository);
        Assert.Equal(tag, r.Tag);
        Assert.Equal(digest, r.Digest);
        Assert.Equal(full, r.ToString());
        Assert.Equal(r, ImageReference.Parse(full));
    }

    [Fact]
    public void Docker_hub_is_contacted_at_registry_1()
    {
        Assert.Equal("registry-1.docker.io", ImageReference.Parse("busybox").ApiHost);
        Assert.Equal("127.0.0.1:5000", ImageReference.Parse("127.0.0.1:5000/x").ApiHost);
        var d = ImageReference.Parse("busybox:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        Assert.Equal(d.Digest, d.ManifestReference);
    }

    [Theory]
    [InlineData("", "empty")]
    [InlineData("Busybox", "lowercase")]
    [InlineData("docker.io/UPPER/x", "lowercase")]
    [InlineData("http://127.0.0.1:5000/x", "scheme")]
    [InlineData("a//b", "invalid repository path component")]
    [InlineData("busybox:", "invalid tag")]
    [InlineData("busybox:-bad", "invalid tag")]
    [InlineData("busybox@sha256:abc", "64 lowercase hex")]
    [InlineData("busybox@md5:0123", "unsupported digest algorithm")]
    [InlineData("host:99999/x", "invalid port")]
    [InlineData("[::1/x", "IPv6")]
    [InlineData("[zz]:5000/x", "IPv6")]
    [InlineData("reg.example.com/", "missing repository")]
    public void Invalid_references_say_why(string input, string why)
    {
        var e = Assert.Throws<InvalidReferenceException>(() => ImageReference.Parse(input));
        Assert.Contains(why, e.Message);
        Assert.Equal(input, e.Input);
        Assert.False(ImageReference.TryParse(input, out _));
    }

    [Fact]
    public void Platform_matching_treats_arm64_without_variant_as_v8()
    {
        Assert.True(Platform.Parse("linux/arm64").Matches(new Platform("linux", "arm64", "v8")));
        Assert.True(Platform.Parse("linux/arm64/v8").Matches(new Platform("linux", "arm64")));
        Assert.False(Platform.Parse("linux/arm/v7").Matches(new Platform("linux", "arm", "v6")));
        Assert.False(Platform.Parse("linux/amd64").Matches(new Platform("windows", "amd64")));
        Assert.Throws<FormatException>(() => Platform.Parse("linux"));
    }
}
