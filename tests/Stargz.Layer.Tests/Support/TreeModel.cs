using System.Formats.Tar;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;

namespace Stargz.Layer.Tests.Support;

/// <summary>What a user sees of one file: type, permissions, owner, mtime, size, content, link target, xattrs, nlink.</summary>
public sealed record FileView(char Type, uint Perm, uint Uid, uint Gid, long MTime, long Size, string? ContentSha,
    string? LinkTarget, string Xattrs, uint NLink, uint DevMajor, uint DevMinor)
{
    public override string ToString() =>
        $"{Type} {Convert.ToString(Perm, 8)} {Uid}:{Gid} mtime={MTime} size={Size} sha={ContentSha?[..12]} link={LinkTarget} xattrs=[{Xattrs}] nlink={NLink} dev={DevMajor},{DevMinor}";
}

/// <summary>
/// A whole tree as path -> <see cref="FileView"/>: the expected view computed from a layer tar (with the overlayfs
/// whiteout conventions applied), and the actual view read from a mounted directory with lstat/llistxattr.
/// </summary>
public static class TreeModel
{
    /// <summary>The tree a layer tar should mount as. <paramref name="opaqueXattr"/> is what `.wh..wh..opq` becomes.</summary>
    public static Dictionary<string, FileView> FromTar(Stream tar, string opaqueXattr = "trusted.overlay.opaque")
    {
        var views = new Dictionary<string, FileView>(StringComparer.Ordinal);
        var links = new List<(string Path, string Target)>();
        var opaque = new List<string>();
        var whiteouts = new List<(string Dir, string Name, FileView View)>();
        using var reader = new TarReader(tar);
        while (true)
        {
            TarEntry? e;
            // Some writers end the archive without the two zero blocks; what was read is compared in full anyway.
            try { e = reader.GetNextEntry(copyData: true); }
            catch (EndOfStreamException) { break; }
            if (e == null) break;
            var path = Clean(e.Name);
            if (path.Length == 0) continue;
            var name = path[(path.LastIndexOf('/') + 1)..];
            var dir = path.Contains('/') ? path[..path.LastIndexOf('/')] : "";
            var xattrs = "";
            if (e is PaxTarEntry pax)
            {
                var xs = new List<string>();
                foreach (var (k, v) in pax.ExtendedAttributes)
                    if (k.StartsWith("SCHILY.xattr.", StringComparison.Ordinal))
                        xs.Add(k["SCHILY.xattr.".Length..] + "=" + Convert.ToBase64String(Encoding.Latin1.GetBytes(v)));
                xs.Sort(StringComparer.Ordinal);
                xattrs = string.Join(",", xs);
            }
            var perm = (uint)e.Mode & 0xFFF;
            var mtime = e.ModificationTime.ToUnixTimeSeconds();
            if (name == ".wh..wh..opq") { opaque.Add(dir); continue; }
            if (name.StartsWith(".wh.", StringComparison.Ordinal))
            {
                whiteouts.Add((dir, name[4..], new FileView('c', 0, (uint)e.Uid, (uint)e.Gid, mtime, 0, null, null, "", 1, 0, 0)));
                continue;
            }
            switch (e.EntryType)
            {
                case TarEntryType.Directory:
                    views[path] = new FileView('d', perm, (uint)e.Uid, (uint)e.Gid, mtime, 0, null, null, xattrs, 2, 0, 0);
                    break;
                case TarEntryType.RegularFile or TarEntryType.V7RegularFile or TarEntryType.ContiguousFile:
                    string sha;
                    long size;
                    using (var data = e.DataStream ?? Stream.Null)
                    {
                        using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
                        var buf = new byte[1 << 16];
                        size = 0;
                        int n;
                        while ((n = data.Read(buf)) > 0) { h.AppendData(buf, 0, n); size += n; }
                        sha = Convert.ToHexStringLower(h.GetHashAndReset());
                    }
                    views[path] = new FileView('f', perm, (uint)e.Uid, (uint)e.Gid, mtime, size, sha, null, xattrs, 1, 0, 0);
                    break;
                case TarEntryType.SymbolicLink:
                    views[path] = new FileView('l', 0, (uint)e.Uid, (uint)e.Gid, mtime, Encoding.UTF8.GetByteCount(e.LinkName), null, e.LinkName, xattrs, 1, 0, 0);
                    break;
                case TarEntryType.HardLink:
                    links.Add((path, Clean(e.LinkName)));
                    break;
                case TarEntryType.CharacterDevice or TarEntryType.BlockDevice:
                    var pe = (PosixTarEntry)e;
                    views[path] = new FileView(e.EntryType == TarEntryType.CharacterDevice ? 'c' : 'b', perm, (uint)e.Uid, (uint)e.Gid, mtime, 0,
                        null, null, xattrs, 1, (uint)pe.DeviceMajor, (uint)pe.DeviceMinor);
                    break;
                case TarEntryType.Fifo:
                    views[path] = new FileView('p', perm, (uint)e.Uid, (uint)e.Gid, mtime, 0, null, null, xattrs, 1, 0, 0);
                    break;
            }
        }
        foreach (var (path, target) in links)
        {
            var t = views[target];
            views[target] = t with { NLink = t.NLink + 1 };
        }
        foreach (var (path, target) in links) views[path] = views[target];
        foreach (var (dir, name, view) in whiteouts)
        {
            var p = dir.Length == 0 ? name : dir + "/" + name;
            if (!views.ContainsKey(p)) views[p] = view;
        }
        foreach (var d in opaque)
        {
            if (!views.TryGetValue(d, out var v)) continue;
            var xs = new List<string>(v.Xattrs.Split(',', StringSplitOptions.RemoveEmptyEntries)) { opaqueXattr + "=" + Convert.ToBase64String("y"u8) };
            xs.Sort(StringComparer.Ordinal);
            views[d] = v with { Xattrs = string.Join(",", xs) };
        }
        // Parents the tar never names (a whiteout-only layer names just the whiteout): root-owned 0755 dirs, mtime 0.
        foreach (var p in views.Keys.ToList())
        {
            var d = p;
            while (d.Contains('/'))
            {
                d = d[..d.LastIndexOf('/')];
                if (!views.ContainsKey(d)) views[d] = new FileView('d', 0x1ED, 0, 0, 0, 0, null, null, "", 2, 0, 0);
            }
        }
        // Directory link counts: 2 + subdirectories.
        var subdirs = new Dictionary<string, uint>(StringComparer.Ordinal);
        foreach (var (p, v) in views)
            if (v.Type == 'd' && p.Contains('/')) subdirs[p[..p.LastIndexOf('/')]] = subdirs.GetValueOrDefault(p[..p.LastIndexOf('/')]) + 1;
        foreach (var p in views.Keys.ToList())
            if (views[p].Type == 'd') views[p] = views[p] with { NLink = 2 + subdirs.GetValueOrDefault(p) };
        return views;
    }

