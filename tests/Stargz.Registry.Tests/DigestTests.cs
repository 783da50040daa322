using System.Security.Cryptography;
using System.Text;

namespace Stargz.Registry.Tests;

/// <summary>The digest value type every project parses and formats digests with (src/Stargz.Oci).</summary>
public class DigestTests
{
    // sha256("hello")
    private const string Hello = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    [Fact]
    public void Parses_and_formats_algorithm_and_hex()
    {
        var d = Digest.Parse(Hello);
        Assert.Equal("sha256", d.Algorithm);
        Assert.Equal(Hello[7..], d.Hex);
        Assert.True(d.IsSha256);
        Assert.Equal(Hello, d.ToString());
        Assert.Equal(d, Digest.Parse(Hello));
        var sha512 = "sha512:" + new string('a', 128);
        Assert.False(Digest.Parse(sha512).IsSha256);
        Assert.Equal(sha512, Digest.Parse(sha512).ToString());
    }

    [Fact]
    public void Hashes_data_and_matches_it()
    {
        var data = Encoding.ASCII.GetBytes("hello");
        Assert.Equal(Hello, Digest.Sha256Of(data).ToString());
        Assert.Equal(Hello, Digest.FromSha256(SHA256.HashData(data)).ToString());
        using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        h.AppendData(data.AsSpan(0, 2));
        h.AppendData(data.AsSpan(2));
        Assert.Equal(Hello, Digest.FromSha256(h).ToString());
        Assert.True(Digest.Parse(Hello).Matches(data));
        Assert.False(Digest.Parse(Hello).Matches(Encoding.ASCII.GetBytes("hellO")));
        Assert.Throws<ArgumentException>(() => Digest.FromSha256(new byte[20]));
        using var md5 = IncrementalHash.CreateHash(HashAlgorithmName.MD5);
        Assert.Throws<ArgumentException>(() => Digest.FromSha256(md5));
    }

    [Theory]
    [InlineData("", "empty")]
    [InlineData("2cf24dba", "not algorithm:hex")]
    [InlineData("sha256:", "not algorithm:hex")]
    [InlineData(":abc", "not algorithm:hex")]
    [InlineData("md5:0123", "unsupported digest algorithm \"md5\"")]
    [InlineData("sha256:abc", "sha256 wants 64 lowercase hex characters")]
    [InlineData("sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824", "lowercase hex")]
    [InlineData("sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b982g", "lowercase hex")]
    [InlineData("sha512:abcd", "sha512 wants 128")]
    public void Bad_digests_say_why(string input, string why)
    {
        var e = Assert.Throws<FormatException>(() => Digest.Parse(input));
        Assert.Contains(why, e.Message);
        Assert.Contains($"\"{input}\"", e.Message);
        Assert.False(Digest.TryParse(input, out var d, out var error));
        Assert.Contains(why, error);
        Assert.True(d.IsEmpty);
        Assert.False(Digest.TryParse(input, out _));
    }

    [Fact]
    public void Default_is_no_digest()
    {
        Digest d = default;
        Assert.True(d.IsEmpty);
        Assert.False(d.IsSha256);
        Assert.Equal("", d.ToString());
        Assert.Equal("", d.Algorithm);
        Assert.False(d.Matches([]));
        Assert.False(Digest.TryParse(null, out _));
    }
}
