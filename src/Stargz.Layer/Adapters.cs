using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Layer;

/// <summary>The registry's <see cref="RemoteBlob"/> as the layer's range fetcher and as the format library's blob source.</summary>
internal sealed class RemoteBlobFetcher : IRangeFetcher, IBlobSource
{
    private readonly Func<CancellationToken, Task<RemoteBlob>>? _open;
    private readonly SemaphoreSlim _opening = new(1, 1);
    private RemoteBlob? _blob;

    public RemoteBlobFetcher(RemoteBlob blob)
    {
        _blob = blob;
        Size = blob.Size;
    }

    /// <summary>
    /// A blob whose size is known from a stored TOC: the registry is asked only when a chunk is missing (or on Check),
    /// so a fully cached layer mounts and reads while the registry is away. A failed open is tried again next time.
    /// </summary>
    public RemoteBlobFetcher(long size, Func<CancellationToken, Task<RemoteBlob>> open)
    {
        Size = size;
        _open = open;
    }

    public long Size { get; }

    public long ReceivedBytes => Volatile.Read(ref _blob)?.BytesFetched ?? 0;

    private ValueTask<RemoteBlob> BlobAsync(CancellationToken ct)
        => Volatile.Read(ref _blob) is { } b ? ValueTask.FromResult(b) : new ValueTask<RemoteBlob>(OpenAsync(ct));

    private async Task<RemoteBlob> OpenAsync(CancellationToken ct)
    {
        await _opening.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (_blob is { } b) return b;
            b = await _open!(ct).ConfigureAwait(false);
            if (b.Size != Size) throw new IOException($"blob {b.Digest} is {b.Size} bytes in the registry, {Size} in the stored TOC");
            Volatile.Write(ref _blob, b);
            return b;
        }
        finally
        {
            _opening.Release();
        }
    }

    public async Task FetchAsync(IReadOnlyList<FetchRange> ranges, CancellationToken cancellationToken, Action<int>? arrived = null)
    {
        var blob = await BlobAsync(cancellationToken).ConfigureAwait(false);
        if (ranges.Count == 1)
        {
            // Unshared: the chunk claims already fetch each chunk once, and a shared read costs a second buffer of the
            // range's size (4 MiB for a background batch) and a copy.
            await blob.ReadAtUnsharedAsync(ranges[0].Offset, ranges[0].Destination, cancellationToken, arrived).ConfigureAwait(false);
            return;
        }
        var list = new BlobRange[ranges.Count];
        for (var i = 0; i < list.Length; i++) list[i] = new BlobRange(ranges[i].Offset, ranges[i].Destination);
        await blob.ReadRangesAsync(list, cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct)
        => await (await BlobAsync(ct).ConfigureAwait(false)).ReadAtAsync(offset, destination, ct).ConfigureAwait(false);

    /// <summary>Opens the blob if it was not yet, and checks (refreshes) its registry connection.</summary>
    public async Task CheckAsync(CancellationToken ct)
        => await (await BlobAsync(ct).ConfigureAwait(false)).CheckAsync(ct).ConfigureAwait(false);
}

/// <summary>Decodes chunks with the format library (gzip members or zstd frames).</summary>
internal sealed class EstargzChunkDecoder(BlobCompression compression) : IChunkDecoder
{
    public void Decode(ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination) =>
        ChunkDecoder.Decompress(compression, compressed, innerOffset, destination);
}
