using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Stargz.Fuse;

/// <summary>errno values a filesystem returns (positive). The bridge negates them on the wire.</summary>
public static class Errno
{
    public const int EPERM = 1, ENOENT = 2, EINTR = 4, EIO = 5, ENXIO = 6, EBADF = 9, EAGAIN = 11, ENOMEM = 12,
        EACCES = 13, EBUSY = 16, EEXIST = 17, ENOTDIR = 20, EISDIR = 21, EINVAL = 22, ENOSPC = 28, EROFS = 30,
        ERANGE = 34, ENAMETOOLONG = 36, ENOSYS = 38, ENOTEMPTY = 39, ENODATA = 61, ENOTSUP = 95, ETIMEDOUT = 110;
}

/// <summary>File type bits of <see cref="FuseAttr.Mode"/> (as in stat(2)).</summary>
public static class UnixMode
{
    public const uint S_IFMT = 0xF000, S_IFSOCK = 0xC000, S_IFLNK = 0xA000, S_IFREG = 0x8000, S_IFBLK = 0x6000,
        S_IFDIR = 0x4000, S_IFCHR = 0x2000, S_IFIFO = 0x1000;
}

/// <summary>
/// Attributes of an inode, laid out exactly as the kernel's <c>struct fuse_attr</c> so the bridge copies it
/// into replies without conversion. Times are seconds since the epoch plus nanoseconds.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
public struct FuseAttr
{
    public ulong Ino;
    public ulong Size;
    /// <summary>512-byte blocks allocated (what `du` and `stat -c %b` show).</summary>
    public ulong Blocks;
    public ulong ATime, MTime, CTime;
    public uint ATimeNsec, MTimeNsec, CTimeNsec;
    /// <summary>File type and permission bits, e.g. <c>UnixMode.S_IFREG | 0o644</c>.</summary>
    public uint Mode;
    public uint NLink;
    public uint Uid, Gid;
    /// <summary>Device number for char/block devices in the kernel's new encoding (see <see cref="MakeDev"/>).</summary>
    public uint RDev;
    public uint BlkSize;
    public uint Flags;

    /// <summary>Encodes major/minor as the kernel's new_encode_dev (what FUSE carries in rdev).</summary>
    public static uint MakeDev(uint major, uint minor) => (minor & 0xff) | (major << 8) | ((minor & ~0xffu) << 12);
}

/// <summary>The answer to a lookup: the inode, its generation, attributes and how long the kernel may cache them.</summary>
public struct FuseEntry
{
    /// <summary>Inode number; must be stable for the life of the mount and never 0. 1 is the root.</summary>
    public ulong Ino;
    /// <summary>Changes if an inode number is reused for a different object (a read-only tree keeps it 0 or 1).</summary>
    public ulong Generation;
    public FuseAttr Attr;
    /// <summary>Overrides the mount's entry timeout for this name when set.</summary>
    public TimeSpan? EntryTimeout;
    /// <summary>Overrides the mount's attribute timeout for this inode when set.</summary>
    public TimeSpan? AttrTimeout;
}

/// <summary>What an open returns.</summary>
public struct FuseOpenResult
{
    /// <summary>The filesystem's own handle, passed back to read/release. Must be below 2^62 (the bridge uses the two top bits).</summary>
    public ulong Handle;
    /// <summary>Keep the kernel page cache across opens (right for immutable files).</summary>
    public bool KeepCache;
    /// <summary>
    /// Direct I/O (FOPEN_DIRECT_IO): the kernel copies each READ reply straight into the reader's buffer instead of
    /// filling page-cache pages and copying from those, so big sequential reads cost one copy fewer. The price: no
    /// page cache, so every read (also a repeated one) reaches the filesystem and there is no kernel readahead, and a
    /// shared mmap of the file needs <see cref="FuseServer.DirectIoAllowMmapNegotiated"/> (private mappings such as
    /// exec always work). Ignored for an open that gets passthrough.
    /// </summary>
    public bool DirectIo;
    /// <summary>
    /// A local file holding the complete bytes of this file. With passthrough enabled and accepted by the kernel,
    /// reads go straight to it and never reach <see cref="IFuseFileSystem.ReadAsync"/>; otherwise ignored.
    /// </summary>
    public string? BackingPath;
    /// <summary>Same as <see cref="BackingPath"/> but an already open file (the bridge does not take ownership).</summary>
    public SafeFileHandle? BackingFile;
}

/// <summary>
/// Where the bytes of a READ sit in a local file (see <see cref="IFuseFileSystem.TryReadFromFile"/>). Made only by
/// <see cref="TryLend"/>, which takes a reference on the handle for the bridge; the bridge drops it once it has replied.
/// So the filesystem may dispose its handle at any time (a cache evicting it, a release racing a read): the descriptor
/// closes when the last reference goes, never under a reply.
/// </summary>
public readonly struct FuseFileRange
{
    public SafeFileHandle? File { get; }
    public long Offset { get; }
    /// <summary>The reply's length: the READ's size, fewer only at end of file.</summary>
    public int Length { get; }

    private FuseFileRange(SafeFileHandle file, long offset, int length)
    {
        File = file;
        Offset = offset;
        Length = length;
    }

    /// <summary>
    /// A range of <paramref name="file"/> holding one reference on it for the bridge; false if the handle is already
    /// closed. Return it from <see cref="IFuseFileSystem.TryReadFromFile"/> (returning false after a successful lend
    /// leaks the reference).
    /// </summary>
    public static bool TryLend(SafeFileHandle file, long offset, int length, out FuseFileRange range)
    {
        range = default;
        bool added = false;
        try { file.DangerousAddRef(ref added); }
        catch (ObjectDisposedException) { return false; }
        if (!added) return false;
        range = new FuseFileRange(file, offset, length);
        return true;
    }

    /// <summary>Drops the reference <see cref="TryLend"/> took.</summary>
    internal void Return() => File?.DangerousRelease();
}

/// <summary>statfs(2) figures for the mount.</summary>
public struct FuseStatFs
{
    public ulong Blocks, BlocksFree, BlocksAvailable, Files, FilesFree;
    public uint BlockSize, NameLen, FragmentSize;
}

/// <summary>Thrown by a handler to answer with a specific errno (returning a negative value works too).</summary>
public sealed class FuseException(int errno, string? message = null)
    : Exception(message ?? $"errno {errno}")
{
    public int Errno { get; } = errno;
}
