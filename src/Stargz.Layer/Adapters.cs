using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Layer;

/// <summary>The registry's <see cref="RemoteBlob"/> as the layer's range fetcher and as the format library's blob source.</summary>
internal sealed class RemoteBlobFetcher(RemoteBlob blob) : IRangeFetcher, IBlobSource
{
    public RemoteBlob Blob => blob;

    public long Size => blob.Size;

    public Task FetchAsync(IReadOnlyList<FetchRange> ranges, CancellationToken cancellationToken)
    {
        if (ranges.Count == 1) return blob.ReadAtAsync(ranges[0].Offset, ranges[0].Destination, cancellationToken).AsTask();
        var list = new BlobRange[ranges.Count];
        for (var i = 0; i < list.Length; i++) list[i] = new BlobRange(ranges[i].Offset, ranges[i].Destination);
        return blob.ReadRangesAsync(list, cancellationToken);
    }

    public ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct) => blob.ReadAtAsync(offset, destination, ct);
}

/// <summary>Decodes chunks with the format library (gzip members or zstd frames).</summary>
internal sealed class EstargzChunkDecoder(BlobCompression compression) : IChunkDecoder
{
    public void Decode(ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination) =>
        ChunkDecoder.Decompress(compression, compressed, innerOffset, destination);
}
