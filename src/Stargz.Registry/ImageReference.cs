using System.Diagnostics.CodeAnalysis;
using System.Text.RegularExpressions;

namespace Stargz.Registry;

/// <summary>
/// A normalised image reference: <c>busybox</c> becomes <c>docker.io/library/busybox:latest</c>.
/// Follows the docker/distribution grammar: a first path component is a host when it contains
/// '.' or ':' or is <c>localhost</c> (IPv6 hosts in brackets).
/// </summary>
public sealed partial class ImageReference : IEquatable<ImageReference>
{
    public const string DockerHubHost = "docker.io";
    /// <summary>Where docker.io's API actually lives.</summary>
    public const string DockerHubApiHost = "registry-1.docker.io";

    /// <summary>Registry host as written (host[:port]), docker.io for Docker Hub.</summary>
    public string Host { get; }
    /// <summary>Repository path inside the registry, e.g. library/busybox.</summary>
    public string Repository { get; }
    /// <summary>Tag, or null when the reference only names a digest.</summary>
    public string? Tag { get; }
    /// <summary>Digest (algorithm:hex), or null.</summary>
    public string? Digest { get; }

    private ImageReference(string host, string repository, string? tag, string? digest)
    {
        Host = host; Repository = repository; Tag = tag; Digest = digest;
    }

    /// <summary>Host to talk HTTP to (docker.io maps to registry-1.docker.io).</summary>
    public string ApiHost => Host == DockerHubHost ? DockerHubApiHost : Host;

    /// <summary>Tag or digest for the manifests endpoint; the digest wins when both are present.</summary>
    public string ManifestReference => Digest ?? Tag ?? "latest";

    /// <summary>The same repository pointing at another digest (tag dropped).</summary>
    public ImageReference WithDigest(string digest)
    {
        ValidateDigest(digest, digest);
        return new ImageReference(Host, Repository, null, digest);
    }

    /// <summary>Parses and normalises; throws <see cref="InvalidReferenceException"/> with the reason.</summary>
    public static ImageReference Parse(string input)
    {
        ArgumentNullException.ThrowIfNull(input);
        var s = input.Trim();
        if (s.Length == 0) throw new InvalidReferenceException(input, "empty");
        if (s.Length > 4096) throw new InvalidReferenceException(input, "too long");
        if (s.Contains("://", StringComparison.Ordinal))
            throw new InvalidReferenceException(input, "a reference has no scheme (drop http:// or https://)");

        string? digest = null;
        var at = s.IndexOf('@');
        if (at >= 0)
        {
            digest = s[(at + 1)..];
            s = s[..at];
            ValidateDigest(input, digest);
        }

        string? tag = null;
        var lastSlash = s.LastIndexOf('/');
        var colon = s.LastIndexOf(':');
        if (colon > lastSlash)
        {
            tag = s[(colon + 1)..];
            s = s[..colon];
            if (!TagRegex().IsMatch(tag)) throw new InvalidReferenceException(input, $"invalid tag \"{tag}\"");
        }

        string host;
        string path;
        var slash = s.IndexOf('/');
        var first = slash < 0 ? s : s[..slash];
        if (slash >= 0 && (first.Contains('.') || first.Contains(':') || first == "localhost" || first.StartsWith('[')))
        {
            host = first;
            path = s[(slash + 1)..];
            ValidateHost(input, host);
        }
        else
        {
            host = DockerHubHost;
            path = s;
        }
        if (host == "index.docker.io") host = DockerHubHost;
        if (host == DockerHubHost && !path.Contains('/')) path = "library/" + path;

        if (path.Length == 0) throw new InvalidReferenceException(input, "missing repository name");
        if (path.Length > 255) throw new InvalidReferenceException(input, "repository name longer than 255 characters");
        foreach (var comp in path.Split('/'))
        {
            if (!ComponentRegex().IsMatch(comp))
                throw new InvalidReferenceException(input,
                    comp.Any(char.IsUpper)
                        ? $"repository name must be lowercase (\"{comp}\")"
                        : $"invalid repository path component \"{comp}\"");
        }

        if (tag is null && digest is null) tag = "latest";
        return new ImageReference(host, path, tag, digest);
    }

    public static bool TryParse(string input, [NotNullWhen(true)] out ImageReference? reference)
    {
        try { reference = Parse(input); return true; }
        catch (InvalidReferenceException) { reference = null; return false; }
    }

    private static void ValidateHost(string input, string host)
    {
        if (host.StartsWith('['))
        {
            var close = host.IndexOf(']');
            if (close < 0) throw new InvalidReferenceException(input, $"unterminated IPv6 host \"{host}\"");
            var addr = host[1..close];
            if (!System.Net.IPAddress.TryParse(addr, out var ip) || ip.AddressFamily != System.Net.Sockets.AddressFamily.InterNetworkV6)
                throw new InvalidReferenceException(input, $"invalid IPv6 address \"{addr}\"");
            var rest = host[(close + 1)..];
            if (rest.Length > 0 && !(rest[0] == ':' && IsPort(rest[1..])))
                throw new InvalidReferenceException(input, $"invalid port in host \"{host}\"");
            return;
        }
        var c = host.IndexOf(':');
        var name = c < 0 ? host : host[..c];
        if (c >= 0 && !IsPort(host[(c + 1)..])) throw new InvalidReferenceException(input, $"invalid port in host \"{host}\"");
        if (!HostNameRegex().IsMatch(name)) throw new InvalidReferenceException(input, $"invalid registry host \"{host}\"");
    }

    private static bool IsPort(string p) => p.Length is > 0 and <= 5 && p.All(char.IsAsciiDigit) && int.Parse(p) <= 65535;

    private static void ValidateDigest(string input, string digest)
    {
        // Stargz.Digest: this class's Digest is the reference's digest string.
        if (!Stargz.Digest.TryParse(digest, out _, out var error))
            throw new InvalidReferenceException(input, $"invalid digest \"{digest}\": {error}");
    }

    [GeneratedRegex(@"^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$")]
    private static partial Regex ComponentRegex();
    [GeneratedRegex(@"^[\w][\w.-]{0,127}$")]
    private static partial Regex TagRegex();
    [GeneratedRegex(@"^(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*$")]
    private static partial Regex HostNameRegex();

    /// <summary>Host/repository without tag or digest.</summary>
    public string Name => $"{Host}/{Repository}";

    public override string ToString()
        => Name + (Tag is null ? "" : ":" + Tag) + (Digest is null ? "" : "@" + Digest);

    public bool Equals(ImageReference? other) => other is not null && ToString() == other.ToString();
    public override bool Equals(object? obj) => Equals(obj as ImageReference);
    public override int GetHashCode() => ToString().GetHashCode(StringComparison.Ordinal);
}
