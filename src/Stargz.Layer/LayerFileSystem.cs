using System.Collections.Concurrent;
using System.Text;
using Microsoft.Win32.SafeHandles;
using Stargz.Estargz;
using Stargz.Fuse;

namespace Stargz.Layer;

/// <summary>
/// The node tree of one layer as fuse/ serves it. Built once from the TOC: inode numbers are assigned in a stable
/// depth-first order (1 = root, children by ordinal name), every name of a hardlinked file shares one inode whose
/// nlink counts the names, and overlayfs conventions are applied — <c>.wh.NAME</c> becomes a char device 0/0 named
/// NAME (unless NAME exists in the same directory), <c>.wh..wh..opq</c> becomes the opaque xattr on its directory,
/// and the <c>.wh.*</c> entries themselves are not listed; the landmark files in "/" are hidden. Metadata calls never block; reads go to the chunk fetcher.
/// </summary>
internal sealed class LayerFileSystem : IFuseFileSystem
{
    internal const string WhiteoutPrefix = ".wh.";
    internal const string OpaqueMarker = ".wh..wh..opq";

    internal sealed class Inode
    {
        public ulong Ino;
        public Inode? Parent;
        public TocNode? Node;
        public FuseAttr Attr;
        public Dictionary<string, Inode>? ByName;
        public Dictionary<string, Inode>.AlternateLookup<ReadOnlySpan<char>> Lookup;
        public byte[][]? ChildNames;
        public Inode[]? Children;
        public byte[]? LinkTarget;
        public LayerChunk[] Chunks = [];
        public (byte[] Name, byte[] Value)[] Xattrs = [];
        public byte[] XattrNames = [];
        public bool Opaque;
        public bool IsWhiteout;
    }

    private readonly Inode[] _inodes;
    private readonly ChunkFetcher _fetcher;
    private readonly ulong _totalBytes;
    // Opens of files that are one verified chunk on disk, by open handle: the chunk file stays open until RELEASE and
    // serves the open's reads (spliced by the bridge, or by the kernel itself with passthrough).
    private readonly ConcurrentDictionary<ulong, (ulong Ino, SafeFileHandle File)> _chunkFiles = new();
    // What each of those opens pins in the disk budget (a chunk or a whole-file copy): not evicted while open.
    private readonly ConcurrentDictionary<ulong, (CacheFileKind Kind, string Key)> _pinned = new();
    // Chunk files of bigger files, by digest: a READ that falls inside one verified chunk on disk is spliced from it.
    private readonly ChunkFileHandles _diskChunks;
    private readonly bool _spliceFromChunkFiles;
    // Whole-file copies of bigger files for passthrough (null: passthrough is off for this layer).
    private readonly AssembledFiles? _assembled;
    // Handles start at a random generation (bits 32-61; 62-63 are the FUSE bridge's): after a restart the kernel still
    // holds the earlier process's handles, and one of them must never name an open of this process.
    private long _lastHandle = (long)Random.Shared.NextInt64(1, 1L << 30) << 32;

