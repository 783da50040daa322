using System.Buffers;
using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;
using ZstdSharp;

namespace Stargz.Estargz;

public sealed record EstargzReaderOptions
{
    public TocLimits Limits { get; init; } = TocLimits.Default;
    /// <summary>Verify every chunk read against its TOC digest (default on).</summary>
    public bool VerifyChunks { get; init; } = true;
    /// <summary>Accept chunks without a digest when verifying (legacy stargz); default off: such reads fail.</summary>
    public bool AllowMissingChunkDigests { get; init; }
    /// <summary>Most compressed bytes fetched for one chunk; bounds buffers for hostile offsets.</summary>
    public long MaxChunkFetchBytes { get; init; } = 512L << 20;
}

/// <summary>
/// Reads an eStargz (gzip, legacy stargz) or zstd:chunked blob: footer, TOC, entry tree, random access to file bytes
/// (only the chunks a read touches are fetched and decompressed, each verified), diffID and full verification.
/// Thread-safe once opened.
/// </summary>
public sealed class EstargzReader
{
    private readonly IBlobSource? _blob;
    private readonly EstargzReaderOptions _opts;

    private EstargzReader(Toc toc, TocTree tree, string tocDigest, long tocOffset, BlobCompression compression, IBlobSource? blob, EstargzReaderOptions opts, FooterInfo? footer)
    {
        Toc = toc;
        Tree = tree;
        TocDigest = tocDigest;
        TocOffset = tocOffset;
        Compression = compression;
        _blob = blob;
        _opts = opts;
        Footer = footer;
    }

    public Toc Toc { get; }
    public TocTree Tree { get; }
    /// <summary>"sha256:..." of the TOC JSON bytes (empty when built with <see cref="FromToc"/> without a digest).</summary>
    public string TocDigest { get; }
    public long TocOffset { get; }
    public BlobCompression Compression { get; }
    public FooterInfo? Footer { get; }
    public TocNode Root => Tree.Root;
    public EstargzReaderOptions Options => _opts;

    /// <summary>Blob offset of the <c>.prefetch.landmark</c> chunk (prefetch everything before it), or null.</summary>
    public long? PrefetchLandmarkOffset =>
        Tree.Lookup(LayerLabels.PrefetchLandmark) is { IsRegular: true, Chunks.Count: > 0 } n ? n.Chunks[0].BlobOffset : null;

    /// <summary>True if the layer carries <c>.no.prefetch.landmark</c>.</summary>
    public bool HasNoPrefetchLandmark => Tree.Lookup(LayerLabels.NoPrefetchLandmark) is not null;

    public TocNode? Lookup(string path) => Tree.Lookup(path);

    /// <summary>Opens a blob: reads the footer and the TOC, checks the TOC digest if given, builds the tree.</summary>
    public static async Task<EstargzReader> OpenAsync(IBlobSource blob, string? expectedTocDigest = null, EstargzReaderOptions? options = null, CancellationToken ct = default)
    {
        options ??= new EstargzReaderOptions();
        var footer = await ReadFooterAsync(blob, ct).ConfigureAwait(false);
        long tocLen = footer.TocLength >= 0 ? footer.TocLength : blob.Size - footer.FooterSize - footer.TocOffset;
        if (footer.TocOffset > blob.Size || tocLen <= 0 || tocLen > blob.Size - footer.TocOffset - (footer.Compression == BlobCompression.Zstd ? footer.FooterSize : footer.FooterSize))
            throw new EstargzFormatException($"footer points at a TOC [{footer.TocOffset}, +{tocLen}) outside the {blob.Size}-byte blob");
        if (tocLen > options.Limits.MaxTocCompressedBytes)
            throw new TocValidationException($"compressed TOC is {tocLen} bytes, more than the limit {options.Limits.MaxTocCompressedBytes}");
        var compressed = new byte[tocLen];
        await blob.ReadAtAsync(footer.TocOffset, compressed, ct).ConfigureAwait(false);
        var json = DecodeToc(compressed, footer.Compression, options.Limits);
        var digest = ChunkDecoder.Sha256Digest(json);
        if (expectedTocDigest is not null && !string.Equals(expectedTocDigest, digest, StringComparison.Ordinal))
            throw new DigestMismatchException("TOC", expectedTocDigest, digest);
        var toc = Toc.Parse(json, options.Limits);
        var tree = TocTree.Build(toc, footer.PayloadEnd, options.Limits);
        return new EstargzReader(toc, tree, digest, footer.TocOffset, footer.Compression, blob, options, footer);
    }

