using System.Runtime.InteropServices;

namespace Stargz.Fuse.Handover;

/// <summary>The socket calls of the service-manager protocol (sd_notify(3), sd_listen_fds(3)); no libsystemd.</summary>
internal static unsafe partial class NotifyNative
{
    public const int AF_UNIX = 1, SOCK_DGRAM = 2, SOCK_CLOEXEC = 0x80000;
    public const int SOL_SOCKET = 1, SO_PASSCRED = 16, SCM_RIGHTS = 1, SCM_CREDENTIALS = 2;
    public const int MSG_CMSG_CLOEXEC = 0x40000000, MSG_NOSIGNAL = 0x4000, MSG_TRUNC = 0x20, MSG_CTRUNC = 0x8;
    public const int F_GETFD = 1, F_SETFD = 2, FD_CLOEXEC = 1, F_DUPFD_CLOEXEC = 1030;
    /// <summary>struct cmsghdr: size_t len; int level; int type; then the data, 8-aligned.</summary>
    public const int CmsgHeader = 16;
    /// <summary>sockaddr_un: sa_family_t then 108 bytes of path.</summary>
    public const int SunPathMax = 108;

    [StructLayout(LayoutKind.Sequential)]
    public struct SockAddrUn
    {
        public ushort Family;
        public fixed byte Path[SunPathMax];
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct UCred { public int Pid; public uint Uid; public uint Gid; }

    [LibraryImport("libc", EntryPoint = "socket", SetLastError = true)]
    public static partial int Socket(int domain, int type, int protocol);

    [LibraryImport("libc", EntryPoint = "bind", SetLastError = true)]
    public static partial int Bind(int fd, SockAddrUn* addr, uint len);

    [LibraryImport("libc", EntryPoint = "sendmsg", SetLastError = true)]
    public static partial nint SendMsg(int fd, Native.MsgHdr* msg, int flags);

    [LibraryImport("libc", EntryPoint = "recvmsg", SetLastError = true)]
    public static partial nint RecvMsg(int fd, Native.MsgHdr* msg, int flags);

    [LibraryImport("libc", EntryPoint = "setsockopt", SetLastError = true)]
    public static partial int SetSockOpt(int fd, int level, int name, int* value, uint len);

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    public static partial int Fcntl(int fd, int cmd, int arg);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    public static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "getpid")]
    public static partial int GetPid();

    [LibraryImport("libc", EntryPoint = "shutdown", SetLastError = true)]
    public static partial int Shutdown(int fd, int how);

    public static int LastErrno => Marshal.GetLastPInvokeError();

    public static int CmsgSpace(int dataLength) => CmsgHeader + ((dataLength + 7) & ~7);

    /// <summary>
    /// Fills <paramref name="sa"/> for <paramref name="path"/> ("@name" is an abstract socket, as systemd writes it)
    /// and returns the address length.
    /// </summary>
    public static uint Address(string path, out SockAddrUn sa)
    {
        sa = default;
        sa.Family = AF_UNIX;
        var bytes = System.Text.Encoding.UTF8.GetBytes(path);
        if (bytes.Length == 0 || bytes.Length >= SunPathMax) throw new ArgumentException($"bad notify socket path '{path}'");
        fixed (byte* p = sa.Path)
        {
            var dst = new Span<byte>(p, SunPathMax);
            bytes.CopyTo(dst);
            if (bytes[0] == (byte)'@')
            {
                dst[0] = 0; // abstract: no terminating NUL, the length says where the name ends
                return (uint)(2 + bytes.Length);
            }
            dst[bytes.Length] = 0;
            return (uint)(2 + bytes.Length + 1);
        }
    }
}