    public LayerFileSystem(TocNode root, ChunkFetcher fetcher, bool userXattrOpaque, int maxCacheFds = LayerOptions.DefaultMaxCacheFds,
        bool spliceFromChunkFiles = true, AssembledFiles? assembled = null)
    {
        _fetcher = fetcher;
        _assembled = assembled;
        _diskChunks = new ChunkFileHandles(maxCacheFds, fetcher.Budget);
        _spliceFromChunkFiles = spliceFromChunkFiles;
        var list = new List<Inode>();
        var byNode = new Dictionary<TocNode, Inode>(ReferenceEqualityComparer.Instance);
        var opaqueName = Encoding.ASCII.GetBytes(userXattrOpaque ? "user.overlay.opaque" : "trusted.overlay.opaque");
        ulong total = 0;
        var rootInode = NewInode(root, null, list, byNode, ref total);
        var stack = new Stack<Inode>();
        stack.Push(rootInode);
        // Depth-first, children sorted: the same TOC always yields the same inode numbers.
        var pending = new List<Inode>();
        while (stack.Count > 0)
        {
            var dir = stack.Pop();
            var children = dir.Node!.Children;
            var names = new List<string>();
            if (children != null) names.AddRange(children.Keys);
            names.Sort(StringComparer.Ordinal);
            var visible = new SortedDictionary<string, Inode>(StringComparer.Ordinal);
            foreach (var name in names)
            {
                var child = children![name];
                // The converter's landmark files (prefetch bookkeeping) are not part of the image: not shown in "/",
                // as the reference does not show them either.
                if (dir == rootInode && (name == LayerLabels.PrefetchLandmark || name == LayerLabels.NoPrefetchLandmark))
                    continue;
                if (name == OpaqueMarker)
                {
                    dir.Opaque = true;
                    continue;
                }
                if (name.StartsWith(WhiteoutPrefix, StringComparison.Ordinal))
                {
                    var target = name[WhiteoutPrefix.Length..];
                    if (target.Length == 0 || children.ContainsKey(target)) continue;
                    var wh = new Inode { Ino = (ulong)list.Count + 1, Parent = dir, IsWhiteout = true };
                    wh.Attr = AttrOf(child.Entry, wh.Ino, UnixMode.S_IFCHR, 0, 1);
                    wh.Attr.RDev = 0;
                    wh.Attr.Mode = UnixMode.S_IFCHR; // 0/0 char device, no permission bits, as overlayfs makes them
                    list.Add(wh);
                    visible[target] = wh;
                    continue;
                }
                if (!byNode.TryGetValue(child, out var inode))
                {
                    inode = NewInode(child, dir, list, byNode, ref total);
                    if (child.IsDirectory) pending.Add(inode);
                }
                visible[name] = inode;
            }
            dir.ByName = new Dictionary<string, Inode>(visible, StringComparer.Ordinal);
            dir.Lookup = dir.ByName.GetAlternateLookup<ReadOnlySpan<char>>();
            dir.ChildNames = new byte[visible.Count][];
            dir.Children = new Inode[visible.Count];
            var k = 0;
            uint subdirs = 0;
            foreach (var (name, inode) in visible)
            {
                dir.ChildNames[k] = Encoding.UTF8.GetBytes(name);
                dir.Children[k++] = inode;
                if (inode.Node is { IsDirectory: true }) subdirs++;
            }
            dir.Attr.NLink = 2 + subdirs;
            if (dir.Opaque)
            {
                var xs = new List<(byte[], byte[])>(dir.Xattrs) { (opaqueName, "y"u8.ToArray()) };
                SetXattrs(dir, xs);
            }
            // Push in reverse so the first child directory is numbered next.
            for (var i = pending.Count - 1; i >= 0; i--) stack.Push(pending[i]);
            pending.Clear();
        }
        _inodes = list.ToArray();
        _totalBytes = total;
    }

    public int InodeCount => _inodes.Length;

    /// <summary>Bytes of the layer's regular files (hard links counted once).</summary>
    internal long TotalBytes => (long)_totalBytes;

    /// <summary>
    /// Set once the layer is promoted to EROFS (the image's mount dir): its chunks are dropped then, so the opens and
    /// reads that still come through this FUSE mount (containers started before the promotion) are served from the
    /// image, which was checked against the TOC.
    /// </summary>
    internal string? PromotedRoot
    {
        get => Volatile.Read(ref _promotedRoot);
        set => Volatile.Write(ref _promotedRoot, value);
    }
    private string? _promotedRoot;

    /// <summary>
    /// Whether the mount can still answer opens with a backing file (set once mounted): whole-file copies are only
    /// worth building while it can.
    /// </summary>
    internal Func<bool>? PassthroughUsable { get; set; }

    /// <summary>The whole-file build the last open of a bigger file started (tests wait for it).</summary>
    internal Task LastAssembly { get; private set; } = Task.CompletedTask;

