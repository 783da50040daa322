namespace Stargz.Estargz;

/// <summary>Annotation / label names shared with the reference implementation.</summary>
public static class LayerLabels
{
    /// <summary>Layer annotation carrying the sha256 digest of the TOC JSON.</summary>
    public const string TocDigestAnnotation = "containerd.io/snapshot/stargz/toc.digest";

    /// <summary>Layer annotation carrying the uncompressed size of the layer.</summary>
    public const string UncompressedSizeAnnotation = "io.containers.estargz.uncompressed-size";

    /// <summary>zstd:chunked annotation: digest of the compressed manifest (TOC).</summary>
    public const string ZstdManifestChecksumAnnotation = "io.containers.zstd-chunked.manifest-checksum";

    /// <summary>zstd:chunked annotation: "offset:compressedLength:uncompressedLength:type".</summary>
    public const string ZstdManifestPositionAnnotation = "io.containers.zstd-chunked.manifest-position";

    /// <summary>Name of the tar entry holding the TOC in gzip eStargz.</summary>
    public const string TocTarName = "stargz.index.json";

    /// <summary>Files before this entry are prioritized; prefetch up to its offset.</summary>
    public const string PrefetchLandmark = ".prefetch.landmark";

    /// <summary>Marks a layer that should not be prefetched.</summary>
    public const string NoPrefetchLandmark = ".no.prefetch.landmark";

    /// <summary>The single byte every landmark file holds.</summary>
    public const byte LandmarkContents = 0x0f;
}
