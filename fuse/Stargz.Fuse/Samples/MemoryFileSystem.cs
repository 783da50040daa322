using System.Text;
using Microsoft.Win32.SafeHandles;

namespace Stargz.Fuse.Samples;

/// <summary>Fills <paramref name="destination"/> with a file's bytes starting at <paramref name="offset"/>.</summary>
public delegate void ContentGenerator(long offset, Span<byte> destination);

/// <summary>
/// A small read-only in-memory tree used by tests and the benchmark: build it with the Add* methods, then mount it.
/// Not thread-safe while building; read-only (and thread-safe) once mounted. Dispose closes the backing files it
/// opened (after unmounting).
/// </summary>
public sealed class MemoryFileSystem : IFuseFileSystem, IDisposable
{
    public sealed class Node
    {
        internal Node(ulong ino, uint mode) { Attr.Ino = ino; Attr.Mode = mode; Attr.NLink = 1; }
        public FuseAttr Attr;
        public ulong Ino => Attr.Ino;
        internal Dictionary<string, Node>? Children;
        internal List<(string Name, Node Node)>? Order;
        internal Node? Parent;
        internal byte[]? Data;
        internal ContentGenerator? Generator;
        internal byte[]? LinkTarget;
        internal Dictionary<string, byte[]>? Xattrs;
        /// <summary>A local file with this file's complete bytes: offered to the kernel for passthrough.</summary>
        public string? BackingPath { get; set; }
        /// <summary>Offer <see cref="BackingPath"/> for passthrough on open (false: serve it through user space only).</summary>
        public bool OfferPassthrough { get; set; } = true;
        /// <summary>
        /// Open with direct I/O (<see cref="FuseOpenResult.DirectIo"/>): reads bypass the kernel page cache, so
        /// every read reaches <see cref="ReadAsync"/>/<see cref="TryReadDirect"/>. Off by default.
        /// </summary>
        public bool DirectIo { get; set; }
        /// <summary>
        /// Serve reads of <see cref="BackingPath"/> that passthrough did not take through
        /// <see cref="TryReadFromFile"/> (the bridge splices them); false copies them through <see cref="ReadAsync"/>.
        /// </summary>
        public bool SpliceFromBacking { get; set; } = true;
        internal SafeFileHandle? BackingHandle;
        /// <summary>
        /// A local file <see cref="TryReadFromFile"/> names for this file's bytes instead of <see cref="BackingPath"/>
        /// (its reads may fail: the bridge then calls <see cref="FileReadFailed"/> and reads through
        /// <see cref="ReadAsync"/>, which serves the node's own content).
        /// </summary>
        public string? SplicePath { get; set; }
        internal SafeFileHandle? SpliceHandle;
        /// <summary>Reads fail with this errno (0 = serve normally).</summary>
        public int FailReads { get; set; }
        /// <summary>Reads never finish on their own (until interrupted): to test hung readers and INTERRUPT.</summary>
        public bool BlockReads { get; set; }
    }

    private readonly List<Node> _inodes = [];
    private static readonly DateTimeOffset Epoch = new(2024, 1, 1, 0, 0, 0, TimeSpan.Zero);

    public MemoryFileSystem()
    {
        var root = NewNode(UnixMode.S_IFDIR | 0x1ED /*0755*/);
        root.Children = new(StringComparer.Ordinal);
        root.Order = [];
        root.Attr.NLink = 2;
        root.Parent = root;
    }

    public Node Root => _inodes[0];

    public void Dispose()
    {
        foreach (var n in _inodes)
        {
            Interlocked.Exchange(ref n.BackingHandle, null)?.Dispose();
            Interlocked.Exchange(ref n.SpliceHandle, null)?.Dispose();
        }
    }
    /// <summary>Bumped each time a read reaches this filesystem (any of the three read paths).</summary>
    public long ReadCalls => Interlocked.Read(ref _readCalls);
    private long _readCalls;
    /// <summary>Reads cancelled through INTERRUPT.</summary>
    public long CancelledReads => Interlocked.Read(ref _cancelledReads);
    private long _cancelledReads;

    private Node NewNode(uint mode)
    {
        var n = new Node((ulong)_inodes.Count + 1, mode);
        long t = Epoch.ToUnixTimeSeconds();
        n.Attr.ATime = n.Attr.MTime = n.Attr.CTime = (ulong)t;
        n.Attr.BlkSize = 4096;
        _inodes.Add(n);
        return n;
    }