    /// <summary>A reader over a TOC the caller already fetched and checked (the layer's own footer/TOC fetch).</summary>
    public static EstargzReader FromToc(Toc toc, long tocOffset, BlobCompression compression, IBlobSource? blob = null,
        string? tocDigest = null, EstargzReaderOptions? options = null)
    {
        options ??= new EstargzReaderOptions();
        long payloadEnd = compression == BlobCompression.Zstd ? tocOffset - 8 : tocOffset;
        var tree = TocTree.Build(toc, payloadEnd, options.Limits);
        return new EstargzReader(toc, tree, tocDigest ?? "", tocOffset, compression, blob, options, null);
    }

    /// <summary>Reads and parses the footer from the blob's tail.</summary>
    public static async Task<FooterInfo> ReadFooterAsync(IBlobSource blob, CancellationToken ct)
    {
        if (blob.Size < Stargz.Estargz.Footer.ZstdPayloadSize)
            throw new EstargzFormatException($"blob of {blob.Size} bytes is too small to hold a footer (truncated?)");
        int n = (int)Math.Min(blob.Size, Stargz.Estargz.Footer.MaxFooterSize);
        var tail = new byte[n];
        await blob.ReadAtAsync(blob.Size - n, tail, ct).ConfigureAwait(false);
        if (!Stargz.Estargz.Footer.TryParse(tail, out var info))
            throw new EstargzFormatException("no eStargz, stargz or zstd:chunked footer at the end of the blob (not eStargz, or truncated)");
        return info;
    }

    /// <summary>Decompresses a TOC: gzip member holding a tar whose first entry is stargz.index.json, or a zstd frame of JSON.</summary>
    public static unsafe byte[] DecodeToc(ReadOnlySpan<byte> compressedToc, BlobCompression compression, TocLimits? limits = null)
    {
        limits ??= TocLimits.Default;
        // Read in place: a copy of the compressed TOC (hundreds of KiB for a runtime's layer) was large-object garbage.
        fixed (byte* p = compressedToc)
        {
            try
            {
                using var ms = new UnmanagedMemoryStream(p, compressedToc.Length);
                if (compression == BlobCompression.Gzip)
                {
                    using var gz = new GZipStream(ms, CompressionMode.Decompress);
                    using var tar = new TarReader(gz);
                    var entry = tar.GetNextEntry(copyData: false) ?? throw new EstargzFormatException("TOC member holds no tar entry");
                    if (entry.Name != LayerLabels.TocTarName)
                        throw new EstargzFormatException($"TOC tar entry is named \"{entry.Name}\", expected {LayerLabels.TocTarName}");
                    if (entry.Length > limits.MaxTocJsonBytes)
                        throw new TocValidationException($"TOC JSON is {entry.Length} bytes, more than the limit {limits.MaxTocJsonBytes}");
                    var json = new byte[entry.Length];
                    var ds = entry.DataStream ?? throw new EstargzFormatException("TOC tar entry has no data");
                    ds.ReadExactly(json);
                    return json;
                }
                using var z = new DecompressionStream(ms);
                return ReadBounded(z, limits.MaxTocJsonBytes);
            }
            catch (Exception e) when (e is InvalidDataException or FormatException or IOException or ArgumentException or OverflowException or ZstdException)
            {
                throw new EstargzFormatException($"cannot decompress the {compression} TOC: {e.Message}", e);
            }
        }
    }

