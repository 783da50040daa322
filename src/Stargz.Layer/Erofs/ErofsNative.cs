using System.Runtime.InteropServices;
using System.Text;

namespace Stargz.Layer.Erofs;

/// <summary>The syscalls promotion needs: file-backed erofs mounts, mount placement beneath a mount, and lstat/xattr reads.</summary>
internal static unsafe class ErofsNative
{
    private const int AT_FDCWD = -100;
    private const int AT_SYMLINK_NOFOLLOW = 0x100;
    private const uint STATX_BASIC_STATS = 0x7ff;
    private const uint MS_RDONLY = 1, MS_BIND = 4096;
    private const int MNT_DETACH = 2;
    private const uint OPEN_TREE_CLONE = 1, OPEN_TREE_CLOEXEC = 0x80000;
    private const uint MOVE_MOUNT_F_EMPTY_PATH = 4, MOVE_MOUNT_BENEATH = 0x200;
    // Syscall numbers of open_tree/move_mount are the same on x86_64 and arm64 (the new-mount-API block, 428/429).
    private const long SYS_open_tree = 428, SYS_move_mount = 429;

    /// <summary>What lstat shows of one path (statx, no symlink followed).</summary>
    internal readonly record struct Stat(uint Mode, uint Uid, uint Gid, uint NLink, ulong Ino, long Size, long MTimeSec, uint MTimeNsec,
        uint RDevMajor, uint RDevMinor);

    [StructLayout(LayoutKind.Explicit, Size = 256)]
    private struct StatxBuf
    {
        [FieldOffset(16)] public uint NLink;
        [FieldOffset(20)] public uint Uid;
        [FieldOffset(24)] public uint Gid;
        [FieldOffset(28)] public ushort Mode;
        [FieldOffset(32)] public ulong Ino;
        [FieldOffset(40)] public ulong Size;
        [FieldOffset(112)] public long MTimeSec;
        [FieldOffset(120)] public uint MTimeNsec;
        [FieldOffset(128)] public uint RDevMajor;
        [FieldOffset(132)] public uint RDevMinor;
    }