    private static Inode NewInode(TocNode node, Inode? parent, List<Inode> list, Dictionary<TocNode, Inode> byNode, ref ulong total)
    {
        var e = node.Entry;
        var inode = new Inode { Ino = (ulong)list.Count + 1, Parent = parent, Node = node };
        list.Add(inode);
        byNode[node] = inode;
        uint type;
        ulong size = 0;
        switch (node.Type)
        {
            case TocEntryType.Dir: type = UnixMode.S_IFDIR; size = 4096; break;
            case TocEntryType.Reg:
                type = UnixMode.S_IFREG;
                size = (ulong)node.Size;
                inode.Chunks = node.Chunks as LayerChunk[] ?? [.. node.Chunks];
                total += size;
                break;
            case TocEntryType.Symlink:
                type = UnixMode.S_IFLNK;
                inode.LinkTarget = Encoding.UTF8.GetBytes(e.LinkName ?? "");
                size = (ulong)inode.LinkTarget.Length;
                break;
            case TocEntryType.Char: type = UnixMode.S_IFCHR; break;
            case TocEntryType.Block: type = UnixMode.S_IFBLK; break;
            case TocEntryType.Fifo: type = UnixMode.S_IFIFO; break;
            default: type = UnixMode.S_IFREG; break;
        }
        inode.Attr = AttrOf(e, inode.Ino, type, size, (uint)Math.Max(1, node.NumLink));
        if (node.Type is TocEntryType.Char or TocEntryType.Block)
            inode.Attr.RDev = FuseAttr.MakeDev((uint)e.DevMajor, (uint)e.DevMinor);
        if (e.Xattrs is { Count: > 0 } xattrs)
        {
            var xs = new List<(byte[], byte[])>(xattrs.Count);
            foreach (var (name, value) in xattrs) xs.Add((Encoding.UTF8.GetBytes(name), value));
            SetXattrs(inode, xs);
        }
        return inode;
    }

    private static void SetXattrs(Inode inode, List<(byte[] Name, byte[] Value)> xs)
    {
        inode.Xattrs = xs.ToArray();
        var names = new List<byte>();
        foreach (var (n, _) in xs)
        {
            names.AddRange(n);
            names.Add(0);
        }
        inode.XattrNames = names.ToArray();
    }

    private static FuseAttr AttrOf(TocEntry e, ulong ino, uint type, ulong size, uint nlink)
    {
        long sec = 0;
        uint nsec = 0;
        if (e.ModTime is { } t)
        {
            sec = t.ToUnixTimeSeconds();
            nsec = (uint)((t.UtcTicks - DateTimeOffset.UnixEpoch.UtcTicks - sec * TimeSpan.TicksPerSecond) * 100);
        }
        return new FuseAttr
        {
            Ino = ino,
            Size = size,
            Blocks = (size + 511) / 512,
            ATime = (ulong)sec, MTime = (ulong)sec, CTime = (ulong)sec,
            ATimeNsec = nsec, MTimeNsec = nsec, CTimeNsec = nsec,
            Mode = type | (uint)(e.Mode & 0xFFF),
            NLink = nlink,
            Uid = (uint)e.Uid,
            Gid = (uint)e.Gid,
            BlkSize = 4096,
        };
    }

    internal Inode? Get(ulong ino) => ino - 1 < (ulong)_inodes.Length ? _inodes[ino - 1] : null;

    /// <summary>Path lookup for tests and the daemon ("a/b"); follows no symlinks.</summary>
    internal Inode? Resolve(string path)
    {
        var cur = _inodes[0];
        foreach (var part in path.Split('/', StringSplitOptions.RemoveEmptyEntries))
        {
            if (cur.ByName == null || !cur.ByName.TryGetValue(part, out var next)) return null;
            cur = next;
        }
        return cur;
    }

