using System.Buffers;
using System.Globalization;
using System.Text;

namespace Stargz.Estargz;

/// <summary>A growable byte buffer rented from the shared pool.</summary>
internal sealed class PooledBuffer : IDisposable
{
    public byte[] Buffer;
    public int Length;

    public PooledBuffer(int capacity) => Buffer = ArrayPool<byte>.Shared.Rent(Math.Max(capacity, 1024));

    public Span<byte> Reserve(int n)
    {
        if (Length + n > Buffer.Length)
        {
            var nb = ArrayPool<byte>.Shared.Rent(Math.Max(Length + n, Buffer.Length * 2));
            Buffer.AsSpan(0, Length).CopyTo(nb);
            ArrayPool<byte>.Shared.Return(Buffer);
            Buffer = nb;
        }
        var s = Buffer.AsSpan(Length, n);
        Length += n;
        return s;
    }

    public void Append(ReadOnlySpan<byte> data) => data.CopyTo(Reserve(data.Length));

    public void AppendZeros(int n) => Reserve(n).Clear();

    public ReadOnlySpan<byte> Span => Buffer.AsSpan(0, Length);

    public void Dispose()
    {
        if (Buffer.Length > 0) ArrayPool<byte>.Shared.Return(Buffer);
        Buffer = Array.Empty<byte>();
        Length = 0;
    }
}

/// <summary>Metadata of one tar entry as the builder writes it.</summary>
internal sealed class TarMeta
{
    public string Name = "";
    public byte TypeFlag;
    public long Mode;
    public int Uid, Gid;
    public string? UserName, GroupName;
    public long Size;
    public long MTime;
    public string? LinkName;
    public int DevMajor, DevMinor;
    public Dictionary<string, byte[]>? Xattrs;
}

/// <summary>Writes POSIX ustar headers, preceded by a PAX extended header when a value does not fit.</summary>
internal static class TarHeaderWriter
{
    private const long MaxOctal11 = 0x1FFFFFFFFL; // 8^11 - 1
    private const long MaxOctal7 = 0x1FFFFF;      // 8^7 - 1

    public static void Write(PooledBuffer buf, TarMeta m)
    {
        List<(string Key, byte[] Value)>? pax = null;
        void Add(string k, byte[] v) => (pax ??= new()).Add((k, v));

        string name = m.Name, prefix = "";
        if (!IsAscii(name) || !SplitUstarName(name, out prefix, out name))
        {
            Add("path", Encoding.UTF8.GetBytes(m.Name));
            name = Truncate(m.Name, 100);
            prefix = "";
        }
        var link = m.LinkName ?? "";
        if (!IsAscii(link) || link.Length > 100) { Add("linkpath", Encoding.UTF8.GetBytes(link)); link = Truncate(link, 100); }
        if (m.Size > MaxOctal11) Add("size", Ascii(m.Size));
        if (m.Uid < 0 || m.Uid > MaxOctal7) Add("uid", Ascii(m.Uid));
        if (m.Gid < 0 || m.Gid > MaxOctal7) Add("gid", Ascii(m.Gid));
        if (m.MTime < 0 || m.MTime > MaxOctal11) Add("mtime", Ascii(m.MTime));
        var uname = m.UserName ?? "";
        if (!IsAscii(uname) || uname.Length > 32) { Add("uname", Encoding.UTF8.GetBytes(uname)); uname = ""; }
        var gname = m.GroupName ?? "";
        if (!IsAscii(gname) || gname.Length > 32) { Add("gname", Encoding.UTF8.GetBytes(gname)); gname = ""; }
        if (m.Xattrs is { Count: > 0 })
        {
            var keys = new List<string>(m.Xattrs.Keys);
            keys.Sort(StringComparer.Ordinal);
            foreach (var k in keys) Add("SCHILY.xattr." + k, m.Xattrs[k]);
        }
        if (pax is not null)
        {
            var rec = new PooledBuffer(512);
            try
            {
                pax.Sort((a, b) => string.CompareOrdinal(a.Key, b.Key));
                foreach (var (k, v) in pax) AppendRecord(rec, k, v);
                WriteUstar(buf, "PaxHeaders.0/" + Truncate(BaseName(m.Name), 80), "", (byte)'x', 0x1a4, 0, 0, "", "", rec.Length, 0, "", 0, 0);
                buf.Append(rec.Span);
                Pad(buf, rec.Length);
            }
            finally { rec.Dispose(); }
        }
        WriteUstar(buf, name, prefix, m.TypeFlag, m.Mode & 0x1FFFFF, Clamp7(m.Uid), Clamp7(m.Gid), uname, gname,
            m.Size > MaxOctal11 ? 0 : m.Size, m.MTime < 0 || m.MTime > MaxOctal11 ? 0 : m.MTime, link, m.DevMajor, m.DevMinor);
    }

