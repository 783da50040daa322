using System.Text;

namespace Stargz.Estargz;

/// <summary>
/// A minimal tar header reader over a seekable stream that keeps every byte as stored: ustar, GNU ("ustar  ", long
/// names 'L'/'K', base-256 numbers), PAX ('x' records with raw byte values, so binary xattrs such as
/// security.capability survive). Payloads are not read, only located (<see cref="TarMeta"/> + data offset).
/// </summary>
internal sealed class TarStreamReader(Stream stream)
{
    private const int MaxMetaBytes = 8 << 20;
    private readonly byte[] _block = new byte[512];

    public (TarMeta Meta, long DataOffset)? Next()
    {
        Dictionary<string, byte[]>? pax = null;
        string? longName = null, longLink = null;
        while (true)
        {
            long headerPos = stream.Position;
            int n = ReadFull(_block);
            if (n == 0) return null;
            if (n < 512) throw new EstargzFormatException($"tar header at {headerPos} is truncated");
            if (IsZero(_block)) return null; // end of archive
            if (!ChecksumOk(_block)) throw new EstargzFormatException($"bad tar header checksum at offset {headerPos}");
            byte type = _block[156];
            long size = Number(_block.AsSpan(124, 12), "size", headerPos);
            if (size < 0) throw new EstargzFormatException($"negative size in tar header at {headerPos}");
            long dataOffset = stream.Position;
            switch (type)
            {
                case (byte)'x':
                case (byte)'L':
                case (byte)'K':
                {
                    if (size > MaxMetaBytes) throw new EstargzFormatException($"tar extended header at {headerPos} is {size} bytes");
                    var data = new byte[size];
                    if (ReadFull(data) != size) throw new EstargzFormatException($"tar extended header at {headerPos} is truncated");
                    SkipPadding(size);
                    if (type == 'x') pax = ParsePax(data, headerPos);
                    else if (type == 'L') longName = CString(data);
                    else longLink = CString(data);
                    continue;
                }
                case (byte)'g':
                    SkipData(size);
                    continue;
            }
            var magic = _block.AsSpan(257, 8);
            bool gnu = magic.SequenceEqual("ustar  \0"u8);
            bool ustar = magic[..6].SequenceEqual("ustar\0"u8);
            var name = CString(_block.AsSpan(0, 100));
            if (ustar && !gnu)
            {
                var prefix = CString(_block.AsSpan(345, 155));
                if (prefix.Length > 0) name = prefix + "/" + name;
            }
            var m = new TarMeta
            {
                Name = name,
                Mode = Number(_block.AsSpan(100, 8), "mode", headerPos) & 0xFFF,
                Uid = (int)Number(_block.AsSpan(108, 8), "uid", headerPos),
                Gid = (int)Number(_block.AsSpan(116, 8), "gid", headerPos),
                MTime = Number(_block.AsSpan(136, 12), "mtime", headerPos),
                LinkName = CString(_block.AsSpan(157, 100)),
                UserName = NullIfEmpty(CString(_block.AsSpan(265, 32))),
                GroupName = NullIfEmpty(CString(_block.AsSpan(297, 32))),
            };
            if (type is (byte)'3' or (byte)'4')
            {
                m.DevMajor = (int)Number(_block.AsSpan(329, 8), "devmajor", headerPos);
                m.DevMinor = (int)Number(_block.AsSpan(337, 8), "devminor", headerPos);
            }
            if (longName is not null) m.Name = longName;
            if (longLink is not null) m.LinkName = longLink;
            if (pax is not null)
            {
                foreach (var (k, v) in pax)
                {
                    switch (k)
                    {
                        case "path": m.Name = Encoding.UTF8.GetString(v); break;
                        case "linkpath": m.LinkName = Encoding.UTF8.GetString(v); break;
                        case "size": size = PaxLong(v, k, headerPos); break;
                        case "uid": m.Uid = (int)PaxLong(v, k, headerPos); break;
                        case "gid": m.Gid = (int)PaxLong(v, k, headerPos); break;
                        case "uname": m.UserName = NullIfEmpty(Encoding.UTF8.GetString(v)); break;
                        case "gname": m.GroupName = NullIfEmpty(Encoding.UTF8.GetString(v)); break;
                        case "mtime": m.MTime = PaxTime(v, headerPos); break;
                        default:
                            if (k.StartsWith("SCHILY.xattr.", StringComparison.Ordinal))
                                (m.Xattrs ??= new Dictionary<string, byte[]>(StringComparer.Ordinal))[k["SCHILY.xattr.".Length..]] = v;
                            break;
                    }
                }
            }
            if (size < 0) throw new EstargzFormatException($"negative size for \"{m.Name}\"");
            m.TypeFlag = type switch
            {
                (byte)'0' or 0 or (byte)'7' => m.Name.EndsWith('/') ? (byte)'5' : (byte)'0',
                (byte)'1' or (byte)'2' or (byte)'3' or (byte)'4' or (byte)'5' or (byte)'6' => type,
                _ => throw new EstargzFormatException($"unsupported tar entry type '{(char)type}' for \"{m.Name}\""),
            };
            if (m.TypeFlag is not ((byte)'1' or (byte)'2')) m.LinkName = null;
            // Only regular files carry data; other types' size fields are skipped but not kept.
            m.Size = m.TypeFlag == (byte)'0' ? size : 0;
            if (dataOffset + size > stream.Length) throw new EstargzFormatException($"tar entry \"{m.Name}\" runs past the end of the input");
            SkipData(size);
            return (m, dataOffset);
        }
    }

