using System.Diagnostics.CodeAnalysis;
using System.Security.Cryptography;

namespace Stargz;

/// <summary>
/// An OCI content digest, <c>algorithm:hex</c>: <c>sha256</c> with 64 lowercase hex characters or <c>sha512</c> with 128
/// (the algorithms the image spec registers). Parsed once, compared by value, formatted without allocating
/// (<see cref="ToString"/> returns the string it was made from). <c>default</c> is no digest (<see cref="IsEmpty"/>).
/// </summary>
public readonly record struct Digest
{
    public const string Sha256 = "sha256";
    public const string Sha512 = "sha512";

    // The whole "algorithm:hex"; Algorithm and Hex are cut from it when asked for.
    private readonly string? _value;

    private Digest(string value) => _value = value;

    /// <summary>"sha256" or "sha512"; empty for <c>default</c>.</summary>
    public string Algorithm => _value is null ? "" : _value[.._value.IndexOf(':')];
    /// <summary>The lowercase hex after the colon; empty for <c>default</c>.</summary>
    public string Hex => _value is null ? "" : _value[(_value.IndexOf(':') + 1)..];
    public bool IsSha256 => _value is not null && _value.StartsWith("sha256:", StringComparison.Ordinal);
    public bool IsEmpty => _value is null;

    /// <summary>"algorithm:hex" (empty for <c>default</c>).</summary>
    public override string ToString() => _value ?? "";

    /// <summary>Parses <c>algorithm:hex</c>; a <see cref="FormatException"/> says what is wrong and shows the input.</summary>
    public static Digest Parse(string s)
    {
        ArgumentNullException.ThrowIfNull(s);
        return TryParse(s, out var d, out var error) ? d : throw new FormatException($"invalid digest \"{s}\": {error}");
    }

    public static bool TryParse([NotNullWhen(true)] string? s, out Digest digest) => TryParse(s, out digest, out _);

    /// <summary>Like <see cref="Parse"/> without throwing; <paramref name="error"/> says why it is not a digest.</summary>
    public static bool TryParse([NotNullWhen(true)] string? s, out Digest digest, [NotNullWhen(false)] out string? error)
    {
        digest = default;
        if (string.IsNullOrEmpty(s)) { error = "empty"; return false; }
        var c = s.IndexOf(':');
        if (c <= 0 || c == s.Length - 1) { error = "not algorithm:hex"; return false; }
        var alg = s.AsSpan(0, c);
        var want = alg.SequenceEqual(Sha256) ? 64 : alg.SequenceEqual(Sha512) ? 128 : -1;
        if (want < 0) { error = $"unsupported digest algorithm \"{alg}\" (sha256 or sha512)"; return false; }
        var hex = s.AsSpan(c + 1);
        if (hex.Length != want || !IsLowerHex(hex)) { error = $"{alg} wants {want} lowercase hex characters"; return false; }
        digest = new Digest(s);
        error = null;
        return true;
    }

    /// <summary>The sha256 digest whose hash is <paramref name="hash"/> (32 bytes).</summary>
    public static Digest FromSha256(ReadOnlySpan<byte> hash)
    {
        if (hash.Length != SHA256.HashSizeInBytes)
            throw new ArgumentException($"a sha256 hash is {SHA256.HashSizeInBytes} bytes, not {hash.Length}", nameof(hash));
        return new Digest("sha256:" + Convert.ToHexStringLower(hash));
    }

    /// <summary>The sha256 digest of <paramref name="data"/>.</summary>
    public static Digest Sha256Of(ReadOnlySpan<byte> data)
    {
        Span<byte> h = stackalloc byte[SHA256.HashSizeInBytes];
        SHA256.HashData(data, h);
        return FromSha256(h);
    }

    /// <summary>The sha256 digest of what <paramref name="hash"/> took in (the hash is reset, as GetHashAndReset does).</summary>
    public static Digest FromSha256(IncrementalHash hash)
    {
        ArgumentNullException.ThrowIfNull(hash);
        Span<byte> h = stackalloc byte[SHA256.HashSizeInBytes];
        if (hash.AlgorithmName != HashAlgorithmName.SHA256 || !hash.TryGetHashAndReset(h, out var n) || n != h.Length)
            throw new ArgumentException($"not a sha256 hash ({hash.AlgorithmName})", nameof(hash));
        return FromSha256(h);
    }

    /// <summary>The hex as bytes: 32 for sha256, 64 for sha512. False for <c>default</c> or a too short destination.</summary>
    public bool TryGetHash(Span<byte> destination, out int written)
    {
        written = 0;
        if (_value is null) return false;
        var hex = _value.AsSpan(_value.IndexOf(':') + 1);
        return Convert.FromHexString(hex, destination, out _, out written) == System.Buffers.OperationStatus.Done;
    }

    /// <summary>True when this is a sha256 digest and <paramref name="data"/> hashes to it (compared in constant time).</summary>
    public bool Matches(ReadOnlySpan<byte> data)
    {
        if (!IsSha256) return false;
        Span<byte> want = stackalloc byte[SHA256.HashSizeInBytes];
        Span<byte> got = stackalloc byte[SHA256.HashSizeInBytes];
        if (!TryGetHash(want, out var n) || n != want.Length) return false;
        SHA256.HashData(data, got);
        return CryptographicOperations.FixedTimeEquals(got, want);
    }

    private static bool IsLowerHex(ReadOnlySpan<char> s)
    {
        foreach (var ch in s)
            if (!char.IsAsciiHexDigitLower(ch)) return false;
        return true;
    }
}
