using System.Diagnostics;

namespace Stargz.Fuse;

/// <summary>Non-root mounts: fusermount3 mounts for us and hands the /dev/fuse fd back over a unix socket.</summary>
internal static unsafe class Fusermount
{
    private const int AF_UNIX = 1, SOCK_STREAM = 1, F_SETFD = 2, FD_CLOEXEC = 1, SOL_SOCKET = 1, SCM_RIGHTS = 1;

    private static string Binary()
    {
        foreach (var d in new[] { "/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin", "/sbin" })
        {
            var p = Path.Combine(d, "fusermount3");
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException("fusermount3 not found (install the fuse3 package)");
    }

    public static int Mount(string mountPoint, string options)
    {
        int* sv = stackalloc int[2];
        if (Native.SocketPair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
            throw new IOException($"socketpair: errno {Native.LastErrno}");
        // Only the child's end may cross exec.
        Native.Fcntl(sv[0], F_SETFD, FD_CLOEXEC);
        Process? p = null;
        try
        {
            var psi = new ProcessStartInfo(Binary()) { UseShellExecute = false, RedirectStandardError = true };
            psi.ArgumentList.Add("-o");
            psi.ArgumentList.Add(options);
            psi.ArgumentList.Add("--");
            psi.ArgumentList.Add(mountPoint);
            psi.Environment["_FUSE_COMMFD"] = sv[1].ToString();
            p = Process.Start(psi) ?? throw new IOException("cannot start fusermount3");
            Native.Close(sv[1]);
            sv[1] = -1;
            int fd = ReceiveFd(sv[0]);
            var err = p.StandardError.ReadToEnd();
            if (!p.WaitForExit(10_000)) { p.Kill(); throw new TimeoutException("fusermount3 did not exit"); }
            if (fd < 0) throw new IOException($"fusermount3 failed ({p.ExitCode}): {err.Trim()}");
            Native.Fcntl(fd, F_SETFD, FD_CLOEXEC);
            return fd;
        }
        finally
        {
            if (sv[1] >= 0) Native.Close(sv[1]);
            Native.Close(sv[0]);
            p?.Dispose();
        }
    }

    private static int ReceiveFd(int sock)
    {
        byte one;
        var iov = new Native.IoVec { Base = &one, Len = 1 };
        byte* control = stackalloc byte[64];
        var msg = new Native.MsgHdr { Iov = &iov, IovLen = 1, Control = control, ControlLen = 64 };
        nint n;
        do n = Native.RecvMsg(sock, &msg, 0);
        while (n < 0 && Native.LastErrno == Native.EINTR);
        if (n <= 0 || msg.ControlLen < 20) return -1;
        // struct cmsghdr { size_t len; int level; int type; } then the fd.
        int level = *(int*)(control + 8), type = *(int*)(control + 12);
        if (level != SOL_SOCKET || type != SCM_RIGHTS) return -1;
        return *(int*)(control + 16);
    }

    public static void Unmount(string mountPoint, bool lazy)
    {
        var psi = new ProcessStartInfo(Binary()) { UseShellExecute = false, RedirectStandardError = true };
        psi.ArgumentList.Add(lazy ? "-uz" : "-u");
        psi.ArgumentList.Add("--");
        psi.ArgumentList.Add(mountPoint);
        using var p = Process.Start(psi);
        if (p == null) return;
        p.StandardError.ReadToEnd();
        if (!p.WaitForExit(10_000)) p.Kill();
        if (p.ExitCode != 0 && !lazy) Unmount(mountPoint, lazy: true);
    }
}