    public Node? Find(string path)
    {
        var n = Root;
        foreach (var part in path.Split('/', StringSplitOptions.RemoveEmptyEntries))
        {
            if (n.Children == null || !n.Children.TryGetValue(part, out var c)) return null;
            n = c;
        }
        return n;
    }

    private (Node Parent, string Name) Split(string path)
    {
        path = path.Trim('/');
        int slash = path.LastIndexOf('/');
        var parent = slash < 0 ? Root : AddDir(path[..slash]);
        return (parent, path[(slash + 1)..]);
    }

    private Node Link(string path, Node node)
    {
        var (parent, name) = Split(path);
        if (parent.Children!.ContainsKey(name)) throw new InvalidOperationException($"{path} exists");
        parent.Children[name] = node;
        parent.Order!.Add((name, node));
        node.Parent ??= parent;
        return node;
    }

    /// <summary>Creates a directory and any missing parents; returns the existing one if present.</summary>
    public Node AddDir(string path, uint perm = 0x1ED)
    {
        var existing = Find(path);
        if (existing != null) return existing;
        var (parent, _) = Split(path);
        var n = NewNode(UnixMode.S_IFDIR | perm);
        n.Children = new(StringComparer.Ordinal);
        n.Order = [];
        n.Attr.NLink = 2;
        parent.Attr.NLink++;
        return Link(path, n);
    }

    public Node AddFile(string path, byte[] data, uint perm = 0x1A4 /*0644*/)
    {
        var n = NewNode(UnixMode.S_IFREG | perm);
        n.Data = data;
        SetSize(n, data.Length);
        return Link(path, n);
    }

    public Node AddFile(string path, string text, uint perm = 0x1A4) => AddFile(path, Encoding.UTF8.GetBytes(text), perm);

    /// <summary>A file of <paramref name="size"/> bytes produced on demand by <paramref name="generator"/>.</summary>
    public Node AddGeneratedFile(string path, long size, ContentGenerator generator, uint perm = 0x1A4)
    {
        var n = NewNode(UnixMode.S_IFREG | perm);
        n.Generator = generator;
        SetSize(n, size);
        return Link(path, n);
    }

    /// <summary>A file whose bytes are those of the local file <paramref name="backingPath"/> (passthrough candidate).</summary>
    public Node AddBackedFile(string path, string backingPath, uint perm = 0x1A4)
    {
        var n = NewNode(UnixMode.S_IFREG | perm);
        n.BackingPath = backingPath;
        SetSize(n, new FileInfo(backingPath).Length);
        return Link(path, n);
    }

    private static void SetSize(Node n, long size)
    {
        n.Attr.Size = (ulong)size;
        n.Attr.Blocks = (ulong)((size + 511) / 512);
    }

    public Node AddSymlink(string path, string target)
    {
        var n = NewNode(UnixMode.S_IFLNK | 0x1FF);
        n.LinkTarget = Encoding.UTF8.GetBytes(target);
        n.Attr.Size = (ulong)n.LinkTarget.Length;
        return Link(path, n);
    }

    /// <summary>A second name for the regular file at <paramref name="existing"/> (nlink goes up).</summary>
    public Node AddHardlink(string path, string existing)
    {
        var target = Find(existing) ?? throw new FileNotFoundException(existing);
        if ((target.Attr.Mode & UnixMode.S_IFMT) == UnixMode.S_IFDIR) throw new InvalidOperationException("no hardlinks to directories");
        target.Attr.NLink++;
        return Link(path, target);
    }

    /// <summary>A character device; 0/0 is what overlayfs reads as a whiteout.</summary>
    public Node AddCharDevice(string path, uint major, uint minor, uint perm = 0)
    {
        var n = NewNode(UnixMode.S_IFCHR | perm);
        n.Attr.RDev = FuseAttr.MakeDev(major, minor);
        return Link(path, n);
    }

    public void SetXattr(string path, string name, byte[] value)
    {
        var n = Find(path) ?? throw new FileNotFoundException(path);
        (n.Xattrs ??= new(StringComparer.Ordinal))[name] = value;
    }

    public void SetXattr(string path, string name, string value) => SetXattr(path, name, Encoding.UTF8.GetBytes(value));

    private Node? Get(ulong ino) => ino >= 1 && ino <= (ulong)_inodes.Count ? _inodes[(int)ino - 1] : null;

    private static FuseEntry Entry(Node n) => new() { Ino = n.Ino, Attr = n.Attr };

