using System.Buffers;
using System.Runtime.InteropServices;

namespace Stargz.Estargz;

public sealed record ExtractOptions
{
    /// <summary>Set owners (lchown); default: when running as root.</summary>
    public bool? SetOwners { get; init; }
    /// <summary>Set extended attributes (default on; failures are errors).</summary>
    public bool SetXattrs { get; init; } = true;
}

/// <summary>Writes the tree of a blob to a directory: contents (verified), modes, owners, times, links, devices, xattrs.
/// Every path stays inside the target: names are cleaned by the tree, parents must be real directories we made.</summary>
public static partial class EstargzExtractor
{
    public static async Task ExtractAsync(EstargzReader reader, string targetDir, ExtractOptions? options = null, CancellationToken ct = default)
    {
        options ??= new ExtractOptions();
        bool owners = options.SetOwners ?? geteuid() == 0;
        var root = Path.GetFullPath(targetDir);
        Directory.CreateDirectory(root);
        var dirs = new List<TocNode>();
        long maxChunk = 1;
        foreach (var n in reader.Tree.Nodes) foreach (var c in n.ChunkArray) maxChunk = Math.Max(maxChunk, c.Size);
        var buf = ArrayPool<byte>.Shared.Rent((int)maxChunk);
        try
        {
            foreach (var node in reader.Tree.Nodes)
            {
                ct.ThrowIfCancellationRequested();
                var path = Target(root, node.Path);
                EnsureParent(root, path);
                var e = node.Entry;
                switch (e.Type)
                {
                    case TocEntryType.Dir:
                        if (new FileInfo(path) is var fi && (fi.Exists || fi.LinkTarget is not null)) fi.Delete();
                        Directory.CreateDirectory(path);
                        dirs.Add(node);
                        continue;
                    case TocEntryType.Reg:
                        Remove(path);
                        await using (var fs = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.None))
                        {
                            foreach (var c in node.ChunkArray)
                            {
                                await reader.ReadChunkAsync(node, c, buf.AsMemory(0, (int)c.Size), ct).ConfigureAwait(false);
                                await fs.WriteAsync(buf.AsMemory(0, (int)c.Size), ct).ConfigureAwait(false);
                            }
                        }
                        break;
                    case TocEntryType.Symlink:
                        Remove(path);
                        File.CreateSymbolicLink(path, e.LinkName ?? "");
                        break;
                    case TocEntryType.Char:
                    case TocEntryType.Block:
                    case TocEntryType.Fifo:
                        Remove(path);
                        uint kind = e.Type == TocEntryType.Char ? 0x2000u : e.Type == TocEntryType.Block ? 0x6000u : 0x1000u;
                        if (mknod(path, kind | (uint)(e.Mode & 0xFFF), MakeDev(e.DevMajor, e.DevMinor)) != 0)
                            throw new IOException($"mknod {path}: errno {Marshal.GetLastPInvokeError()}");
                        break;
                    default:
                        continue;
                }
                ApplyMeta(path, e, owners, options.SetXattrs, isSymlink: e.Type == TocEntryType.Symlink);
            }
            foreach (var (linkPath, targetPath) in reader.Tree.Hardlinks)
            {
                var lp = Target(root, linkPath);
                EnsureParent(root, lp);
                Remove(lp);
                if (link(Target(root, targetPath), lp) != 0)
                    throw new IOException($"link {linkPath} -> {targetPath}: errno {Marshal.GetLastPInvokeError()}");
            }
            // Directories last, deepest first, so their times stick.
            dirs.Sort((a, b) => b.Path.Length.CompareTo(a.Path.Length));
            foreach (var d in dirs) ApplyMeta(Target(root, d.Path), d.Entry, owners, options.SetXattrs, false);
            if (reader.Root.Entry.Name.Length > 0 || reader.Root.Entry.Mode != 0x1ed)
                ApplyMeta(root, reader.Root.Entry, owners, options.SetXattrs, false);
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
    }

    private static string Target(string root, string cleanPath)
    {
        // The tree already rejected absolute names and "..": double-check the joined path stays inside.
        var p = Path.GetFullPath(Path.Combine(root, cleanPath));
        if (p != root && !p.StartsWith(root + "/", StringComparison.Ordinal))
            throw new TocValidationException("path escapes the extraction directory", cleanPath);
        return p;
    }

    private static void EnsureParent(string root, string path)
    {
        var parent = Path.GetDirectoryName(path)!;
        if (parent.Length < root.Length) return;
        if (Directory.Exists(parent))
        {
            if (new DirectoryInfo(parent).LinkTarget is not null)
                throw new TocValidationException("parent directory is a symlink", path[root.Length..]);
            return;
        }
        Directory.CreateDirectory(parent);
    }

    private static void Remove(string path)
    {
        var fi = new FileInfo(path);
        if (fi.Exists || fi.LinkTarget is not null) fi.Delete();
        else if (Directory.Exists(path) && new DirectoryInfo(path).LinkTarget is null) Directory.Delete(path, recursive: true);
    }

    private static void ApplyMeta(string path, TocEntry e, bool owners, bool xattrs, bool isSymlink)
    {
        if (owners && lchown(path, e.Uid, e.Gid) != 0)
            throw new IOException($"lchown {path}: errno {Marshal.GetLastPInvokeError()}");
        if (!isSymlink && chmod(path, (uint)(e.Mode & 0xFFF)) != 0)
            throw new IOException($"chmod {path}: errno {Marshal.GetLastPInvokeError()}");
        if (xattrs && e.Xattrs is not null)
        {
            foreach (var (k, v) in e.Xattrs)
                if (lsetxattr(path, k, v, (nuint)v.Length, 0) != 0)
                    throw new IOException($"lsetxattr {path} {k}: errno {Marshal.GetLastPInvokeError()}");
        }
        long secs = e.ModTime?.ToUnixTimeSeconds() ?? 0;
        Span<long> ts = [secs, 0, secs, 0];
        if (utimensat(-100 /*AT_FDCWD*/, path, ref MemoryMarshal.GetReference(ts), 0x100 /*AT_SYMLINK_NOFOLLOW*/) != 0)
            throw new IOException($"utimensat {path}: errno {Marshal.GetLastPInvokeError()}");
    }

    private static ulong MakeDev(int major, int minor)
    {
        ulong ma = (uint)major, mi = (uint)minor;
        return ((ma & 0xfffff000UL) << 32) | ((ma & 0xfffUL) << 8) | ((mi & 0xffffff00UL) << 12) | (mi & 0xffUL);
    }

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int mknod(string path, uint mode, ulong dev);
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int link(string oldpath, string newpath);
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int lchown(string path, int uid, int gid);
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int chmod(string path, uint mode);
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int lsetxattr(string path, string name, byte[] value, nuint size, int flags);
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int utimensat(int dirfd, string path, ref long times, int flags);
    [LibraryImport("libc")]
    private static partial uint geteuid();
}
