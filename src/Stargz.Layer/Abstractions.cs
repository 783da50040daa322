global using LayerChunk = Stargz.Estargz.ChunkInfo;

namespace Stargz.Layer;

/// <summary>Positions of a chunk (the TOC's <see cref="LayerChunk"/>) that the fetcher uses.</summary>
internal static class ChunkExtensions
{
    extension(LayerChunk c)
    {
        public long FileEnd => c.FileOffset + c.Size;
        public long BlobEnd => c.BlobOffset + c.BlobLength;
    }
}

/// <summary>A range of the blob to read into <see cref="Destination"/> (its length is the range's length).</summary>
internal readonly record struct FetchRange(long Offset, Memory<byte> Destination);

/// <summary>
/// Ranged reads of one layer blob. The registry adapter sends every range list as one request where the registry
/// supports multi-range; tests use an in-memory blob. Implementations throw on any failure.
/// </summary>
internal interface IRangeFetcher
{
    long Size { get; }

    /// <summary>Bytes received from the registry so far, by any request of this blob (progress, for timeouts).</summary>
    long ReceivedBytes { get; }

    /// <summary>
    /// Fills each range's destination. For a single range, <paramref name="arrived"/> (if given) is called as its bytes
    /// come with how many leading bytes of the destination hold them by then (it may start from 0 again when a
    /// transfer is retried); for several ranges it is not called.
    /// </summary>
    Task FetchAsync(IReadOnlyList<FetchRange> ranges, CancellationToken cancellationToken, Action<int>? arrived = null);
}

/// <summary>Decompresses one chunk: <paramref name="compressed"/> is the member, the chunk starts at <paramref name="innerOffset"/>.</summary>
internal interface IChunkDecoder
{
    void Decode(ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination);
}

/// <summary>Who asked for a chunk: a reader waiting in the kernel, the mount-time prefetch, or the background fetch.</summary>
internal enum FetchPriority
{
    OnDemand,
    Prefetch,
    Background,
}

/// <summary>
/// A layer read failed and the caller must see EIO: the registry did not answer within the fetching timeout, a
/// chunk did not match its digest, or the blob could not be read. Never carries partial data.
/// </summary>
public sealed class LayerIOException : IOException
{
    /// <summary>The errno the FUSE reply carries (EIO).</summary>
    public const int Errno = 5;

    public LayerIOException(string message, Exception? inner = null) : base(message, inner) { HResult = Errno; }
}
