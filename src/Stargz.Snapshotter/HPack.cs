using System.Buffers;

namespace Stargz.Snapshotter;

/// <summary>One decoded header field. <see cref="NeverIndexed"/> keeps the client's "never indexed" mark.</summary>
internal readonly record struct HeaderField(byte[] Name, byte[] Value, bool NeverIndexed);

/// <summary>
/// HPACK (RFC 7541) for <see cref="AuthorityFilter"/>: decodes a client's request header blocks with the dynamic table
/// the client's encoder keeps in step with, and writes fields back as plain literals that leave the receiver's dynamic
/// table alone. Any malformed block makes <see cref="TryDecode"/> return false; the caller then leaves the bytes to
/// Kestrel, which answers them as it always does.
/// </summary>
internal sealed class HPackDecoder
{
    private const int EntryOverhead = 32; // RFC 7541 4.1
    private readonly int _maxAllowedSize;   // the SETTINGS_HEADER_TABLE_SIZE the server advertised
    private int _maxSize;
    private int _size;
    // Newest entry last: dynamic index 62 is _table[^1].
    private readonly List<(byte[] Name, byte[] Value)> _table = [];

    public HPackDecoder(int maxTableSize)
    {
        _maxAllowedSize = maxTableSize;
        _maxSize = maxTableSize;
    }

    public int TableCount => _table.Count;
    public int TableSize => _size;

    /// <summary>Decodes one complete header block into <paramref name="fields"/> (appended); false when malformed.</summary>
    public bool TryDecode(ReadOnlySpan<byte> block, List<HeaderField> fields)
    {
        int i = 0;
        bool sawField = false;
        while (i < block.Length)
        {
            byte b = block[i];
            if ((b & 0x80) != 0)
            {
                // Indexed field.
                if (!TryReadInt(block, ref i, 7, out int index) || !TryGetEntry(index, out var name, out var value)) return false;
                fields.Add(new HeaderField(name, value, false));
            }
            else if ((b & 0x40) != 0)
            {
                // Literal with incremental indexing.
                if (!TryReadLiteral(block, ref i, 6, out var name, out var value)) return false;
                Add(name, value);
                fields.Add(new HeaderField(name, value, false));
            }
            else if ((b & 0x20) != 0)
            {
                // Dynamic table size update: only before the block's first field, never above the advertised size.
                if (sawField || !TryReadInt(block, ref i, 5, out int size) || size > _maxAllowedSize) return false;
                _maxSize = size;
                Evict(0);
                continue;
            }
            else
            {
                // Literal without indexing (0000) or never indexed (0001).
                bool never = (b & 0x10) != 0;
                if (!TryReadLiteral(block, ref i, 4, out var name, out var value)) return false;
                fields.Add(new HeaderField(name, value, never));
            }
            sawField = true;
        }
        return true;
    }

    private bool TryReadLiteral(ReadOnlySpan<byte> block, ref int i, int prefixBits, out byte[] name, out byte[] value)
    {
        value = [];
        if (!TryReadInt(block, ref i, prefixBits, out int index)) { name = []; return false; }
        if (index == 0)
        {
            if (!TryReadString(block, ref i, out name)) return false;
        }
        else if (!TryGetEntry(index, out name, out _)) return false;
        return TryReadString(block, ref i, out value);
    }

    private bool TryGetEntry(int index, out byte[] name, out byte[] value)
    {
        if (index >= 1 && index <= HPackStaticTable.Count)
        {
            (name, value) = HPackStaticTable.Get(index);
            return true;
        }
        int d = index - HPackStaticTable.Count - 1;
        if (index > HPackStaticTable.Count && d < _table.Count)
        {
            (name, value) = _table[_table.Count - 1 - d];
            return true;
        }
        name = value = [];
        return false;
    }