    public int Lookup(ulong parent, ReadOnlySpan<byte> name, out FuseEntry entry)
    {
        entry = default;
        var dir = Get(parent);
        if (dir == null) return Errno.ENOENT;
        if (dir.ByName == null) return Errno.ENOTDIR;
        if (name.Length > 255) return Errno.ENAMETOOLONG;
        Span<char> chars = stackalloc char[256];
        int n;
        try { n = Encoding.UTF8.GetChars(name, chars); }
        catch (ArgumentException) { return Errno.ENOENT; }
        if (!dir.Lookup.TryGetValue(chars[..n], out var child)) return Errno.ENOENT;
        entry = new FuseEntry { Ino = child.Ino, Attr = child.Attr };
        return 0;
    }

    public int GetAttr(ulong ino, out FuseAttr attr)
    {
        var i = Get(ino);
        if (i == null)
        {
            attr = default;
            return Errno.ENOENT;
        }
        attr = i.Attr;
        return 0;
    }

    public int ReadLink(ulong ino, out ReadOnlyMemory<byte> target)
    {
        var i = Get(ino);
        target = i?.LinkTarget;
        return i?.LinkTarget == null ? Errno.EINVAL : 0;
    }

    public int Open(ulong ino, int flags, out FuseOpenResult result)
    {
        result = new FuseOpenResult { KeepCache = true };
        var i = Get(ino);
        if (i == null) return Errno.ENOENT;
        if (i.ByName != null) return Errno.EISDIR;
        // A file that is one chunk, already verified on disk: this open keeps the chunk file open. With passthrough
        // (when the mount negotiated it) the kernel reads it and reads never reach us; otherwise they are spliced
        // from it (TryReadFromFile) instead of going through the memory cache.
        string? path = null;
        (CacheFileKind Kind, string Key) pin = (CacheFileKind.Chunk, "");
        if (PromotedRoot is { } promoted)
        {
            // The image's file serves this open (spliced by the bridge, or by the kernel with passthrough); nothing to pin.
            if (i.Node is { IsRegular: true } node) path = Path.Combine(promoted, node.Path);
        }
        else if (i.Chunks.Length == 1 && i.Chunks[0].FileOffset == 0 && (ulong)i.Chunks[0].Size == i.Attr.Size)
        {
            path = _fetcher.TrustedDiskPath(i.Chunks[0]);
            if (path != null) pin = (CacheFileKind.Chunk, i.Chunks[0].Digest!);
        }
        else if (i.Chunks.Length > 1)
        {
            path = AssembledCopy(i);
            if (path != null) pin = (CacheFileKind.Copy, i.Node!.Entry.Digest!);
        }
        if (path == null) return 0;
        SafeFileHandle h;
        try { h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return 0; // removed or unreadable since it was checked: this open reads through the chunk cache
        }
        var handle = (ulong)Interlocked.Increment(ref _lastHandle);
        if (pin.Key.Length > 0)
        {
            _fetcher.Budget.Pin(pin.Kind, pin.Key);
            _pinned[handle] = pin;
            if (pin.Kind == CacheFileKind.Copy) _fetcher.Budget.TouchCopy(pin.Key);
            else _fetcher.Budget.TouchChunk(pin.Key);
        }
        _chunkFiles[handle] = (ino, h);
        result.Handle = handle;
        result.BackingFile = h;
        return 0;
    }

    /// <summary>
    /// A bigger file, with passthrough usable: its verified whole-file copy when there is one. Otherwise, when every
    /// chunk is verified on disk (or an earlier process left a copy), the copy is built (or hashed) in the background
    /// for later opens, and this one is served as usual. Only lookups here: an OPEN never waits for disk work.
    /// </summary>
    private string? AssembledCopy(Inode i)
    {
        if (_assembled == null || !_fetcher.Verifies || i.Node?.Entry.Digest is not { } digest || PassthroughUsable?.Invoke() != true)
            return null;
        if (_assembled.TrustedPath(digest) is { } path) return path;
        if (_assembled.HasUncheckedCopy(digest) || _fetcher.AllTrustedOnDisk(i.Chunks))
            LastAssembly = _assembled.Schedule(digest, (long)i.Attr.Size, i.Chunks, _fetcher.DiskPathOf);
        return null;
    }