    public static void Pad(PooledBuffer buf, long size)
    {
        int pad = (int)((512 - (size % 512)) % 512);
        if (pad > 0) buf.AppendZeros(pad);
    }

    private static int Clamp7(int v) => v < 0 || v > MaxOctal7 ? 0 : v;

    private static string BaseName(string n)
    {
        n = n.TrimEnd('/');
        int i = n.LastIndexOf('/');
        return i < 0 ? n : n[(i + 1)..];
    }

    private static byte[] Ascii(long v) => Encoding.ASCII.GetBytes(v.ToString(CultureInfo.InvariantCulture));

    private static string Truncate(string s, int n)
    {
        var sb = new StringBuilder();
        foreach (var ch in s)
        {
            if (sb.Length >= n) break;
            sb.Append(ch < 0x80 && ch != 0 ? ch : '_');
        }
        return sb.ToString();
    }

    private static bool IsAscii(string s)
    {
        foreach (var ch in s) if (ch >= 0x80 || ch == 0) return false;
        return true;
    }

    private static bool SplitUstarName(string full, out string prefix, out string name)
    {
        prefix = "";
        name = full;
        if (full.Length <= 100) return true;
        for (int i = full.Length - 1; i > 0; i--)
        {
            if (full[i] != '/') continue;
            if (i <= 155 && full.Length - i - 1 <= 100 && full.Length - i - 1 > 0)
            {
                prefix = full[..i];
                name = full[(i + 1)..];
                return true;
            }
        }
        return false;
    }

    private static void AppendRecord(PooledBuffer rec, string key, byte[] value)
    {
        int body = 1 + Encoding.UTF8.GetByteCount(key) + 1 + value.Length + 1; // " key=value\n"
        int len = body + 1;
        while (len != body + len.ToString(CultureInfo.InvariantCulture).Length) len = body + len.ToString(CultureInfo.InvariantCulture).Length;
        rec.Append(Encoding.ASCII.GetBytes(len.ToString(CultureInfo.InvariantCulture) + " "));
        rec.Append(Encoding.UTF8.GetBytes(key + "="));
        rec.Append(value);
        rec.Append("\n"u8);
    }

    private static void WriteUstar(PooledBuffer buf, string name, string prefix, byte type, long mode, int uid, int gid,
        string uname, string gname, long size, long mtime, string link, int devMajor, int devMinor)
    {
        var h = buf.Reserve(512);
        h.Clear();
        Encoding.ASCII.GetBytes(name, h[..100]);
        Octal(h.Slice(100, 8), mode);
        Octal(h.Slice(108, 8), uid);
        Octal(h.Slice(116, 8), gid);
        Octal(h.Slice(124, 12), size);
        Octal(h.Slice(136, 12), mtime);
        h[156] = type;
        Encoding.ASCII.GetBytes(link, h.Slice(157, 100));
        "ustar\0"u8.CopyTo(h.Slice(257, 6));
        "00"u8.CopyTo(h.Slice(263, 2));
        Encoding.ASCII.GetBytes(uname, h.Slice(265, 32));
        Encoding.ASCII.GetBytes(gname, h.Slice(297, 32));
        if (type is (byte)'3' or (byte)'4')
        {
            Octal(h.Slice(329, 8), Math.Clamp(devMajor, 0, MaxOctal7));
            Octal(h.Slice(337, 8), Math.Clamp(devMinor, 0, MaxOctal7));
        }
        Encoding.ASCII.GetBytes(prefix, h.Slice(345, 155));
        h.Slice(148, 8).Fill((byte)' ');
        int sum = 0;
        foreach (var b in h) sum += b;
        Octal(h.Slice(148, 7), sum);
        h[155] = (byte)' ';
    }

    private static void Octal(Span<byte> field, long v)
    {
        int digits = field.Length - 1;
        for (int i = digits - 1; i >= 0; i--)
        {
            field[i] = (byte)('0' + (v & 7));
            v >>= 3;
        }
        field[digits] = 0;
    }
}