    private void Add(byte[] name, byte[] value)
    {
        int size = name.Length + value.Length + EntryOverhead;
        // An entry larger than the table empties it and is not added (RFC 7541 4.4).
        Evict(size);
        if (size > _maxSize) return;
        _table.Add((name, value));
        _size += size;
    }

    /// <summary>Drops the oldest entries until <paramref name="room"/> more bytes fit (or the table is empty).</summary>
    private void Evict(int room)
    {
        int drop = 0;
        while (drop < _table.Count && _size + room > _maxSize)
        {
            _size -= _table[drop].Name.Length + _table[drop].Value.Length + EntryOverhead;
            drop++;
        }
        if (drop > 0) _table.RemoveRange(0, drop);
    }

    internal static bool TryReadInt(ReadOnlySpan<byte> s, ref int i, int prefixBits, out int value)
    {
        value = 0;
        if (i >= s.Length) return false;
        int mask = (1 << prefixBits) - 1;
        int v = s[i++] & mask;
        if (v < mask) { value = v; return true; }
        for (int shift = 0; ; shift += 7)
        {
            // Values beyond 2^28 are never legitimate here (lengths, indexes, table sizes).
            if (i >= s.Length || shift > 21) return false;
            byte b = s[i++];
            v += (b & 0x7f) << shift;
            if ((b & 0x80) == 0) break;
        }
        value = v;
        return true;
    }

    private static bool TryReadString(ReadOnlySpan<byte> s, ref int i, out byte[] str)
    {
        str = [];
        if (i >= s.Length) return false;
        bool huffman = (s[i] & 0x80) != 0;
        if (!TryReadInt(s, ref i, 7, out int len) || len > s.Length - i) return false;
        var raw = s.Slice(i, len);
        i += len;
        if (!huffman)
        {
            str = raw.ToArray();
            return true;
        }
        // The shortest code is 5 bits, so the decoded string is at most len * 8 / 5 bytes.
        var buf = ArrayPool<byte>.Shared.Rent(len * 8 / 5 + 1);
        try
        {
            int n = HPackHuffman.Decode(raw, buf);
            if (n < 0) return false;
            str = buf.AsSpan(0, n).ToArray();
            return true;
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
    }
}

/// <summary>Writes header fields as literals without indexing (or never indexed), strings not Huffman-coded.</summary>
internal static class HPackLiteralEncoder
{
    public static void Write(IBufferWriter<byte> w, in HeaderField f)
    {
        WriteInt(w, f.NeverIndexed ? (byte)0x10 : (byte)0x00, 4, 0);
        WriteString(w, f.Name);
        WriteString(w, f.Value);
    }

    private static void WriteString(IBufferWriter<byte> w, byte[] s)
    {
        WriteInt(w, 0x00, 7, s.Length);
        w.Write(s);
    }

    internal static void WriteInt(IBufferWriter<byte> w, byte flags, int prefixBits, int value)
    {
        var span = w.GetSpan(6);
        int mask = (1 << prefixBits) - 1;
        int n = 0;
        if (value < mask)
        {
            span[n++] = (byte)(flags | value);
        }
        else
        {
            span[n++] = (byte)(flags | mask);
            value -= mask;
            while (value >= 0x80)
            {
                span[n++] = (byte)(value & 0x7f | 0x80);
                value >>= 7;
            }
            span[n++] = (byte)value;
        }
        w.Advance(n);
    }
}

/// <summary>RFC 7541 Appendix A.</summary>
internal static class HPackStaticTable
{
    public const int Count = 61;

