using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace Stargz.Registry;

public static class MediaTypes
{
    public const string OciManifest = "application/vnd.oci.image.manifest.v1+json";
    public const string OciIndex = "application/vnd.oci.image.index.v1+json";
    public const string DockerManifest = "application/vnd.docker.distribution.manifest.v2+json";
    public const string DockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json";
    public const string OciConfig = "application/vnd.oci.image.config.v1+json";
    public const string DockerConfig = "application/vnd.docker.container.image.v1+json";

    /// <summary>What we send as Accept for manifests: every kind we can parse.</summary>
    public const string ManifestAccept = OciIndex + ", " + DockerManifestList + ", " + OciManifest + ", " + DockerManifest;

    public static bool IsIndex(string? mt) => mt is OciIndex or DockerManifestList;
    public static bool IsManifest(string? mt) => mt is OciManifest or DockerManifest;
}

/// <summary>os/architecture[/variant] as in OCI image indexes.</summary>
public sealed record Platform(string OS, string Architecture, string? Variant = null)
{
    /// <summary>The platform this process runs on, normalised to OCI names.</summary>
    public static Platform Current { get; } = new("linux",
        RuntimeInformation.OSArchitecture switch
        {
            System.Runtime.InteropServices.Architecture.X64 => "amd64",
            System.Runtime.InteropServices.Architecture.Arm64 => "arm64",
            System.Runtime.InteropServices.Architecture.Arm => "arm",
            System.Runtime.InteropServices.Architecture.X86 => "386",
            System.Runtime.InteropServices.Architecture.S390x => "s390x",
            System.Runtime.InteropServices.Architecture.Ppc64le => "ppc64le",
            System.Runtime.InteropServices.Architecture.RiscV64 => "riscv64",
            var other => other.ToString().ToLowerInvariant(),
        },
        RuntimeInformation.OSArchitecture == System.Runtime.InteropServices.Architecture.Arm64 ? "v8" : null);

    /// <summary>Parses "linux/arm64/v8" or "linux/amd64".</summary>
    public static Platform Parse(string s)
    {
        var p = s.Split('/');
        if (p.Length is < 2 or > 3 || p.Any(string.IsNullOrWhiteSpace))
            throw new FormatException($"invalid platform \"{s}\": want os/arch[/variant]");
        return new Platform(p[0], p[1], p.Length == 3 ? p[2] : null);
    }

    /// <summary>True when <paramref name="candidate"/> (from an index) can run here. arm64 without variant means v8.</summary>
    public bool Matches(Platform candidate)
    {
        if (!string.Equals(OS, candidate.OS, StringComparison.OrdinalIgnoreCase)) return false;
        if (!string.Equals(Architecture, candidate.Architecture, StringComparison.OrdinalIgnoreCase)) return false;
        var want = NormVariant(Architecture, Variant);
        var have = NormVariant(candidate.Architecture, candidate.Variant);
        return want is null || have is null || string.Equals(want, have, StringComparison.OrdinalIgnoreCase);
    }

    private static string? NormVariant(string arch, string? v) => arch == "arm64" && string.IsNullOrEmpty(v) ? "v8" : (string.IsNullOrEmpty(v) ? null : v);

    public override string ToString() => Variant is null ? $"{OS}/{Architecture}" : $"{OS}/{Architecture}/{Variant}";
}

/// <summary>An OCI content descriptor.</summary>
public sealed class Descriptor
{
    [JsonPropertyName("mediaType")] public string MediaType { get; init; } = "";
    [JsonPropertyName("digest")] public string Digest { get; init; } = "";
    [JsonPropertyName("size")] public long Size { get; init; }
    [JsonPropertyName("urls")] public IReadOnlyList<string>? Urls { get; init; }
    [JsonPropertyName("annotations")] public IReadOnlyDictionary<string, string>? Annotations { get; init; }
    [JsonPropertyName("platform")] public PlatformJson? Platform { get; init; }

    public string? Annotation(string key) => Annotations is not null && Annotations.TryGetValue(key, out var v) ? v : null;
    public override string ToString() => $"{MediaType} {Digest} ({Size} bytes)";
}

public sealed class PlatformJson
{
    [JsonPropertyName("os")] public string OS { get; init; } = "";
    [JsonPropertyName("architecture")] public string Architecture { get; init; } = "";
    [JsonPropertyName("variant")] public string? Variant { get; init; }
    public Platform ToPlatform() => new(OS, Architecture, string.IsNullOrEmpty(Variant) ? null : Variant);
}

internal sealed class ManifestJson
{
    [JsonPropertyName("schemaVersion")] public int SchemaVersion { get; init; }
    [JsonPropertyName("mediaType")] public string? MediaType { get; init; }
    [JsonPropertyName("config")] public Descriptor? Config { get; init; }
    [JsonPropertyName("layers")] public List<Descriptor>? Layers { get; init; }
    [JsonPropertyName("manifests")] public List<Descriptor>? Manifests { get; init; }
    [JsonPropertyName("annotations")] public Dictionary<string, string>? Annotations { get; init; }
}

[JsonSerializable(typeof(ManifestJson))]
internal sealed partial class ManifestJsonContext : JsonSerializerContext;

/// <summary>An image manifest found for a reference (after index platform selection).</summary>
public sealed class ResolvedManifest
{
    /// <summary>The reference that was resolved (as given).</summary>
    public required ImageReference Reference { get; init; }
    /// <summary>Digest of the image manifest (not of the index).</summary>
    public required string Digest { get; init; }
    public required string MediaType { get; init; }
    public required Descriptor Config { get; init; }
    public required IReadOnlyList<Descriptor> Layers { get; init; }
    public IReadOnlyDictionary<string, string>? Annotations { get; init; }
    /// <summary>Digest of the index the manifest was selected from, when the reference named an index.</summary>
    public string? IndexDigest { get; init; }
    /// <summary>Platform the manifest was selected for (from the index), if any.</summary>
    public Platform? Platform { get; init; }
    /// <summary>The manifest bytes exactly as served (their sha256 is <see cref="Digest"/>).</summary>
    public required ReadOnlyMemory<byte> Raw { get; init; }
    /// <summary>The registry host (mirror or origin) that served it.</summary>
    public required string ServedBy { get; init; }
}

internal static class ManifestParser
{
    public static ManifestJson Parse(ReadOnlySpan<byte> json, string subject, string host)
    {
        try
        {
            return JsonSerializer.Deserialize(json, ManifestJsonContext.Default.ManifestJson)
                   ?? throw new RegistryException($"manifest for {subject} from {host} is null", host: host, subject: subject);
        }
        catch (JsonException e)
        {
            throw new RegistryException($"manifest for {subject} from {host} is not valid JSON: {e.Message}", host: host, subject: subject, inner: e);
        }
    }
}
