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
    public static unsafe void Decompress(BlobCompression c, ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination)
    {
        if (innerOffset < 0) throw new EstargzFormatException($"negative innerOffset {innerOffset}");
        fixed (byte* p = compressed)
        {
            using var ums = new UnmanagedMemoryStream(p, compressed.Length);
            try
            {
                using Stream dec = c == BlobCompression.Gzip
                    ? new GZipStream(ums, CompressionMode.Decompress, leaveOpen: true)
                    : new DecompressionStream(ums, bufferSize: 0, checkEndOfStream: false, leaveOpen: true);
                if (innerOffset > 0) Skip(dec, innerOffset);
                int done = 0;
                while (done < destination.Length)
                {
                    int n = dec.Read(destination[done..]);
                    if (n == 0) throw new EstargzFormatException($"compressed chunk ended after {innerOffset + done} bytes, {innerOffset + destination.Length} expected");
                    done += n;
                }
            }
            catch (InvalidDataException e) { throw new EstargzFormatException($"corrupt {c} data: {e.Message}", e); }
            catch (ZstdException e) { throw new EstargzFormatException($"corrupt {c} data: {e.Message}", e); }
            catch (IOException e) when (e is not EndOfStreamException) { throw new EstargzFormatException($"corrupt {c} data: {e.Message}", e); }
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
    public static string Sha256Digest(ReadOnlySpan<byte> data)
    {
        Span<byte> h = stackalloc byte[32];
        SHA256.HashData(data, h);
        return FormatSha256(h);
    }

    public static string FormatSha256(ReadOnlySpan<byte> hash32) => "sha256:" + Convert.ToHexStringLower(hash32);
}
