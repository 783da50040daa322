using System.Security.Cryptography;
using System.Text;
using Stargz.Registry;

namespace Stargz.Containerd;

/// <summary>Names and small computations shared with containerd and the reference's <c>ctr-remote image rpull</c>.</summary>
public static class RpullLabels
{
    public const string SnapshotRef = "containerd.io/snapshot.ref";
    public const string TargetRef = "containerd.io/snapshot/remote/stargz.reference";
    public const string TargetDigest = "containerd.io/snapshot/remote/stargz.digest";
    public const string TargetImageLayers = "containerd.io/snapshot/remote/stargz.layers";
    public const string TargetPrefetchSize = "containerd.io/snapshot/remote/stargz.prefetch";
    public const string TargetUrls = "containerd.io/snapshot/remote/urls";
    public const string TargetImageUrlsPrefix = "containerd.io/snapshot/remote/urls.";
    public const string TocDigest = "containerd.io/snapshot/stargz/toc.digest";
    /// <summary>`rpull --skip-content-verify`: the layer may be mounted without a TOC digest (if the daemon allows it).</summary>
    public const string SkipVerify = "containerd.io/snapshot/remote/stargz.skipverify";
    public const string UncompressedSize = "io.containers.estargz.uncompressed-size";
    /// <summary>What a remote snapshotter (ours, the reference) marks its remote snapshots with.</summary>
    public const string RemoteSnapshotMarker = "containerd.io/snapshot/remote";
    /// <summary>containerd passes layer annotations with this prefix on to the snapshotter (and only those).</summary>
    public const string InheritedPrefix = "containerd.io/snapshot/";

    public const string GcRefContentConfig = "containerd.io/gc.ref.content.config";
    public const string GcRefContentLayerPrefix = "containerd.io/gc.ref.content.l.";
    public const string GcRefContentManifestPrefix = "containerd.io/gc.ref.content.m.";
    public const string GcRefSnapshotPrefix = "containerd.io/gc.ref.snapshot.";
    public const string Uncompressed = "containerd.io/uncompressed";
    public const string DistributionSourcePrefix = "containerd.io/distribution.source.";

    /// <summary>The reference's prefetch size label value (10 MiB), as ctr-remote passes it.</summary>
    public const long DefaultPrefetchSize = 10 * 1024 * 1024;

    /// <summary>containerd refuses labels whose key and value together exceed this many bytes.</summary>
    public const int MaxLabelSize = 4096;

    /// <summary>OCI chain IDs: the first layer's is its diffID, each next one sha256("PARENT DIFFID").</summary>
    public static IReadOnlyList<string> ChainIds(IReadOnlyList<string> diffIds)
    {
        var result = new List<string>(diffIds.Count);
        string? parent = null;
        foreach (var d in diffIds)
        {
            parent = parent is null ? d : "sha256:" + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(parent + " " + d)));
            result.Add(parent);
        }
        return result;
    }

    /// <summary>
    /// The labels for preparing layer <paramref name="index"/>: the ones the reference's handler puts on each layer
    /// (image reference, layer digest, this and the following layers' digests cut to fit the label limit, prefetch
    /// size, URLs), the layer's own annotations that containerd would pass on (TOC digest; plus the uncompressed
    /// size, which containerd itself would drop), and the chainID the caller will commit to.
    /// </summary>
    public static Dictionary<string, string> ForLayer(string imageRef, IReadOnlyList<Descriptor> layers, int index, string chainId,
        long prefetchSize = DefaultPrefetchSize)
    {
        var layer = layers[index];
        var labels = new Dictionary<string, string>(StringComparer.Ordinal);
        if (layer.Annotations is not null)
            foreach (var (k, v) in layer.Annotations)
                if (k.StartsWith(InheritedPrefix, StringComparison.Ordinal) || k == UncompressedSize)
                    labels[k] = v;
        labels[TargetRef] = imageRef;
        labels[TargetDigest] = layer.Digest;
        var sb = new StringBuilder();
        for (var i = index; i < layers.Count; i++)
        {
            var add = (sb.Length == 0 ? "" : ",") + layers[i].Digest;
            // +1: the reference measures the list with a trailing comma.
            if (TargetImageLayers.Length + sb.Length + add.Length + 1 > MaxLabelSize) break;
            sb.Append(add);
            // urls.N counts from this layer, as the daemon reads it back against the layers list.
            var urlsKey = TargetImageUrlsPrefix + (i - index).ToString(System.Globalization.CultureInfo.InvariantCulture);
            if (layers[i].Urls is { Count: > 0 } u && JoinWithin(urlsKey, u) is { Length: > 0 } us)
                labels[urlsKey] = us;
        }
        labels[TargetImageLayers] = sb.ToString();
        labels[TargetPrefetchSize] = prefetchSize.ToString(System.Globalization.CultureInfo.InvariantCulture);
        if (layer.Urls is { Count: > 0 } urls && JoinWithin(TargetUrls, urls) is { Length: > 0 } joined)
            labels[TargetUrls] = joined;
        labels[SnapshotRef] = chainId;
        return labels;
    }

    private static string JoinWithin(string key, IReadOnlyList<string> values)
    {
        var sb = new StringBuilder();
        foreach (var v in values)
        {
            var add = (sb.Length == 0 ? "" : ",") + v;
            if (key.Length + sb.Length + add.Length + 1 > MaxLabelSize) break;
            sb.Append(add);
        }
        return sb.ToString();
    }

    /// <summary>containerd's unpack key: <c>extract-NANOS-RANDOM CHAINID</c>, unique per attempt.</summary>
    public static string ExtractKey(string chainId)
    {
        Span<byte> b = stackalloc byte[3];
        RandomNumberGenerator.Fill(b);
        var nanos = DateTime.UtcNow.Ticks % TimeSpan.TicksPerSecond * 100;
        return $"extract-{nanos}-{Convert.ToBase64String(b).Replace('+', '-').Replace('/', '_')} {chainId}";
    }

    /// <summary>The child labels containerd puts on a manifest or index so its GC keeps what it points at:
    /// <c>gc.ref.content.config</c> for the config, <c>gc.ref.content.l.N</c> for layers, <c>gc.ref.content.m.N</c> for manifests.</summary>
    public static Dictionary<string, string> ManifestGcLabels(Descriptor config, IReadOnlyList<Descriptor> layers)
    {
        var labels = new Dictionary<string, string>(StringComparer.Ordinal) { [GcRefContentConfig] = config.Digest };
        for (var i = 0; i < layers.Count; i++) labels[GcRefContentLayerPrefix + i] = layers[i].Digest;
        return labels;
    }
}