    private static byte[] ReadBounded(Stream s, long max)
    {
        var ms = new MemoryStream();
        var buf = ArrayPool<byte>.Shared.Rent(81920);
        try
        {
            int n;
            while ((n = s.Read(buf, 0, buf.Length)) > 0)
            {
                if (ms.Length + n > max) throw new TocValidationException($"TOC JSON is more than the limit {max} bytes");
                ms.Write(buf, 0, n);
            }
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
        return ms.ToArray();
    }

    /// <summary>Index of the chunk of <paramref name="file"/> holding <paramref name="fileOffset"/> (binary search), -1 if none.</summary>
    public int FindChunkIndex(TocNode file, long fileOffset) => FindChunkIndex(file.ChunkArray, fileOffset);

    internal static int FindChunkIndex(ChunkInfo[] chunks, long fileOffset)
    {
        int lo = 0, hi = chunks.Length - 1;
        while (lo <= hi)
        {
            int mid = (int)((uint)(lo + hi) >> 1);
            ref readonly var c = ref chunks[mid];
            if (fileOffset < c.FileOffset) hi = mid - 1;
            else if (fileOffset >= c.FileOffset + c.Size) lo = mid + 1;
            else return mid;
        }
        return -1;
    }

    /// <summary>Reads file bytes at <paramref name="offset"/>: fetches, decompresses and verifies only the chunks
    /// the range touches. Returns the bytes read (fewer at the end of the file, 0 at/after EOF).</summary>
    public async ValueTask<int> ReadFileAsync(TocNode file, long offset, Memory<byte> destination, CancellationToken ct)
    {
        if (!file.IsRegular) throw new ArgumentException($"{file.Path} is not a regular file", nameof(file));
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        long size = file.Size;
        if (offset >= size || destination.Length == 0) return 0;
        int total = (int)Math.Min(destination.Length, size - offset);
        var chunks = file.ChunkArray;
        int idx = FindChunkIndex(chunks, offset);
        if (idx < 0) throw new TocValidationException($"no chunk covers offset {offset}", file.Path);
        int written = 0;
        while (written < total)
        {
            var c = chunks[idx++];
            long inChunk = offset + written - c.FileOffset;
            int n = (int)Math.Min(c.Size - inChunk, total - written);
            if (inChunk == 0 && n == c.Size)
            {
                await ReadChunkAsync(file, c, destination.Slice(written, n), ct).ConfigureAwait(false);
            }
            else
            {
                var buf = ArrayPool<byte>.Shared.Rent((int)c.Size);
                try
                {
                    await ReadChunkAsync(file, c, buf.AsMemory(0, (int)c.Size), ct).ConfigureAwait(false);
                    buf.AsSpan((int)inChunk, n).CopyTo(destination.Span.Slice(written, n));
                }
                finally { ArrayPool<byte>.Shared.Return(buf); }
            }
            written += n;
        }
        return total;
    }

    /// <summary>Fetches, decompresses and (if enabled) verifies one whole chunk into <paramref name="destination"/> (exactly chunk.Size bytes).</summary>
    public async ValueTask ReadChunkAsync(TocNode file, ChunkInfo chunk, Memory<byte> destination, CancellationToken ct)
    {
        var blob = _blob ?? throw new InvalidOperationException("this reader has no blob source");
        if (destination.Length != chunk.Size) throw new ArgumentException("destination must be exactly the chunk size", nameof(destination));
        if (chunk.BlobLength <= 0 || chunk.BlobLength > _opts.MaxChunkFetchBytes)
            throw new TocValidationException($"chunk at blob offset {chunk.BlobOffset} spans {chunk.BlobLength} compressed bytes (limit {_opts.MaxChunkFetchBytes})", file.Path);
        int len = (int)chunk.BlobLength;
        var comp = ArrayPool<byte>.Shared.Rent(len);
        try
        {
            await blob.ReadAtAsync(chunk.BlobOffset, comp.AsMemory(0, len), ct).ConfigureAwait(false);
            DecodeAndVerify(file, chunk, comp.AsSpan(0, len), destination.Span);
        }
        finally { ArrayPool<byte>.Shared.Return(comp); }
    }

    /// <summary>Decompresses and verifies a chunk from its already-fetched compressed bytes.</summary>
    public void DecodeAndVerify(TocNode file, ChunkInfo chunk, ReadOnlySpan<byte> compressed, Span<byte> destination)
    {
        try
        {
            ChunkDecoder.Decompress(Compression, compressed, chunk.InnerOffset, destination);
        }
        catch (EstargzFormatException e)
        {
            throw new EstargzFormatException($"{file.Path}: chunk at file offset {chunk.FileOffset}: {e.Message}", e);
        }
        if (!_opts.VerifyChunks) return;
        if (chunk.Digest is null)
        {
            if (_opts.AllowMissingChunkDigests) return;
            throw new TocValidationException($"chunk at file offset {chunk.FileOffset} has no digest to verify", file.Path);
        }
        if (!ChunkDecoder.Verify(destination, chunk.Digest))
            throw new DigestMismatchException($"chunk at file offset {chunk.FileOffset}", chunk.Digest, ChunkDecoder.Sha256Digest(destination), file.Path);
    }

    /// <summary>sha256 of the whole uncompressed layer stream (the image config's diffID).</summary>
    public async Task<string> ComputeDiffIdAsync(CancellationToken ct)
    {
        var blob = _blob ?? throw new InvalidOperationException("this reader has no blob source");
        using var raw = new BufferedStream(new BlobSourceStream(blob), 1 << 20);
        using Stream dec = Compression == BlobCompression.Gzip
            ? new GZipStream(raw, CompressionMode.Decompress)
            : new DecompressionStream(raw);
        using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buf = ArrayPool<byte>.Shared.Rent(1 << 20);
        try
        {
            int n;
            while ((n = await dec.ReadAsync(buf.AsMemory(), ct).ConfigureAwait(false)) > 0)
                h.AppendData(buf, 0, n);
        }
        catch (Exception e) when (e is InvalidDataException or ZstdException)
        {
            throw new EstargzFormatException($"layer stream is corrupt: {e.Message}", e);
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
        Span<byte> d = stackalloc byte[32];
        h.GetHashAndReset(d);
        return ChunkDecoder.FormatSha256(d);
    }

    /// <summary>Reads every chunk of every regular file, verifying chunk digests and whole-file digests.
    /// Throws <see cref="DigestMismatchException"/> / <see cref="EstargzFormatException"/> on the first failure.</summary>
    public async Task VerifyAllAsync(CancellationToken ct)
    {
        long max = 0;
        foreach (var n in Tree.Nodes)
            foreach (var c in n.ChunkArray) max = Math.Max(max, c.Size);
        var buf = ArrayPool<byte>.Shared.Rent((int)Math.Max(1, max));
        using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var d = new byte[32];
        try
        {
            foreach (var node in Tree.Nodes)
            {
                if (!node.IsRegular || node.Size == 0) continue;
                foreach (var c in node.ChunkArray)
                {
                    await ReadChunkAsync(node, c, buf.AsMemory(0, (int)c.Size), ct).ConfigureAwait(false);
                    h.AppendData(buf, 0, (int)c.Size);
                }
                h.GetHashAndReset(d);
                CheckFileDigest(node, d);
            }
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
    }

    private void CheckFileDigest(TocNode node, ReadOnlySpan<byte> actual)
    {
        var fileDigest = node.Entry.Digest;
        if (fileDigest is not null)
        {
            Span<byte> want = stackalloc byte[32];
            if (!ChunkDecoder.TryParseSha256(fileDigest, want) || !want.SequenceEqual(actual))
                throw new DigestMismatchException("file", fileDigest, ChunkDecoder.FormatSha256(actual), node.Path);
        }
        else if (!_opts.AllowMissingChunkDigests)
            throw new TocValidationException("regular file has no digest", node.Path);
    }
}