    private static readonly (byte[] Name, byte[] Value)[] Entries = Build(
    [
        ":authority", "", ":method", "GET", ":method", "POST", ":path", "/", ":path", "/index.html",
        ":scheme", "http", ":scheme", "https", ":status", "200", ":status", "204", ":status", "206",
        ":status", "304", ":status", "400", ":status", "404", ":status", "500", "accept-charset", "",
        "accept-encoding", "gzip, deflate", "accept-language", "", "accept-ranges", "", "accept", "",
        "access-control-allow-origin", "", "age", "", "allow", "", "authorization", "", "cache-control", "",
        "content-disposition", "", "content-encoding", "", "content-language", "", "content-length", "",
        "content-location", "", "content-range", "", "content-type", "", "cookie", "", "date", "", "etag", "",
        "expect", "", "expires", "", "from", "", "host", "", "if-match", "", "if-modified-since", "",
        "if-none-match", "", "if-range", "", "if-unmodified-since", "", "last-modified", "", "link", "",
        "location", "", "max-forwards", "", "proxy-authenticate", "", "proxy-authorization", "", "range", "",
        "referer", "", "refresh", "", "retry-after", "", "server", "", "set-cookie", "",
        "strict-transport-security", "", "transfer-encoding", "", "user-agent", "", "vary", "", "via", "",
        "www-authenticate", "",
    ]);

    public static (byte[] Name, byte[] Value) Get(int index) => Entries[index - 1];

    private static (byte[], byte[])[] Build(string[] pairs)
    {
        var e = new (byte[], byte[])[pairs.Length / 2];
        for (int i = 0; i < e.Length; i++)
            e[i] = (System.Text.Encoding.ASCII.GetBytes(pairs[2 * i]), System.Text.Encoding.ASCII.GetBytes(pairs[2 * i + 1]));
        return e;
    }
}

/// <summary>
/// The HPACK Huffman code (RFC 7541 Appendix B) as a canonical code: the appendix's codes are exactly the canonical
/// codes for these bit lengths (symbols 0..255, then EOS = 256), so the lengths are all that is stored.
/// </summary>
internal static class HPackHuffman
{
    private const int Eos = 256;
    private const int MaxBits = 30;

    private static ReadOnlySpan<byte> Lengths =>
    [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
        6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
        13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
        15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
        20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
        22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
        26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
        20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
        30,
    ];

    // Canonical decoding tables: codes of length L are FirstCode[L] .. FirstCode[L] + CountOf[L] - 1, in symbol order
    // starting at Symbols[FirstIndex[L]].
    private static readonly int[] FirstCode = new int[MaxBits + 1];
    private static readonly int[] CountOf = new int[MaxBits + 1];
    private static readonly int[] FirstIndex = new int[MaxBits + 1];
    private static readonly short[] Symbols = new short[257];

    static HPackHuffman()
    {
        var lengths = Lengths;
        for (int s = 0; s < lengths.Length; s++) CountOf[lengths[s]]++;
        int code = 0, index = 0;
        for (int len = 1; len <= MaxBits; len++)
        {
            FirstCode[len] = code;
            FirstIndex[len] = index;
            index += CountOf[len];
            code = (code + CountOf[len]) << 1;
        }
        var next = (int[])FirstIndex.Clone();
        for (int s = 0; s < lengths.Length; s++) Symbols[next[lengths[s]]++] = (short)s;
    }

    /// <summary>Decodes into <paramref name="dst"/>; returns the byte count, or -1 for an invalid string (EOS inside,
    /// padding longer than 7 bits or not all ones, or <paramref name="dst"/> too small).</summary>
    public static int Decode(ReadOnlySpan<byte> src, Span<byte> dst)
    {
        int n = 0, code = 0, len = 0;
        foreach (byte b in src)
        {
            for (int bit = 7; bit >= 0; bit--)
            {
                code = (code << 1) | ((b >> bit) & 1);
                len++;
                int k = code - FirstCode[len];
                if (k >= 0 && k < CountOf[len])
                {
                    int sym = Symbols[FirstIndex[len] + k];
                    if (sym == Eos || n >= dst.Length) return -1;
                    dst[n++] = (byte)sym;
                    code = 0;
                    len = 0;
                }
                else if (len == MaxBits) return -1;
            }
        }
        // Padding: the most significant bits of EOS (all ones), shorter than a byte.
        if (len > 7 || code != (1 << len) - 1) return -1;
        return n;
    }
}
