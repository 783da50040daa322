using System.Security.Cryptography;
using System.Text;
using Stargz.Estargz;
using Stargz.Fuse;

namespace Stargz.Layer.Erofs;

/// <summary>
/// Checks a mounted promotion image against the layer's TOC, as the FUSE layer shows it (<see cref="LayerFileSystem"/>):
/// the same names in every directory (whiteouts as char 0/0, opaque dirs by their xattr, landmarks hidden), and for each
/// name the same type and permission bits, owner, mtime (to the nanosecond), link count, device numbers, symlink target
/// and xattrs; the names of one hard-linked file are one inode; and every regular file's bytes hash to the TOC's file
/// digest (all of them, not a sample: the image replaces the verified chunks, so it is trusted only once every byte was
/// checked). A file without a TOC digest (unverified layer) is checked by size only.
/// </summary>
internal static class ErofsImageCheck
{
    /// <summary>What was checked: names, regular files, and bytes hashed.</summary>
    internal readonly record struct Summary(long Names, long Files, long HashedBytes);

    /// <summary>Throws <see cref="InvalidDataException"/> naming the first difference.</summary>
    public static Summary Verify(LayerFileSystem fs, string root, CancellationToken ct)
    {
        var rootInode = fs.Get(1) ?? throw new InvalidDataException("the layer has no root");
        var seenIno = new Dictionary<LayerFileSystem.Inode, ulong>();
        long names = 0, files = 0, hashed = 0;
        var buffer = new byte[1 << 20];
        var stack = new Stack<(LayerFileSystem.Inode Dir, string Path)>();
        CheckOne(rootInode, root, "/", seenIno, ref files, ref hashed, buffer, ct);
        stack.Push((rootInode, root));
        while (stack.Count > 0)
        {
            ct.ThrowIfCancellationRequested();
            var (dir, path) = stack.Pop();
            var onDisk = new HashSet<string>(StringComparer.Ordinal);
            foreach (var e in Directory.EnumerateFileSystemEntries(path)) onDisk.Add(Path.GetFileName(e));
            var want = dir.ByName!;
            if (onDisk.Count != want.Count || !onDisk.SetEquals(want.Keys))
            {
                var extra = onDisk.Except(want.Keys).FirstOrDefault();
                var missing = want.Keys.Except(onDisk).FirstOrDefault();
                throw new InvalidDataException($"{Rel(root, path)}: names differ from the TOC ({(extra != null ? "extra " + extra : "missing " + missing)})");
            }
            foreach (var (name, child) in want)
            {
                var p = Path.Combine(path, name);
                CheckOne(child, p, Rel(root, p), seenIno, ref files, ref hashed, buffer, ct);
                names++;
                if (child.ByName != null) stack.Push((child, p));
            }
        }
        return new Summary(names, files, hashed);
    }

    private static string Rel(string root, string path)
    {
        var rel = Path.GetRelativePath(root, path);
        return rel == "." ? "/" : "/" + rel;
    }

    private static void CheckOne(LayerFileSystem.Inode want, string path, string rel, Dictionary<LayerFileSystem.Inode, ulong> seenIno,
        ref long files, ref long hashed, byte[] buffer, CancellationToken ct)
    {
        var st = ErofsNative.LStat(path);
        var a = want.Attr;
        void Differs(string what, object got, object expected) =>
            throw new InvalidDataException($"{rel}: {what} is {got} in the image, {expected} in the TOC");
        if (st.Mode != (a.Mode & 0xFFFF)) Differs("mode", Convert.ToString(st.Mode, 8), Convert.ToString(a.Mode, 8));
        if (st.Uid != a.Uid || st.Gid != a.Gid) Differs("owner", $"{st.Uid}:{st.Gid}", $"{a.Uid}:{a.Gid}");
        if (st.MTimeSec != (long)a.MTime || st.MTimeNsec != a.MTimeNsec) Differs("mtime", $"{st.MTimeSec}.{st.MTimeNsec:D9}", $"{a.MTime}.{a.MTimeNsec:D9}");
        var isDir = want.ByName != null;
        if (!isDir && st.NLink != a.NLink) Differs("link count", st.NLink, a.NLink);
        var type = a.Mode & UnixMode.S_IFMT;
        if (type is UnixMode.S_IFCHR or UnixMode.S_IFBLK)
        {
            uint major = 0, minor = 0;
            if (!want.IsWhiteout && want.Node != null) (major, minor) = ((uint)want.Node.Entry.DevMajor, (uint)want.Node.Entry.DevMinor);
            if (st.RDevMajor != major || st.RDevMinor != minor) Differs("device", $"{st.RDevMajor}:{st.RDevMinor}", $"{major}:{minor}");
        }
        if (!isDir)
        {
            // Every name of a hard-linked file is one inode in the image as in the TOC.
            if (seenIno.TryGetValue(want, out var ino))
            {
                if (ino != st.Ino) throw new InvalidDataException($"{rel}: a hard link of another name, but a different inode in the image");
                return; // content and xattrs were checked at the first name
            }
            seenIno[want] = st.Ino;
        }
        if (type == UnixMode.S_IFLNK)
        {
            var target = new FileInfo(path).LinkTarget ?? "";
            var expected = Encoding.UTF8.GetString(want.LinkTarget ?? []);
            if (target != expected) Differs("symlink target", target, expected);
        }
        var xattrs = ErofsNative.XattrsOf(path);
        if (xattrs.Count != want.Xattrs.Length) Differs("xattr count", xattrs.Count, want.Xattrs.Length);
        foreach (var (n, v) in want.Xattrs)
        {
            var name = Encoding.UTF8.GetString(n);
            if (!xattrs.TryGetValue(name, out var got)) throw new InvalidDataException($"{rel}: xattr {name} is missing in the image");
            if (!got.AsSpan().SequenceEqual(v)) throw new InvalidDataException($"{rel}: xattr {name} differs in the image");
        }
        if (type != UnixMode.S_IFREG) return;
        files++;
        if (st.Size != (long)a.Size) Differs("size", st.Size, a.Size);
        if (want.Node?.Entry.Digest is not { } digest) return;
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        using (var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 0))
        {
            int n;
            while ((n = f.Read(buffer)) > 0)
            {
                ct.ThrowIfCancellationRequested();
                sha.AppendData(buffer.AsSpan(0, n));
                hashed += n;
            }
        }
        Span<byte> hash = stackalloc byte[32];
        sha.GetHashAndReset(hash);
        if (!Digests.HashMatches(hash, digest))
            throw new InvalidDataException($"{rel}: content hashes to sha256:{Convert.ToHexStringLower(hash)} in the image, the TOC says {digest}");
    }
}