    /// <summary>
    /// A READ that lies inside one chunk verified on disk is spliced from the chunk file (no memory-cache load, no copy
    /// in this process): the open's own chunk file for a one-chunk file, else a descriptor from
    /// <see cref="ChunkFileHandles"/>. Anything else (a chunk not fetched yet, a READ across two chunks, end of file)
    /// goes through <see cref="ReadAsync"/>.
    /// </summary>
    public bool TryReadFromFile(ulong ino, ulong handle, long offset, int size, out FuseFileRange range)
    {
        range = default;
        var i = Get(ino);
        if (i == null || offset < 0) return false;
        long fileSize = (long)i.Attr.Size;
        int len = offset >= fileSize ? 0 : (int)Math.Min(size, fileSize - offset);
        SafeFileHandle? file;
        long fileOffset = offset;
        string? touched = null;
        if (handle == 0 || !_chunkFiles.TryGetValue(handle, out var open) || open.Ino != ino) file = null;
        else file = open.File;
        if (file == null)
        {
            var chunks = i.Chunks;
            if (!_spliceFromChunkFiles || len == 0 || chunks.Length == 0) return false;
            int at = ChunkFetcher.FindChunk(chunks, offset);
            if (at < 0) return false;
            ref readonly var c = ref chunks[at];
            if (c.Digest == null || offset + len > c.FileOffset + c.Size) return false;
            file = _diskChunks.TryGet(c.Digest);
            if (file == null)
            {
                if (_fetcher.TrustedDiskPath(c) is not { } path) return false;
                try { file = _diskChunks.Add(c.Digest, File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete)); }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return false; }
            }
            fileOffset = offset - c.FileOffset;
            touched = c.Digest;
        }
        if (!FuseFileRange.TryLend(file, fileOffset, len, out range)) return false;
        _fetcher.CountDiskFileRead(touched);
        return true;
    }

    /// <summary>
    /// The bridge could not read the file <see cref="TryReadFromFile"/> named (EIO on the cache disk, a file that went):
    /// the error is counted and logged (<see cref="CacheDiskHealth"/>), the file is dropped so no later READ tries it,
    /// and the bridge then serves this READ through <see cref="ReadAsync"/> (memory, or the registry again).
    /// </summary>
    public void FileReadFailed(ulong ino, ulong handle, long offset, int size, int errno)
    {
        var i = Get(ino);
        if (i == null) return;
        var error = new IOException($"read of {size} bytes at {offset}: errno {errno}", errno);
        if (handle != 0 && _chunkFiles.TryGetValue(handle, out var open) && open.Ino == ino)
        {
            // The open's own file: later READs of this open take the chunk cache. Release then finds nothing to close.
            if (_chunkFiles.TryRemove(handle, out open)) open.File.Dispose();
            if (_pinned.TryRemove(handle, out var pin))
            {
                _fetcher.Budget.Unpin(pin.Kind, pin.Key);
                if (pin.Kind == CacheFileKind.Copy) _assembled?.Unreadable(pin.Key, error);
                else _fetcher.Cache.DiskFileUnreadable(pin.Key, error);
            }
            else _fetcher.Cache.Disk.ReadFailed($"file {i.Node?.Path} of the layer's image", error); // promoted
            return;
        }
        var chunks = i.Chunks;
        int at = chunks.Length == 0 ? -1 : ChunkFetcher.FindChunk(chunks, offset);
        if (at < 0 || chunks[at].Digest is not { } digest) return;
        _diskChunks.Remove(digest);
        _fetcher.Cache.DiskFileUnreadable(digest, error);
    }

    public void Release(ulong ino, ulong handle)
    {
        // A handle of an earlier process (opened before a restart) is not ours: nothing to close.
        if (handle == 0 || !_chunkFiles.TryGetValue(handle, out var open) || open.Ino != ino) return;
        if (_chunkFiles.TryRemove(handle, out open)) open.File.Dispose();
        if (_pinned.TryRemove(handle, out var pin)) _fetcher.Budget.Unpin(pin.Kind, pin.Key);
    }

    /// <summary>Closes chunk files of opens the kernel never released (a connection that was aborted).</summary>
    internal void CloseChunkFiles()
    {
        foreach (var k in _chunkFiles.Keys)
            if (_chunkFiles.TryRemove(k, out var h)) h.File.Dispose();
        foreach (var k in _pinned.Keys)
            if (_pinned.TryRemove(k, out var pin)) _fetcher.Budget.Unpin(pin.Kind, pin.Key);
        _diskChunks.Dispose();
    }

    public ValueTask<int> ReadAsync(ulong ino, ulong handle, long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var i = Get(ino);
        if (i == null) return new ValueTask<int>(-Errno.EBADF);
        if (i.Node is not { IsRegular: true }) return new ValueTask<int>(-Errno.EINVAL);
        if (PromotedRoot is { } promoted) return new ValueTask<int>(ReadFromImage(promoted, i.Node, offset, destination.Span));
        var t = _fetcher.ReadAsync(i.Chunks, (long)i.Attr.Size, offset, destination, cancellationToken);
        return t.IsCompletedSuccessfully ? t : AwaitRead(t);
    }

    /// <summary>A read of an open made before the promotion: from the image (rare, so opened per read).</summary>
    private static int ReadFromImage(string root, TocNode node, long offset, Span<byte> destination)
    {
        try
        {
            using var h = File.OpenHandle(Path.Combine(root, node.Path), FileMode.Open, FileAccess.Read, FileShare.Read);
            var total = 0;
            while (total < destination.Length)
            {
                var n = RandomAccess.Read(h, destination[total..], offset + total);
                if (n == 0) break;
                total += n;
            }
            return total;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return -Errno.EIO; }
    }

    private static async ValueTask<int> AwaitRead(ValueTask<int> t)
    {
        try { return await t.ConfigureAwait(false); }
        catch (LayerIOException) { return -Errno.EIO; }
        catch (OperationCanceledException) { return -Errno.EINTR; }
    }

    public int OpenDir(ulong ino, out ulong handle)
    {
        handle = 0;
        var i = Get(ino);
        if (i == null) return Errno.ENOENT;
        return i.ByName == null ? Errno.ENOTDIR : 0;
    }

    public int ReadDir(ulong ino, ulong handle, long offset, FuseDirWriter writer)
    {
        var dir = Get(ino);
        if (dir == null) return Errno.ENOENT;
        if (dir.Children == null) return Errno.ENOTDIR;
        for (var k = offset; k < dir.Children.Length + 2; k++)
        {
            bool ok;
            if (k == 0) ok = writer.Add("."u8, new FuseEntry { Ino = dir.Ino, Attr = dir.Attr }, 1);
            else if (k == 1)
            {
                var p = dir.Parent ?? dir;
                ok = writer.Add(".."u8, new FuseEntry { Ino = p.Ino, Attr = p.Attr }, 2);
            }
            else
            {
                var c = dir.Children[k - 2];
                ok = writer.Add(dir.ChildNames![k - 2], new FuseEntry { Ino = c.Ino, Attr = c.Attr }, k + 1);
            }
            if (!ok) break;
        }
        return 0;
    }

    public int GetXattr(ulong ino, ReadOnlySpan<byte> name, out ReadOnlyMemory<byte> value)
    {
        value = default;
        var i = Get(ino);
        if (i == null) return Errno.ENOENT;
        foreach (var (n, v) in i.Xattrs)
        {
            if (name.SequenceEqual(n))
            {
                value = v;
                return 0;
            }
        }
        return Errno.ENODATA;
    }

    public int ListXattr(ulong ino, out ReadOnlyMemory<byte> names)
    {
        var i = Get(ino);
        names = i?.XattrNames ?? default;
        return i == null ? Errno.ENOENT : 0;
    }

    public int StatFs(ulong ino, out FuseStatFs stat)
    {
        stat = new FuseStatFs
        {
            BlockSize = 4096,
            FragmentSize = 4096,
            NameLen = 255,
            Blocks = (_totalBytes + 4095) / 4096,
            Files = (ulong)_inodes.Length,
        };
        return 0;
    }
}