    private static string? NullIfEmpty(string s) => s.Length == 0 ? null : s;

    private int ReadFull(Span<byte> buf)
    {
        int done = 0;
        while (done < buf.Length)
        {
            int n = stream.Read(buf[done..]);
            if (n == 0) break;
            done += n;
        }
        return done;
    }

    private void SkipPadding(long size)
    {
        long pad = (512 - size % 512) % 512;
        if (pad > 0) stream.Seek(pad, SeekOrigin.Current);
    }

    private void SkipData(long size) => stream.Seek(size + (512 - size % 512) % 512, SeekOrigin.Current);

    private static bool IsZero(ReadOnlySpan<byte> b) => !b.ContainsAnyExcept((byte)0);

    private static bool ChecksumOk(ReadOnlySpan<byte> h)
    {
        long stored;
        try { stored = Number(h.Slice(148, 8), "checksum", 0); }
        catch (EstargzFormatException) { return false; }
        long unsigned = 0, signed = 0;
        for (int i = 0; i < 512; i++)
        {
            byte b = i >= 148 && i < 156 ? (byte)' ' : h[i];
            unsigned += b;
            signed += (sbyte)b;
        }
        return stored == unsigned || stored == signed;
    }

    private static string CString(ReadOnlySpan<byte> b)
    {
        int z = b.IndexOf((byte)0);
        return Encoding.UTF8.GetString(z < 0 ? b : b[..z]);
    }

    private static long Number(ReadOnlySpan<byte> f, string what, long at)
    {
        if ((f[0] & 0x80) != 0)
        {
            // base-256 (GNU/star): big-endian, the top bit marks it; negative values are not accepted here.
            if ((f[0] & 0x40) != 0) throw new EstargzFormatException($"tar {what} at {at} is negative");
            ulong v = (ulong)(f[0] & 0x3f);
            for (int i = 1; i < f.Length; i++)
            {
                if ((v >> 55) != 0) throw new EstargzFormatException($"tar {what} at {at} is out of range");
                v = (v << 8) | f[i];
            }
            if (v > long.MaxValue) throw new EstargzFormatException($"tar {what} at {at} is out of range");
            return (long)v;
        }
        long r = 0;
        bool any = false;
        foreach (var c in f)
        {
            if (c == 0 || c == (byte)' ') { if (any) break; continue; }
            if (c < '0' || c > '7') throw new EstargzFormatException($"tar {what} at {at} is not octal");
            if (r > (long.MaxValue >> 3)) throw new EstargzFormatException($"tar {what} at {at} is out of range");
            r = (r << 3) | (uint)(c - '0');
            any = true;
        }
        return r;
    }

    private static Dictionary<string, byte[]> ParsePax(byte[] data, long at)
    {
        var d = new Dictionary<string, byte[]>(StringComparer.Ordinal);
        int pos = 0;
        while (pos < data.Length)
        {
            if (data[pos] == 0) break;
            int sp = Array.IndexOf(data, (byte)' ', pos);
            if (sp < 0 || !int.TryParse(data.AsSpan(pos, sp - pos), out int len) || len <= sp - pos + 1 || pos + len > data.Length || data[pos + len - 1] != (byte)'\n')
                throw new EstargzFormatException($"malformed PAX record in tar header at {at}");
            var rec = data.AsSpan(sp + 1, pos + len - 1 - (sp + 1));
            int eq = rec.IndexOf((byte)'=');
            if (eq <= 0) throw new EstargzFormatException($"malformed PAX record in tar header at {at}");
            d[Encoding.UTF8.GetString(rec[..eq])] = rec[(eq + 1)..].ToArray();
            pos += len;
        }
        return d;
    }

    private static long PaxLong(byte[] v, string key, long at)
    {
        if (!long.TryParse(v, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var r))
            throw new EstargzFormatException($"PAX {key} in tar header at {at} is not a number");
        return r;
    }

    private static long PaxTime(byte[] v, long at)
    {
        var s = Encoding.ASCII.GetString(v);
        int dot = s.IndexOf('.');
        var whole = dot < 0 ? s : s[..dot];
        if (!long.TryParse(whole, System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out var r))
            throw new EstargzFormatException($"PAX mtime in tar header at {at} is not a number");
        if (dot >= 0 && r < 0 && s.AsSpan(dot + 1).ContainsAnyExcept('0')) r--; // floor for negative fractions
        return r;
    }
}