    // ------------------------------------------------------------ IFuseFileSystem

    public int Lookup(ulong parent, ReadOnlySpan<byte> name, out FuseEntry entry)
    {
        entry = default;
        var p = Get(parent);
        if (p?.Children == null) return p == null ? Errno.ENOENT : Errno.ENOTDIR;
        // Decode into a stack buffer and look up without allocating a string.
        Span<char> chars = stackalloc char[Math.Max(1, name.Length)];
        int len = Encoding.UTF8.GetChars(name, chars);
        var lookup = p.Children.GetAlternateLookup<ReadOnlySpan<char>>();
        if (!lookup.TryGetValue(chars[..len], out var n)) return Errno.ENOENT;
        entry = Entry(n);
        return 0;
    }

    public int GetAttr(ulong ino, out FuseAttr attr)
    {
        var n = Get(ino);
        attr = n?.Attr ?? default;
        return n == null ? Errno.ENOENT : 0;
    }

    public int ReadLink(ulong ino, out ReadOnlyMemory<byte> target)
    {
        var n = Get(ino);
        target = n?.LinkTarget;
        return n == null ? Errno.ENOENT : n.LinkTarget == null ? Errno.EINVAL : 0;
    }

    public int Open(ulong ino, int flags, out FuseOpenResult result)
    {
        result = default;
        var n = Get(ino);
        if (n == null) return Errno.ENOENT;
        if ((n.Attr.Mode & UnixMode.S_IFMT) == UnixMode.S_IFDIR) return Errno.EISDIR;
        result.KeepCache = !n.BlockReads && n.FailReads == 0;
        // Failing and blocking files must reach the server on every read, so they never use the page cache either.
        result.DirectIo = n.DirectIo || n.BlockReads || n.FailReads != 0;
        result.BackingPath = n.OfferPassthrough ? n.BackingPath : null;
        return 0;
    }

    public ValueTask<int> ReadAsync(ulong ino, ulong handle, long offset, Memory<byte> destination, CancellationToken ct)
    {
        Interlocked.Increment(ref _readCalls);
        var n = Get(ino);
        if (n == null) return new(-Errno.ENOENT);
        if (n.FailReads != 0) return new(-n.FailReads);
        if (n.BlockReads) return BlockAsync(ct);
        long size = (long)n.Attr.Size;
        if (offset >= size) return new(0);
        int count = (int)Math.Min(destination.Length, size - offset);
        var dst = destination.Span[..count];
        if (n.Data != null) n.Data.AsSpan((int)offset, count).CopyTo(dst);
        else if (n.Generator != null) n.Generator(offset, dst);
        else if (n.BackingPath != null) count = RandomAccess.Read(BackingHandleOf(n), dst, offset);
        else dst.Clear();
        return new(count);
    }

    /// <summary>Files held as byte arrays are answered from the array itself (no copy in the server).</summary>
    public bool TryReadDirect(ulong ino, ulong handle, long offset, int size, out ReadOnlyMemory<byte> data)
    {
        data = default;
        var n = Get(ino);
        if (n?.Data == null || n.FailReads != 0 || n.BlockReads) return false;
        Interlocked.Increment(ref _readCalls);
        if (offset >= n.Data.Length) return true;
        data = n.Data.AsMemory((int)offset, (int)Math.Min(size, n.Data.Length - offset));
        return true;
    }

    /// <summary>Backed files name their backing file: the bridge splices the bytes from there.</summary>
    public bool TryReadFromFile(ulong ino, ulong handle, long offset, int size, out FuseFileRange range)
    {
        range = default;
        var n = Get(ino);
        if (n == null || n.FailReads != 0 || n.BlockReads) return false;
        SafeFileHandle file;
        if (n.SplicePath != null) file = HandleOf(ref n.SpliceHandle, n.SplicePath);
        else if (n.BackingPath != null && n.SpliceFromBacking) file = BackingHandleOf(n);
        else return false;
        Interlocked.Increment(ref _readCalls);
        long fileSize = (long)n.Attr.Size;
        int len = offset >= fileSize ? 0 : (int)Math.Min(size, fileSize - offset);
        return FuseFileRange.TryLend(file, offset, len, out range);
    }

    /// <summary>Calls of <see cref="FileReadFailed"/> (a file named by <see cref="TryReadFromFile"/> could not be read).</summary>
    public long FileReadFailures => Interlocked.Read(ref _fileReadFailures);
    private long _fileReadFailures;
    /// <summary>The errno of the last <see cref="FileReadFailed"/>.</summary>
    public int LastFileReadErrno { get; private set; }

