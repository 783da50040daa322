namespace Stargz.Fuse;

/// <summary>
/// A read-only filesystem served over FUSE, addressed by inode number (1 is the root). Implement what you serve;
/// the defaults answer like an empty filesystem. Metadata calls are synchronous and must not block for long
/// (they run on a reader thread); <see cref="ReadAsync"/> may complete later and out of order.
/// Return 0 for success or a positive errno (see <see cref="Errno"/>); throwing <see cref="FuseException"/>
/// answers its errno, any other exception answers EIO.
/// The bridge counts the kernel's references (LOOKUP, READDIRPLUS, FORGET, BATCH_FORGET) and calls
/// <see cref="Forget"/> when an inode's count drops to zero.
/// </summary>
public interface IFuseFileSystem
{
    /// <summary>Finds <paramref name="name"/> (raw bytes, no NUL) in directory <paramref name="parent"/>.</summary>
    int Lookup(ulong parent, ReadOnlySpan<byte> name, out FuseEntry entry);

    int GetAttr(ulong ino, out FuseAttr attr);

    /// <summary>The target of a symlink, as raw bytes.</summary>
    int ReadLink(ulong ino, out ReadOnlyMemory<byte> target)
    {
        target = default;
        return Errno.EINVAL;
    }

    /// <summary><paramref name="flags"/> are the open(2) flags; writes never get here (the bridge answers EROFS).</summary>
    int Open(ulong ino, int flags, out FuseOpenResult result)
    {
        result = default;
        return 0;
    }

    /// <summary>
    /// Fills <paramref name="destination"/> from <paramref name="offset"/>; returns the number of bytes (short at end of
    /// file, 0 past it) or a negative errno. <paramref name="cancellationToken"/> fires when the caller is interrupted.
    /// </summary>
    ValueTask<int> ReadAsync(ulong ino, ulong handle, long offset, Memory<byte> destination, CancellationToken cancellationToken);

    /// <summary>
    /// Optional fast path, tried before <see cref="ReadAsync"/>: if the bytes already sit in memory, return them and
    /// the bridge writes them to the kernel straight from there (no copy into a reply buffer). Return exactly
    /// <paramref name="size"/> bytes, fewer only at end of file (a short reply means EOF to the kernel). The memory
    /// must stay unchanged until this call's caller has written the reply (it does so before returning).
    /// </summary>
    bool TryReadDirect(ulong ino, ulong handle, long offset, int size, out ReadOnlyMemory<byte> data)
    {
        data = default;
        return false;
    }

    /// <summary>
    /// Optional fast path, tried after <see cref="TryReadDirect"/> and before <see cref="ReadAsync"/>: if the bytes sit
    /// in a local file (a cache file, a backing file that passthrough did not take), name the file and where the
    /// bytes start. The bridge moves them to the kernel with splice(2), so they never pass through the server's memory
    /// (one copy, in the kernel, instead of two); if the file cannot be spliced it reads the same range with pread, and if
    /// that fails too it calls <see cref="FileReadFailed"/> and then <see cref="ReadAsync"/>.
    /// <see cref="FuseFileRange.Length"/> is the reply's length: <paramref name="size"/>, fewer only at end of file.
    /// Make the range with <see cref="FuseFileRange.TryLend"/>: the bridge holds the handle open until it has replied,
    /// whatever the filesystem does with its own reference meanwhile. Runs on a reader thread: only for files on local
    /// storage, never a network file.
    /// </summary>
    bool TryReadFromFile(ulong ino, ulong handle, long offset, int size, out FuseFileRange range)
    {
        range = default;
        return false;
    }

    /// <summary>
    /// The file a <see cref="TryReadFromFile"/> range named could not be read (<paramref name="errno"/>, e.g. EIO from
    /// a failing disk). Nothing was sent: right after this call the bridge serves the same READ through
    /// <see cref="ReadAsync"/>. Drop or stop naming that file here if it should not be tried again. Runs on a reader
    /// thread.
    /// </summary>
    void FileReadFailed(ulong ino, ulong handle, long offset, int size, int errno) { }

    void Release(ulong ino, ulong handle) { }

    int OpenDir(ulong ino, out ulong handle)
    {
        handle = 0;
        return 0;
    }

    /// <summary>Adds entries from <paramref name="offset"/> (0 = start) to <paramref name="writer"/> until it is full.</summary>
    int ReadDir(ulong ino, ulong handle, long offset, FuseDirWriter writer);

    void ReleaseDir(ulong ino, ulong handle) { }

    /// <summary>The value of xattr <paramref name="name"/>, or ENODATA.</summary>
    int GetXattr(ulong ino, ReadOnlySpan<byte> name, out ReadOnlyMemory<byte> value)
    {
        value = default;
        return Errno.ENODATA;
    }

    /// <summary>All xattr names, each followed by a NUL byte.</summary>
    int ListXattr(ulong ino, out ReadOnlyMemory<byte> names)
    {
        names = default;
        return 0;
    }

    int StatFs(ulong ino, out FuseStatFs stat)
    {
        stat = new FuseStatFs { BlockSize = 4096, FragmentSize = 4096, NameLen = 255 };
        return 0;
    }

    /// <summary>The kernel dropped its last reference to <paramref name="ino"/>.</summary>
    void Forget(ulong ino) { }
}
