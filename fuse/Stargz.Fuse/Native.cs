using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>The few libc calls the server needs. All set errno; callers read it with Marshal.GetLastPInvokeError.</summary>
internal static unsafe partial class Native
{
    public const int O_RDONLY = 0, O_RDWR = 2, O_CLOEXEC = 0x80000;
    public const int EPERM = 1, ENOENT = 2, EINTR = 4, EIO = 5, EBADF = 9, EAGAIN = 11, EACCES = 13, EBUSY = 16,
        EINVAL = 22, ENODEV = 19, ENOTDIR = 20, EISDIR = 21, ERANGE = 34, ENOSYS = 38, ENODATA = 61, EROFS = 30,
        ENXIO = 6, EPROTO = 71, ENOTTY = 25, EOPNOTSUPP = 95, ENOTCONN = 107, ECONNABORTED = 103, ENOTSUP = 95, ELOOP = 40;
    public const ulong MS_RDONLY = 1, MS_NOSUID = 2, MS_NODEV = 4;
    public const int MNT_FORCE = 1, MNT_DETACH = 2;
    public const short POLLIN = 1;

    // _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map /*16 bytes*/), _IOW(229, 2, uint32_t)
    public const uint FUSE_DEV_IOC_CLONE = 0x8004E500;
    public const uint FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501;
    public const uint FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path, int flags, int mode);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "read", SetLastError = true)]
    public static partial nint Read(int fd, byte* buf, nint count);

    [LibraryImport("libc", EntryPoint = "write", SetLastError = true)]
    public static partial nint Write(int fd, byte* buf, nint count);

    [LibraryImport("libc", EntryPoint = "writev", SetLastError = true)]
    public static partial nint Writev(int fd, IoVec* iov, int iovcnt);

    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)]
    public static partial int Ioctl(int fd, nuint request, void* arg);

    [LibraryImport("libc", EntryPoint = "mount", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Mount(string source, string target, string fstype, ulong flags, string data);

    [LibraryImport("libc", EntryPoint = "umount2", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Umount2(string target, int flags);

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    public static partial int Poll(PollFd* fds, nuint nfds, int timeoutMs);

    // statx (glibc >= 2.28); struct statx is 256 bytes.
    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Statx(int dirfd, string path, int flags, uint mask, byte* statxBuf);

    public const int AT_FDCWD = -100, AT_STATX_FORCE_SYNC = 0x2000;

    [LibraryImport("libc", EntryPoint = "getuid")]
    public static partial uint GetUid();

    [LibraryImport("libc", EntryPoint = "getgid")]
    public static partial uint GetGid();

    [LibraryImport("libc", EntryPoint = "socketpair", SetLastError = true)]
    public static partial int SocketPair(int domain, int type, int protocol, int* sv);

    [LibraryImport("libc", EntryPoint = "recvmsg", SetLastError = true)]
    public static partial nint RecvMsg(int fd, MsgHdr* msg, int flags);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(int fd, int cmd, int arg);

    public const int F_SETPIPE_SZ = 1031, F_GETPIPE_SZ = 1032;
    public const uint SPLICE_F_NONBLOCK = 2;

    [LibraryImport("libc", EntryPoint = "pipe2", SetLastError = true)]
    public static partial int Pipe2(int* fds, int flags);

    [LibraryImport("libc", EntryPoint = "splice", SetLastError = true)]
    public static partial nint Splice(int fdIn, long* offIn, int fdOut, long* offOut, nuint len, uint flags);

    [LibraryImport("libc", EntryPoint = "pread64", SetLastError = true)]
    public static partial nint Pread(int fd, byte* buf, nint count, long offset);

    [StructLayout(LayoutKind.Sequential)]
    public struct PollFd { public int Fd; public short Events; public short REvents; }

    [StructLayout(LayoutKind.Sequential)]
    public struct IoVec { public void* Base; public nuint Len; }

    [StructLayout(LayoutKind.Sequential)]
    public struct MsgHdr
    {
        public void* Name; public uint NameLen; public IoVec* Iov; public nuint IovLen;
        public void* Control; public nuint ControlLen; public int Flags;
    }

    public static int LastErrno => Marshal.GetLastPInvokeError();

    /// <summary>
    /// Stat a path and return 0 or the errno (used to spot dead FUSE mounts: ENOTCONN). Forces a round trip to the
    /// filesystem: a plain stat may be answered from the kernel's attribute cache even after the server died.
    /// </summary>
    public static int StatErrno(string path)
    {
        byte* buf = stackalloc byte[512];
        return Statx(AT_FDCWD, path, AT_STATX_FORCE_SYNC, 0x7ff /*STATX_BASIC_STATS*/, buf) == 0 ? 0 : LastErrno;
    }
}