    private static string Clean(string name) => string.Join('/', name.Split('/', StringSplitOptions.RemoveEmptyEntries).Where(p => p != "."));

    /// <summary>The tree under <paramref name="root"/> as lstat and llistxattr see it (the root itself excluded).</summary>
    public static Dictionary<string, FileView> FromDirectory(string root)
    {
        var views = new Dictionary<string, FileView>(StringComparer.Ordinal);
        Walk(root, "", views);
        return views;
    }

    private static void Walk(string root, string rel, Dictionary<string, FileView> views)
    {
        var dir = rel.Length == 0 ? root : Path.Combine(root, rel);
        foreach (var full in Directory.EnumerateFileSystemEntries(dir))
        {
            var name = Path.GetFileName(full);
            var path = rel.Length == 0 ? name : rel + "/" + name;
            var st = Lstat(full);
            var fmt = st.Mode & 0xF000;
            var type = fmt switch { 0x4000 => 'd', 0x8000 => 'f', 0xA000 => 'l', 0x2000 => 'c', 0x6000 => 'b', 0x1000 => 'p', _ => '?' };
            string? sha = null;
            string? link = null;
            if (type == 'f')
            {
                using var fs = File.OpenRead(full);
                sha = Convert.ToHexStringLower(SHA256.HashData(fs));
            }
            if (type == 'l') link = new FileInfo(full).LinkTarget;
            var major = (uint)(((st.Rdev >> 32) & 0xfffff000) | ((st.Rdev >> 8) & 0xfff));
            var minor = (uint)(((st.Rdev >> 12) & 0xffffff00) | (st.Rdev & 0xff));
            views[path] = new FileView(type, type == 'l' ? 0 : st.Mode & 0xFFF, st.Uid, st.Gid, st.MTimeSec, type is 'd' or 'c' or 'b' or 'p' ? 0 : st.Size,
                sha, link, ReadXattrs(full), (uint)st.NLink, major, minor);
            if (type == 'd') Walk(root, path, views);
        }
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct StatBuf
    {
        public ulong Dev, Ino, NLink;
        public uint Mode, Uid, Gid, Pad0;
        public ulong Rdev;
        public long Size, BlkSize, Blocks;
        public long ATimeSec, ATimeNsec, MTimeSec, MTimeNsec, CTimeSec, CTimeNsec;
        public long R0, R1, R2;
    }

    [DllImport("libc", SetLastError = true, EntryPoint = "lstat")]
    private static extern int lstat([MarshalAs(UnmanagedType.LPUTF8Str)] string path, out StatBuf buf);

    [DllImport("libc", SetLastError = true)]
    private static extern nint llistxattr([MarshalAs(UnmanagedType.LPUTF8Str)] string path, byte[]? list, nint size);

    [DllImport("libc", SetLastError = true)]
    private static extern nint lgetxattr([MarshalAs(UnmanagedType.LPUTF8Str)] string path, [MarshalAs(UnmanagedType.LPUTF8Str)] string name, byte[]? value, nint size);

    /// <summary>The inode number lstat reports.</summary>
    public static ulong InodeOf(string path) => Lstat(path).Ino;

    private static StatBuf Lstat(string path)
    {
        if (lstat(path, out var st) != 0) throw new IOException($"lstat {path}: errno {Marshal.GetLastPInvokeError()}");
        return st;
    }

    public static string ReadXattrs(string path)
    {
        var len = llistxattr(path, null, 0);
        if (len <= 0) return "";
        var buf = new byte[len];
        len = llistxattr(path, buf, len);
        if (len <= 0) return "";
        var xs = new List<string>();
        foreach (var name in Encoding.UTF8.GetString(buf, 0, (int)len).Split('\0', StringSplitOptions.RemoveEmptyEntries))
        {
            if (name.StartsWith("security.", StringComparison.Ordinal)) continue;
            var vlen = lgetxattr(path, name, null, 0);
            var val = vlen > 0 ? new byte[vlen] : [];
            if (vlen > 0) vlen = lgetxattr(path, name, val, vlen);
            xs.Add(name + "=" + Convert.ToBase64String(val.AsSpan(0, (int)Math.Max(0, vlen))));
        }
        xs.Sort(StringComparer.Ordinal);
        return string.Join(",", xs);
    }

    /// <summary>Every difference, one per line ("" when equal).</summary>
    public static string Diff(Dictionary<string, FileView> expected, Dictionary<string, FileView> actual)
    {
        var sb = new StringBuilder();
        foreach (var (p, v) in expected.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            if (!actual.TryGetValue(p, out var a)) sb.AppendLine($"missing: {p} ({v})");
            else if (a != v) sb.AppendLine($"differs: {p}\n  want {v}\n  got  {a}");
        }
        foreach (var p in actual.Keys.Where(k => !expected.ContainsKey(k)).OrderBy(k => k, StringComparer.Ordinal))
            sb.AppendLine($"unexpected: {p} ({actual[p]})");
        return sb.ToString();
    }
}
