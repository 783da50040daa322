using Stargz.Registry;

namespace Stargz.Converter;

/// <summary>Layer format the converter writes.</summary>
public enum LayerFormat
{
    /// <summary>eStargz: gzip members, TOC in a tar entry, 51-byte footer; media type <c>tar+gzip</c>.</summary>
    Estargz,
    /// <summary>zstd:chunked: zstd frames and the zstd:chunked footer; media type <c>tar+zstd</c>.</summary>
    ZstdChunked,
}

/// <summary>What <see cref="ImageConverter"/> does with each image.</summary>
public sealed record ConvertOptions
{
    public LayerFormat Format { get; init; } = LayerFormat.Estargz;
    /// <summary>Largest uncompressed chunk of a regular file; null for the builder's default (4 MiB).</summary>
    public int? ChunkSize { get; init; }
    /// <summary>gzip 0-9 (default 9) or zstd 1-22 (default 3); null for the default.</summary>
    public int? CompressionLevel { get; init; }
    /// <summary>
    /// Paths placed first in every layer that has them (followed by <c>.prefetch.landmark</c>). A path found in no
    /// converted layer of an image is an error.
    /// </summary>
    public IReadOnlyList<string> Prioritized { get; init; } = [];
    /// <summary>Platform picked from an index (default: this machine's). Ignored with <see cref="AllPlatforms"/>.</summary>
    public Platform? Platform { get; init; }
    /// <summary>Convert every image manifest of an index and push an index.</summary>
    public bool AllPlatforms { get; init; }
    /// <summary>Where temporary files go (a private subdirectory is made and removed); default the system temp dir.</summary>
    public string? WorkDirectory { get; init; }
    /// <summary>Layers converted at once.</summary>
    public int MaxParallelLayers { get; init; } = 2;
    /// <summary>Members compressed at once inside one layer (default: processor count).</summary>
    public int? BuilderParallelism { get; init; }
    /// <summary>Options for blob uploads.</summary>
    public BlobPushOptions? Push { get; init; }
    /// <summary>Told about each distinct layer as soon as it is done (from the converting thread; keep it quick).</summary>
    public IProgress<ConvertedLayer>? Progress { get; init; }
    /// <summary>Told where each distinct layer is while it is converted (downloading with bytes, pushing, done); progress bars.</summary>
    public IProgress<LayerConvertProgress>? LayerProgress { get; init; }
}

public enum LayerConvertStage
{
    /// <summary>Waiting for a free slot (<see cref="ConvertOptions.MaxParallelLayers"/>).</summary>
    Queued,
    /// <summary>Being downloaded (and rebuilt as it arrives); <see cref="LayerConvertProgress.Bytes"/> of the source blob so far.</summary>
    Converting,
    /// <summary>Already eStargz: being copied (<see cref="LayerConvertProgress.Bytes"/> so far).</summary>
    Copying,
    /// <summary>Rebuilt; the new blob is being pushed.</summary>
    Pushing,
    /// <summary>Done (converted, copied or kept).</summary>
    Done,
}

/// <param name="Digest">the source layer's digest.</param>
/// <param name="Size">the source layer's size.</param>
public readonly record struct LayerConvertProgress(string Digest, long Size, LayerConvertStage Stage, long Bytes);
