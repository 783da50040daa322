using Stargz.Registry;

namespace Stargz.Converter;

/// <summary>What happened to one layer.</summary>
public enum LayerAction
{
    /// <summary>Rebuilt as eStargz / zstd:chunked and pushed.</summary>
    Converted,
    /// <summary>Already had a TOC digest annotation: the blob was copied (or mounted) unchanged.</summary>
    CopiedAsIs,
    /// <summary>A non-distributable (foreign) layer: the descriptor is kept, no blob is copied.</summary>
    KeptForeign,
}

/// <summary>One layer of a converted image: the source descriptor, the descriptor written, the diffID in the new config.</summary>
public sealed record ConvertedLayer(Descriptor Source, Descriptor Target, string DiffId, LayerAction Action)
{
    /// <summary>TOC digest annotation of the target (null for a foreign layer without one).</summary>
    public string? TocDigest => Target.Annotation(Estargz.LayerLabels.TocDigestAnnotation);
}

/// <summary>One converted image manifest.</summary>
public sealed record ConvertedManifest(string SourceDigest, string Digest, long Size, Platform? Platform, Descriptor Config,
    IReadOnlyList<ConvertedLayer> Layers);

/// <summary>The result of converting a reference: the top-level digest pushed (manifest or index) and every manifest in it.</summary>
public sealed record ConvertResult(ImageReference Target, string Digest, string MediaType, long Size, IReadOnlyList<ConvertedManifest> Manifests);

/// <summary>A conversion failed; says which image and, when it is about one, which layer.</summary>
public sealed class ImageConvertException : Exception
{
    /// <summary>Digest of the source layer the failure is about, or null.</summary>
    public string? LayerDigest { get; }
    public string SourceImage { get; }

    public ImageConvertException(string message, string source, string? layerDigest = null, Exception? inner = null)
        : base(message, inner)
    {
        SourceImage = source;
        LayerDigest = layerDigest;
    }
}
