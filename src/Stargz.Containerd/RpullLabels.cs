using System.Security.Cryptography;
using System.Text;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Containerd;

/// <summary>Names and small computations shared with containerd and the reference's <c>ctr-remote image rpull</c>; the
/// layer labels themselves are <see cref="SnapshotLabels"/>, written by <see cref="LayerSource.WriteLabels"/>.</summary>
public static class RpullLabels
{
    public const string GcRefContentConfig = "containerd.io/gc.ref.content.config";
    public const string GcRefContentLayerPrefix = "containerd.io/gc.ref.content.l.";
    public const string GcRefContentManifestPrefix = "containerd.io/gc.ref.content.m.";
    public const string GcRefSnapshotPrefix = "containerd.io/gc.ref.snapshot.";
    public const string Uncompressed = "containerd.io/uncompressed";
    public const string DistributionSourcePrefix = "containerd.io/distribution.source.";

    /// <summary>The reference's prefetch size label value (10 MiB), as ctr-remote passes it.</summary>
    public const long DefaultPrefetchSize = 10 * 1024 * 1024;

    /// <summary>OCI chain IDs: the first layer's is its diffID, each next one sha256("PARENT DIFFID").</summary>
    public static IReadOnlyList<string> ChainIds(IReadOnlyList<string> diffIds)
    {
        var result = new List<string>(diffIds.Count);
        string? parent = null;
        foreach (var d in diffIds)
        {
            parent = parent is null ? d : Digest.Sha256Of(Encoding.UTF8.GetBytes(parent + " " + d)).ToString();
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
                if (k.StartsWith(SnapshotLabels.InheritedPrefix, StringComparison.Ordinal) || k == LayerLabels.UncompressedSizeAnnotation)
                    labels[k] = v;
        var sources = new (string Digest, IReadOnlyList<string>? Urls)[layers.Count];
        for (var i = 0; i < layers.Count; i++) sources[i] = (layers[i].Digest, layers[i].Urls);
        LayerSource.WriteLabels(labels, imageRef, sources, index, prefetchSize);
        labels[SnapshotLabels.SnapshotRef] = chainId;
        return labels;
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
