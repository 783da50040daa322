namespace Stargz.Estargz;

/// <summary>Annotation / label names shared with the reference implementation.</summary>
/// <remarks>Every label name of the layer contract is here: the layer's annotations (below) and the snapshot labels
/// (<see cref="SnapshotLabels"/>); <see cref="LayerSource"/> reads and writes them.</remarks>
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

/// <summary>
/// The snapshot labels of the remote-layer contract: what ctr-remote / nerdctl / <c>stargz image rpull</c> and
/// containerd's CRI plugin put on a layer's Prepare, what the snapshotter marks its remote snapshots with. containerd
/// passes a layer annotation on to the snapshotter when its name starts with <see cref="InheritedPrefix"/>.
/// </summary>
public static class SnapshotLabels
{
    /// <summary>The chainID a Prepare wants its snapshot committed as (containerd's unpacker sets it).</summary>
    public const string SnapshotRef = "containerd.io/snapshot.ref";
    /// <summary>What a remote snapshotter (ours, the reference) marks its remote snapshots with.</summary>
    public const string RemoteSnapshot = "containerd.io/snapshot/remote";
    /// <summary>The value of <see cref="RemoteSnapshot"/>.</summary>
    public const string RemoteSnapshotValue = "remote snapshot";
    /// <summary>containerd passes layer annotations with this prefix on to the snapshotter (and only those).</summary>
    public const string InheritedPrefix = "containerd.io/snapshot/";

    public const string Reference = "containerd.io/snapshot/remote/stargz.reference";
    public const string Digest = "containerd.io/snapshot/remote/stargz.digest";
    /// <summary>This layer's digest and those of the layers after it, comma-separated, cut to fit <see cref="MaxBytes"/>.</summary>
    public const string Layers = "containerd.io/snapshot/remote/stargz.layers";
    public const string Prefetch = "containerd.io/snapshot/remote/stargz.prefetch";
    /// <summary>The layer's URLs (a CDN, a foreign layer's home), comma-separated: tried before the registry.</summary>
    public const string Urls = "containerd.io/snapshot/remote/urls";
    /// <summary><c>urls.N</c>: the URLs of the N-th layer of <see cref="Layers"/>.</summary>
    public const string UrlsPrefix = Urls + ".";
    /// <summary>
    /// Set (any value) by `rpull --skip-content-verify` on the layer's snapshot: a layer without a TOC digest may be
    /// mounted unverified, if the daemon's <c>allow_no_verification</c> permits it (the reference's rule).
    /// </summary>
    public const string SkipVerify = "containerd.io/snapshot/remote/stargz.skipverify";
    /// <summary>The layer annotation <see cref="LayerLabels.TocDigestAnnotation"/>, passed on as a label.</summary>
    public const string TocDigest = LayerLabels.TocDigestAnnotation;

    public const string CriImageRef = "containerd.io/snapshot/cri.image-ref";
    public const string CriLayerDigest = "containerd.io/snapshot/cri.layer-digest";
    public const string CriImageLayers = "containerd.io/snapshot/cri.image-layers";

    /// <summary>containerd refuses labels whose key and value together exceed this many bytes (its labels.Validate).</summary>
    public const int MaxBytes = 4096;
}