    public void FileReadFailed(ulong ino, ulong handle, long offset, int size, int errno)
    {
        LastFileReadErrno = errno;
        Interlocked.Increment(ref _fileReadFailures);
    }

    private static SafeFileHandle BackingHandleOf(Node n) => HandleOf(ref n.BackingHandle, n.BackingPath!);

    // Opened once per node and kept: a read must not pay an open(2).
    private static SafeFileHandle HandleOf(ref SafeFileHandle? slot, string path)
    {
        var h = Volatile.Read(ref slot);
        if (h != null) return h;
        var fresh = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        h = Interlocked.CompareExchange(ref slot, fresh, null);
        if (h == null) return fresh;
        fresh.Dispose();
        return h;
    }

    private async ValueTask<int> BlockAsync(CancellationToken ct)
    {
        try
        {
            await Task.Delay(Timeout.Infinite, ct).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            Interlocked.Increment(ref _cancelledReads);
            throw;
        }
        return 0;
    }

    public int ReadDir(ulong ino, ulong handle, long offset, FuseDirWriter writer)
    {
        var n = Get(ino);
        if (n?.Order == null) return n == null ? Errno.ENOENT : Errno.ENOTDIR;
        // Offsets: 0 ".", 1 "..", 2.. children in insertion order; each entry's cookie is its index + 1.
        for (long i = offset; i < n.Order.Count + 2; i++)
        {
            bool ok = i switch
            {
                0 => writer.Add(".", Entry(n), 1),
                1 => writer.Add("..", Entry(n.Parent ?? n), 2),
                _ => writer.Add(n.Order[(int)i - 2].Name, Entry(n.Order[(int)i - 2].Node), i + 1),
            };
            if (!ok) break;
        }
        return 0;
    }

    public int GetXattr(ulong ino, ReadOnlySpan<byte> name, out ReadOnlyMemory<byte> value)
    {
        value = default;
        var n = Get(ino);
        if (n == null) return Errno.ENOENT;
        if (n.Xattrs == null || !n.Xattrs.TryGetValue(Encoding.UTF8.GetString(name), out var v)) return Errno.ENODATA;
        value = v;
        return 0;
    }

    public int ListXattr(ulong ino, out ReadOnlyMemory<byte> names)
    {
        names = default;
        var n = Get(ino);
        if (n == null) return Errno.ENOENT;
        if (n.Xattrs == null) return 0;
        var ms = new MemoryStream();
        foreach (var k in n.Xattrs.Keys)
        {
            ms.Write(Encoding.UTF8.GetBytes(k));
            ms.WriteByte(0);
        }
        names = ms.ToArray();
        return 0;
    }

    public int StatFs(ulong ino, out FuseStatFs stat)
    {
        ulong blocks = 0;
        foreach (var n in _inodes) blocks += n.Attr.Blocks;
        stat = new FuseStatFs
        {
            BlockSize = 4096, FragmentSize = 512, NameLen = 255, Blocks = blocks, Files = (ulong)_inodes.Count,
        };
        return 0;
    }
}

/// <summary>
/// A deterministic, cheap, non-repeating-at-page-granularity byte pattern for big generated files: a 65521-byte
/// (prime) random block, XORed with the block number (mod 256), so an offset error of any size shows up as wrong
/// bytes. The 256 variants are precomputed (16 MiB) so producing bytes is a plain memory copy, like serving a cache.
/// </summary>
public static class TestPattern
{
    private const int Period = 65521;
    private static readonly byte[] Table = MakeTable();

    private static byte[] MakeTable()
    {
        var block = new byte[Period];
        new Random(20240101).NextBytes(block);
        var t = GC.AllocateUninitializedArray<byte>(Period * 256);
        for (int k = 0; k < 256; k++)
            for (int i = 0; i < Period; i++)
                t[k * Period + i] = (byte)(block[i] ^ k);
        return t;
    }

    public static void Fill(long offset, Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            // Within one "row" of the table the bytes are contiguous across block boundaries, so copy the longest run.
            long row = offset / Period % 256;
            int inBlock = (int)(offset % Period);
            int start = (int)(row * Period) + inBlock;
            int n = Math.Min(Table.Length - start, destination.Length);
            Table.AsSpan(start, n).CopyTo(destination);
            offset += n;
            destination = destination[n..];
        }
    }
}
