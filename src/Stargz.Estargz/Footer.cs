using System.Buffers.Binary;
using System.Globalization;
using System.Text;

namespace Stargz.Estargz;

/// <summary>The compression of an eStargz-style blob.</summary>
public enum BlobCompression { Gzip, Zstd }

/// <summary>What a footer says. <see cref="TocLength"/> is -1 when the footer does not carry it (gzip: the TOC
/// runs from <see cref="TocOffset"/> to the footer).</summary>
public readonly record struct FooterInfo(long TocOffset, long TocLength, BlobCompression Compression, bool Legacy, int FooterSize)
{
    /// <summary>Where the payload (chunks) ends: the TOC member for gzip, the TOC's skippable frame header for zstd.</summary>
    public long PayloadEnd => Compression == BlobCompression.Zstd ? TocOffset - 8 : TocOffset;
}

/// <summary>
/// Footers: eStargz (51-byte empty gzip member whose Extra field holds subfield "SG" = %016x(tocOffset) + "STARGZ"),
/// legacy stargz (47 bytes, the same payload as the bare Extra field) and zstd:chunked (a skippable frame whose
/// 40-byte payload is tocOffset, compressed length, uncompressed length, manifest type, "GnUlInUx", all LE).
/// </summary>
public static class Footer
{
    public const int Size = 51;
    public const int LegacySize = 47;
    /// <summary>zstd:chunked: 8-byte skippable frame header + 40-byte payload.</summary>
    public const int ZstdSize = 48;
    public const int ZstdPayloadSize = 40;
    /// <summary>The most tail bytes any footer needs.</summary>
    public const int MaxFooterSize = 51;

    private static ReadOnlySpan<byte> ZstdChunkedMagic => "GnUlInUx"u8;
    internal static ReadOnlySpan<byte> SkippableMagic => [0x50, 0x2a, 0x4d, 0x18];
    private const ulong ManifestTypeCrfs = 1;

    /// <summary>Parses the footer at the end of <paramref name="blobTail"/> (pass the last <see cref="MaxFooterSize"/>
    /// bytes, or the whole blob if shorter). Tries eStargz, then legacy, then zstd:chunked.</summary>
    public static bool TryParse(ReadOnlySpan<byte> blobTail, out FooterInfo info)
    {
        if (blobTail.Length >= Size && TryParseGzip(blobTail[^Size..], legacy: false, out info)) return true;
        if (blobTail.Length >= LegacySize && TryParseGzip(blobTail[^LegacySize..], legacy: true, out info)) return true;
        if (blobTail.Length >= ZstdPayloadSize && TryParseZstd(blobTail, out info)) return true;
        info = default;
        return false;
    }

    private static bool TryParseGzip(ReadOnlySpan<byte> f, bool legacy, out FooterInfo info)
    {
        info = default;
        // ID1 ID2 CM FLG(FEXTRA) MTIME(4) XFL OS XLEN(2)
        if (f[0] != 0x1f || f[1] != 0x8b || f[2] != 8 || (f[3] & 0x04) == 0 || (f[3] & 0xE0) != 0) return false;
        if ((f[3] & ~0x04) != 0) return false; // the reference writes only FEXTRA; anything else cannot be a 51/47-byte footer
        int xlen = BinaryPrimitives.ReadUInt16LittleEndian(f.Slice(10, 2));
        ReadOnlySpan<byte> payload;
        if (!legacy)
        {
            if (xlen != 26 || f[12] != (byte)'S' || f[13] != (byte)'G' || BinaryPrimitives.ReadUInt16LittleEndian(f.Slice(14, 2)) != 22) return false;
            payload = f.Slice(16, 22);
        }
        else
        {
            if (xlen != 22) return false;
            payload = f.Slice(12, 22);
        }
        if (!payload[16..].SequenceEqual("STARGZ"u8)) return false;
        Span<char> hex = stackalloc char[16];
        for (int i = 0; i < 16; i++) hex[i] = (char)payload[i];
        if (!long.TryParse(hex, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var off) || off < 0) return false;
        // The rest must be an empty deflate stream followed by CRC32 = 0 and ISIZE = 0.
        if (!f[^8..].SequenceEqual(stackalloc byte[8])) return false;
        info = new FooterInfo(off, -1, BlobCompression.Gzip, legacy, legacy ? LegacySize : Size);
        return true;
    }

    private static bool TryParseZstd(ReadOnlySpan<byte> tail, out FooterInfo info)
    {
        info = default;
        var p = tail[^ZstdPayloadSize..];
        if (!p.Slice(32, 8).SequenceEqual(ZstdChunkedMagic)) return false;
        ulong off = BinaryPrimitives.ReadUInt64LittleEndian(p);
        ulong clen = BinaryPrimitives.ReadUInt64LittleEndian(p[8..]);
        ulong type = BinaryPrimitives.ReadUInt64LittleEndian(p[24..]);
        if (type != ManifestTypeCrfs || off < 8 || off > long.MaxValue || clen > long.MaxValue) return false;
        info = new FooterInfo((long)off, (long)clen, BlobCompression.Zstd, false, ZstdSize);
        return true;
    }

    /// <summary>The 51-byte eStargz footer pointing at <paramref name="tocOffset"/>.</summary>
    public static byte[] BuildGzip(long tocOffset)
    {
        var f = new byte[Size];
        f[0] = 0x1f; f[1] = 0x8b; f[2] = 8; f[3] = 0x04; // FEXTRA, mtime 0
        f[8] = 0; f[9] = 255; // XFL, OS unknown (as Go writes)
        BinaryPrimitives.WriteUInt16LittleEndian(f.AsSpan(10), 26);
        f[12] = (byte)'S'; f[13] = (byte)'G';
        BinaryPrimitives.WriteUInt16LittleEndian(f.AsSpan(14), 22);
        Encoding.ASCII.GetBytes(tocOffset.ToString("x16", CultureInfo.InvariantCulture) + "STARGZ", f.AsSpan(16));
        // Empty final stored deflate block: BFINAL=1,BTYPE=00, LEN=0, NLEN=0xffff. Then CRC32=0, ISIZE=0.
        f[38] = 0x01; f[39] = 0x00; f[40] = 0x00; f[41] = 0xff; f[42] = 0xff;
        return f;
    }

    /// <summary>The 48-byte zstd:chunked footer (skippable frame) for a TOC frame whose data starts at <paramref name="tocOffset"/>.</summary>
    public static byte[] BuildZstd(long tocOffset, long tocCompressedLength, long tocJsonLength)
    {
        var f = new byte[ZstdSize];
        SkippableMagic.CopyTo(f);
        BinaryPrimitives.WriteUInt32LittleEndian(f.AsSpan(4), ZstdPayloadSize);
        var p = f.AsSpan(8);
        BinaryPrimitives.WriteUInt64LittleEndian(p, (ulong)tocOffset);
        BinaryPrimitives.WriteUInt64LittleEndian(p[8..], (ulong)tocCompressedLength);
        BinaryPrimitives.WriteUInt64LittleEndian(p[16..], (ulong)tocJsonLength);
        BinaryPrimitives.WriteUInt64LittleEndian(p[24..], ManifestTypeCrfs);
        ZstdChunkedMagic.CopyTo(p[32..]);
        return f;
    }
}
