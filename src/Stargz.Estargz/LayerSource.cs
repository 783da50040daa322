using System.Globalization;
using System.Text;

namespace Stargz.Estargz;

/// <summary>
/// Where a layer comes from, as its snapshot labels say (the reference's <c>fs/source</c>): image reference, layer
/// digest, TOC digest, the image's other layers and their URLs, prefetch size. <see cref="FromLabels"/> reads what
/// <see cref="WriteLabels"/> writes (rpull) and what containerd's CRI plugin sets; a value only of whitespace counts
/// as absent, and ours wins over CRI's.
/// </summary>
public sealed class LayerSource
{
    /// <summary>The image reference (ours, else CRI's), trimmed; null when neither label has a value.</summary>
    public string? Reference { get; private init; }
    /// <summary>The layer's digest (ours, else CRI's), trimmed; null when neither label has a value.</summary>
    public string? Digest { get; private init; }
    /// <summary>The TOC digest annotation, trimmed; null when absent.</summary>
    public string? TocDigest { get; private init; }
    /// <summary>The snapshot may be mounted without a TOC digest (if the daemon allows it).</summary>
    public bool SkipVerify { get; private init; }
    /// <summary>The prefetch size label as a number (null when absent or not a number).</summary>
    public long? PrefetchSize { get; private init; }
    /// <summary>This layer's URLs, tried before the registry.</summary>
    public string[] Urls { get; private init; } = [];
    /// <summary>The layers list (ours, else CRI's): this layer and those after it, possibly cut short.</summary>
    public string[] Layers { get; private init; } = [];
    /// <summary>The URLs of each entry of <see cref="Layers"/> (<c>urls.N</c>).</summary>
    public string[][] LayerUrls { get; private init; } = [];

    public static LayerSource FromLabels(IReadOnlyDictionary<string, string> labels)
    {
        var layers = Split(Value(labels, SnapshotLabels.Layers, SnapshotLabels.CriImageLayers));
        var layerUrls = new string[layers.Length][];
        for (var i = 0; i < layers.Length; i++)
            layerUrls[i] = UrlsIn(labels, SnapshotLabels.UrlsPrefix + i.ToString(CultureInfo.InvariantCulture));
        return new LayerSource
        {
            Reference = Value(labels, SnapshotLabels.Reference, SnapshotLabels.CriImageRef),
            Digest = Value(labels, SnapshotLabels.Digest, SnapshotLabels.CriLayerDigest),
            TocDigest = Value(labels, SnapshotLabels.TocDigest),
            SkipVerify = labels.ContainsKey(SnapshotLabels.SkipVerify),
            PrefetchSize = Value(labels, SnapshotLabels.Prefetch) is { } p && long.TryParse(p, NumberStyles.None, CultureInfo.InvariantCulture, out var ps)
                ? ps : null,
            Urls = UrlsIn(labels, SnapshotLabels.Urls),
            Layers = layers,
            LayerUrls = layerUrls,
        };
    }

    private static string? Value(IReadOnlyDictionary<string, string> labels, string key, string? fallback = null)
    {
        if (labels.TryGetValue(key, out var v) && !string.IsNullOrWhiteSpace(v)) return v.Trim();
        if (fallback != null && labels.TryGetValue(fallback, out v) && !string.IsNullOrWhiteSpace(v)) return v.Trim();
        return null;
    }

    private static string[] Split(string? list) =>
        list == null ? [] : list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    private static string[] UrlsIn(IReadOnlyDictionary<string, string> labels, string key) =>
        labels.TryGetValue(key, out var v) && v.Length > 0 ? Split(v) : [];

    /// <summary>
    /// Adds the labels the reference's ctr-remote handler puts on layer <paramref name="index"/> of an image: the
    /// image reference, the layer digest, this and the following layers' digests (cut to fit <see cref="SnapshotLabels.MaxBytes"/>,
    /// each with its <c>urls.N</c>), the prefetch size and the layer's URLs.
    /// </summary>
    /// <param name="layers">every layer of the image: digest and URLs (null or empty: none).</param>
    public static void WriteLabels(IDictionary<string, string> labels, string imageRef, IReadOnlyList<(string Digest, IReadOnlyList<string>? Urls)> layers,
        int index, long prefetchSize)
    {
        var layer = layers[index];
        labels[SnapshotLabels.Reference] = imageRef;
        labels[SnapshotLabels.Digest] = layer.Digest;
        var sb = new StringBuilder();
        for (var i = index; i < layers.Count; i++)
        {
            var add = (sb.Length == 0 ? "" : ",") + layers[i].Digest;
            // +1: the reference measures the list with a trailing comma.
            if (SnapshotLabels.Layers.Length + sb.Length + add.Length + 1 > SnapshotLabels.MaxBytes) break;
            sb.Append(add);
            // urls.N counts from this layer, as the daemon reads it back against the layers list.
            var urlsKey = SnapshotLabels.UrlsPrefix + (i - index).ToString(CultureInfo.InvariantCulture);
            if (layers[i].Urls is { Count: > 0 } u && JoinWithin(urlsKey, u) is { Length: > 0 } us)
                labels[urlsKey] = us;
        }
        labels[SnapshotLabels.Layers] = sb.ToString();
        labels[SnapshotLabels.Prefetch] = prefetchSize.ToString(CultureInfo.InvariantCulture);
        if (layer.Urls is { Count: > 0 } urls && JoinWithin(SnapshotLabels.Urls, urls) is { Length: > 0 } joined)
            labels[SnapshotLabels.Urls] = joined;
    }

    private static string JoinWithin(string key, IReadOnlyList<string> values)
    {
        var sb = new StringBuilder();
        foreach (var v in values)
        {
            var add = (sb.Length == 0 ? "" : ",") + v;
            if (key.Length + sb.Length + add.Length + 1 > SnapshotLabels.MaxBytes) break;
            sb.Append(add);
        }
        return sb.ToString();
    }
}
