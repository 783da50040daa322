using System.Runtime.InteropServices;

namespace Stargz.Snapshotter;

/// <summary>
/// The few Linux calls the store and its server need: umount2, syncfs, fsync of directories, lstat for disk usage,
/// and for the socket umask and a close-on-exec duplicate of its fd.
/// </summary>
internal static class Native
{
    public const int MNT_DETACH = 2;

    [DllImport("libc", EntryPoint = "umask")]
    public static extern int Umask(int mask);

    [DllImport("libc", SetLastError = true)]
    private static extern int fcntl(int fd, int cmd, int arg);

    private const int F_DUPFD_CLOEXEC = 1030;

    /// <summary>A close-on-exec duplicate of <paramref name="fd"/> numbered 3 or above; -1 and errno on failure.</summary>
    public static int DuplicateFd(int fd) => fcntl(fd, F_DUPFD_CLOEXEC, 3);

    [DllImport("libc", SetLastError = true)]
    private static extern int umount2(string target, int flags);

    [DllImport("libc", SetLastError = true)]
    private static extern int open(string path, int flags, int mode);

    [DllImport("libc", SetLastError = true)]
    private static extern int close(int fd);

    [DllImport("libc", SetLastError = true)]
    private static extern int fsync(int fd);

    [DllImport("libc", SetLastError = true)]
    private static extern int syncfs(int fd);

    [DllImport("libc", SetLastError = true, EntryPoint = "lstat")]
    private static extern int lstat_raw(string path, byte[] buf);

    private const int O_RDONLY = 0, O_DIRECTORY = 0x10000, O_CLOEXEC = 0x80000;

    public static void Unmount(string target, bool detach)
    {
        if (umount2(target, detach ? MNT_DETACH : 0) != 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            throw new IOException($"umount {target}: errno {errno}");
        }
    }

    /// <summary>fsync of a directory (makes a rename or create in it durable).</summary>
    public static void FsyncDir(string dir) => WithFd(dir, fd => fsync(fd), "fsync");

    /// <summary>fsync of a regular file through a descriptor of our own (LiteDB keeps its handles private).</summary>
    public static void FsyncFile(string file)
    {
        var fd = open(file, O_RDONLY | O_CLOEXEC, 0);
        if (fd < 0) throw new IOException($"open {file} for fsync: errno {Marshal.GetLastPInvokeError()}");
        try
        {
            if (fsync(fd) != 0) throw new IOException($"fsync {file}: errno {Marshal.GetLastPInvokeError()}");
        }
        finally { close(fd); }
    }

    /// <summary>Flushes the whole filesystem holding <paramref name="path"/> (committed layer data must survive power loss).</summary>
    public static void SyncFs(string path) => WithFd(path, fd => syncfs(fd), "syncfs");

    private static void WithFd(string path, Func<int, int> op, string what)
    {
        var fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
        if (fd < 0) throw new IOException($"open {path} for {what}: errno {Marshal.GetLastPInvokeError()}");
        try
        {
            if (op(fd) != 0) throw new IOException($"{what} {path}: errno {Marshal.GetLastPInvokeError()}");
        }
        finally { close(fd); }
    }

    /// <summary>(dev, ino, blocks*512) of a path without following symlinks; null if it vanished.</summary>
    public static (ulong Dev, ulong Ino, long Bytes)? Lstat(string path)
    {
        var buf = new byte[256];
        if (lstat_raw(path, buf) != 0) return null;
        ulong dev = BitConverter.ToUInt64(buf, 0), ino = BitConverter.ToUInt64(buf, 8);
        long blocks = RuntimeInformation.ProcessArchitecture switch
        {
            Architecture.X64 => BitConverter.ToInt64(buf, 64),   // x86_64 struct stat: st_blocks at 64
            Architecture.Arm64 => BitConverter.ToInt64(buf, 64), // asm-generic struct stat: st_blocks at 64 too
            _ => -1,
        };
        if (blocks < 0) return (dev, ino, new FileInfo(path).Length);
        return (dev, ino, blocks * 512);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int flock(int fd, int operation);

    private const int O_RDWR = 2, O_CREAT = 0x40, LOCK_EX = 2, LOCK_NB = 4;

    /// <summary>
    /// Takes an exclusive advisory lock on <paramref name="path"/> (created if needed) and returns its fd, held until
    /// <see cref="CloseFd"/>; null when another process holds it.
    /// </summary>
    public static int? TryLockFile(string path)
    {
        var fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0b110_000_000);
        if (fd < 0) throw new IOException($"open {path}: errno {Marshal.GetLastPInvokeError()}");
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return fd;
        close(fd);
        return null;
    }

    public static void CloseFd(int fd) => close(fd);

    /// <summary>Owner (uid, gid) of a path, not following symlinks; null if it vanished.</summary>
    public static (int Uid, int Gid)? Owner(string path)
    {
        var buf = new byte[256];
        if (lstat_raw(path, buf) != 0) return null;
        return RuntimeInformation.ProcessArchitecture switch
        {
            Architecture.X64 => (BitConverter.ToInt32(buf, 28), BitConverter.ToInt32(buf, 32)),
            Architecture.Arm64 => (BitConverter.ToInt32(buf, 24), BitConverter.ToInt32(buf, 28)),
            _ => null,
        };
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int lchown(string path, int owner, int group);

    public static void Chown(string path, int uid, int gid)
    {
        if (lchown(path, uid, gid) != 0) throw new IOException($"lchown {path} {uid}:{gid}: errno {Marshal.GetLastPInvokeError()}");
    }

    /// <summary>Mount points at or below <paramref name="dir"/> from /proc/self/mountinfo, deepest first.</summary>
    public static List<string> MountsUnder(string dir)
    {
        var prefix = dir.TrimEnd('/') + "/";
        var list = new List<string>();
        foreach (var line in File.ReadAllLines("/proc/self/mountinfo"))
        {
            var parts = line.Split(' ');
            if (parts.Length < 5) continue;
            var mp = parts[4].Replace("\\040", " ").Replace("\\011", "\t").Replace("\\012", "\n").Replace("\\134", "\\");
            if (mp == dir.TrimEnd('/') || mp.StartsWith(prefix, StringComparison.Ordinal)) list.Add(mp);
        }
        return list.OrderByDescending(m => m.Length).ToList();
    }

    public static bool IsMountPoint(string path) => MountsUnder(path).Contains(path.TrimEnd('/'));
}
