using System.Buffers;
using System.IO.Compression;
using System.Security.Cryptography;
using ZstdSharp;

namespace Stargz.Estargz;

/// <summary>Decompresses and verifies one chunk from the compressed bytes of its gzip member / zstd frame.</summary>
public static class ChunkDecoder
{
    /// <summary>
    /// Decompresses the member/frame starting at <paramref name="compressed"/>[0], skips <paramref name="innerOffset"/>
    /// uncompressed bytes and fills <paramref name="destination"/> exactly. Never reads before the member start.
    /// Throws <see cref="EstargzFormatException"/> if the data is corrupt or ends early.
    /// </summary>
    public static void Decompress(BlobCompression c, ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination)
    {
        if (innerOffset < 0) throw new EstargzFormatException($"negative innerOffset {innerOffset}");
        if (c == BlobCompression.Zstd) DecompressZstd(compressed, innerOffset, destination);
        else DecompressGzip(compressed, innerOffset, destination);
    }

    private static unsafe void DecompressGzip(ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination)
    {
        fixed (byte* p = compressed)
        {
            using var ums = new UnmanagedMemoryStream(p, compressed.Length);
            try
            {
                using var dec = new GZipStream(ums, CompressionMode.Decompress, leaveOpen: true);
                if (innerOffset > 0) Skip(dec, innerOffset);
                int done = 0;
                while (done < destination.Length)
                {
                    int n = dec.Read(destination[done..]);
                    if (n == 0) throw new EstargzFormatException($"compressed chunk ended after {innerOffset + done} bytes, {innerOffset + destination.Length} expected");
                    done += n;
                }
            }
            catch (InvalidDataException e) { throw new EstargzFormatException($"corrupt gzip data: {e.Message}", e); }
            catch (IOException e) when (e is not EndOfStreamException) { throw new EstargzFormatException($"corrupt gzip data: {e.Message}", e); }
        }
    }

    [ThreadStatic] private static Decompressor? t_zstd;

    /// <summary>zstd with a per-thread reusable context: no allocation per chunk.</summary>
    private static void DecompressZstd(ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination)
    {
        var d = t_zstd ??= new Decompressor();
        d.ResetStream();
        byte[]? scratch = innerOffset > 0 ? ArrayPool<byte>.Shared.Rent(16384) : null;
        try
        {
            int inPos = 0, done = 0;
            long skip = innerOffset;
            while (done < destination.Length)
            {
                var target = skip > 0 ? scratch.AsSpan(0, (int)Math.Min(skip, scratch!.Length)) : destination[done..];
                var status = d.UnwrapStream(compressed[inPos..], target, out int consumed, out int written);
                if (status == OperationStatus.InvalidData) throw new EstargzFormatException("corrupt zstd data");
                inPos += consumed;
                if (skip > 0) skip -= written; else done += written;
                if (consumed == 0 && written == 0)
                    throw new EstargzFormatException($"compressed chunk ended after {innerOffset - skip + done} bytes, {innerOffset + destination.Length} expected");
            }
        }
        catch (ZstdException e)
        {
            d.ResetStream();
            throw new EstargzFormatException($"corrupt zstd data: {e.Message}", e);
        }
        finally
        {
            if (scratch is not null) ArrayPool<byte>.Shared.Return(scratch);
        }
    }

    private static void Skip(Stream s, long count)
    {
        var scratch = ArrayPool<byte>.Shared.Rent(16384);
        try
        {
            while (count > 0)
            {
                int n = s.Read(scratch, 0, (int)Math.Min(count, scratch.Length));
                if (n == 0) throw new EstargzFormatException("compressed member ended before the chunk's innerOffset");
                count -= n;
            }
        }
        finally { ArrayPool<byte>.Shared.Return(scratch); }
    }

    /// <summary>True if sha256(<paramref name="data"/>) equals <paramref name="chunkDigest"/> ("sha256:" + 64 hex). No allocation.</summary>
    public static bool Verify(ReadOnlySpan<byte> data, string chunkDigest)
    {
        Span<byte> expected = stackalloc byte[32];
        if (!TryParseSha256(chunkDigest, expected)) return false;
        Span<byte> actual = stackalloc byte[32];
        SHA256.HashData(data, actual);
        return CryptographicOperations.FixedTimeEquals(actual, expected);
    }

    /// <summary>Parses "sha256:hex" into 32 bytes.</summary>
    public static bool TryParseSha256(string? digest, Span<byte> hash32)
    {
        if (digest is null || digest.Length != 71 || !digest.StartsWith("sha256:", StringComparison.Ordinal)) return false;
        return Convert.FromHexString(digest.AsSpan(7), hash32, out _, out int written) == OperationStatus.Done && written == 32;
    }

    /// <summary>"sha256:" + lowercase hex of the data's sha256.</summary>
    public static string Sha256Digest(ReadOnlySpan<byte> data) => Digest.Sha256Of(data).ToString();

    public static string FormatSha256(ReadOnlySpan<byte> hash32) => Digest.FromSha256(hash32).ToString();
}