    public static Stat LStat(string path)
    {
        StatxBuf b;
        if (statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, &b) != 0) throw Error("statx", path);
        return new Stat(b.Mode, b.Uid, b.Gid, b.NLink, b.Ino, (long)b.Size, b.MTimeSec, b.MTimeNsec, b.RDevMajor, b.RDevMinor);
    }

    /// <summary>The xattrs of <paramref name="path"/> (not following a symlink), name → value.</summary>
    public static SortedDictionary<string, byte[]> XattrsOf(string path)
    {
        var result = new SortedDictionary<string, byte[]>(StringComparer.Ordinal);
        var n = llistxattr(path, null, 0);
        if (n < 0) throw Error("llistxattr", path);
        if (n == 0) return result;
        var names = new byte[n];
        fixed (byte* p = names) n = llistxattr(path, p, (nuint)names.Length);
        if (n < 0) throw Error("llistxattr", path);
        var start = 0;
        for (var i = 0; i < n; i++)
        {
            if (names[i] != 0) continue;
            var name = Encoding.UTF8.GetString(names, start, i - start);
            start = i + 1;
            var len = lgetxattr(path, name, null, 0);
            if (len < 0) throw Error("lgetxattr " + name, path);
            var value = new byte[len];
            fixed (byte* v = value) len = lgetxattr(path, name, v, (nuint)value.Length);
            if (len < 0) throw Error("lgetxattr " + name, path);
            result[name] = value.AsSpan(0, (int)len).ToArray();
        }
        return result;
    }

    /// <summary>Mounts the erofs image file read-only at <paramref name="target"/> (file-backed: kernel 6.12+, no loop device).</summary>
    public static void MountErofs(string image, string target)
    {
        if (mount(image, target, "erofs", MS_RDONLY, null) != 0) throw Error("mount erofs " + image, target);
    }

    public static void Bind(string source, string target)
    {
        if (mount(source, target, null, MS_BIND, null) != 0) throw Error("bind mount " + source, target);
    }

    /// <summary>
    /// Puts a clone of the mount at <paramref name="source"/> beneath the mount on top of <paramref name="target"/>
    /// (MOVE_MOUNT_BENEATH, 6.5+): unmounting the top one then uncovers it, with no moment where the path is empty.
    /// </summary>
    public static void MountBeneath(string source, string target)
    {
        var fd = (int)syscall(SYS_open_tree, AT_FDCWD, source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
        if (fd < 0) throw Error("open_tree", source);
        try
        {
            if (syscall(SYS_move_mount, fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_BENEATH) != 0)
                throw Error("move_mount beneath", target);
        }
        finally { close(fd); }
    }

    /// <summary>Detaches the top mount at <paramref name="path"/>; false when nothing is mounted there (EINVAL/ENOENT).</summary>
    public static bool Detach(string path)
    {
        if (umount2(path, MNT_DETACH) == 0) return true;
        var e = Marshal.GetLastPInvokeError();
        if (e is 22 or 2) return false;
        throw new IOException($"umount {path}: {Marshal.GetPInvokeErrorMessage(e)}", e);
    }

    /// <summary>
    /// Whether anything besides this call has <paramref name="path"/> open — a file-backed erofs mount holds its image
    /// open until its superblock goes (the last overlay or open file on it): a write lease is refused (EAGAIN) while
    /// any other open exists. Null when the file system takes no leases (nothing can be told then).
    /// </summary>
    public static bool? IsOpenElsewhere(string path)
    {
        const int O_RDONLY = 0, O_CLOEXEC = 0x80000, F_SETLEASE = 1024, F_WRLCK = 1, F_UNLCK = 2, EAGAIN = 11, EBUSY = 16;
        var fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw Error("open", path);
        try
        {
            if (fcntl(fd, F_SETLEASE, F_WRLCK) == 0)
            {
                fcntl(fd, F_SETLEASE, F_UNLCK);
                return false;
            }
            var e = Marshal.GetLastPInvokeError();
            return e is EAGAIN or EBUSY ? true : null;
        }
        finally { close(fd); }
    }

    private static IOException Error(string what, string path)
    {
        var e = Marshal.GetLastPInvokeError();
        return new IOException($"{what} {path}: {Marshal.GetPInvokeErrorMessage(e)}", e);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int statx(int dirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags, uint mask, StatxBuf* buf);

    [DllImport("libc", SetLastError = true)]
    private static extern nint llistxattr([MarshalAs(UnmanagedType.LPUTF8Str)] string path, byte* list, nuint size);

    [DllImport("libc", SetLastError = true)]
    private static extern nint lgetxattr([MarshalAs(UnmanagedType.LPUTF8Str)] string path, [MarshalAs(UnmanagedType.LPUTF8Str)] string name, byte* value,
        nuint size);

    [DllImport("libc", SetLastError = true)]
    private static extern int mount([MarshalAs(UnmanagedType.LPUTF8Str)] string source, [MarshalAs(UnmanagedType.LPUTF8Str)] string target,
        [MarshalAs(UnmanagedType.LPUTF8Str)] string? fstype, uint flags, [MarshalAs(UnmanagedType.LPUTF8Str)] string? data);

    [DllImport("libc", SetLastError = true)]
    private static extern int umount2([MarshalAs(UnmanagedType.LPUTF8Str)] string target, int flags);

    [DllImport("libc", SetLastError = true)]
    private static extern long syscall(long number, int dirfd, [MarshalAs(UnmanagedType.LPUTF8Str)] string path, uint flags);

    [DllImport("libc", SetLastError = true)]
    private static extern long syscall(long number, int fromFd, [MarshalAs(UnmanagedType.LPUTF8Str)] string fromPath, int toFd,
        [MarshalAs(UnmanagedType.LPUTF8Str)] string toPath, uint flags);

    [DllImport("libc", SetLastError = true)]
    private static extern int close(int fd);

    [DllImport("libc", SetLastError = true)]
    private static extern int open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags);

    [DllImport("libc", SetLastError = true)]
    private static extern int fcntl(int fd, int cmd, int arg);
}
