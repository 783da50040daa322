using System.Text;

namespace Stargz.Fuse.Handover;

/// <summary>One datagram a service might send: its text, the fds attached, and who sent it (kernel-checked).</summary>
public sealed record NotifyMessage(string Text, int[] Fds, int SenderPid, uint SenderUid)
{
    /// <summary>The value of <paramref name="key"/> in the message's KEY=VALUE lines, or null.</summary>
    public string? Value(string key)
    {
        foreach (var line in Text.Split('\n'))
            if (line.Length > key.Length && line[key.Length] == '=' && line.StartsWith(key, StringComparison.Ordinal))
                return line[(key.Length + 1)..];
        return null;
    }
}

/// <summary>
/// The listening end of the notify protocol (what systemd binds for <c>$NOTIFY_SOCKET</c>): a datagram socket that
/// receives state lines, attached fds and the sender's credentials.
/// </summary>
public sealed unsafe class NotifyListener : IDisposable
{
    private const int MaxFdsPerMessage = 253; // SCM_MAX_FD
    private const int MaxText = 4096;
    private readonly int _sock;
    private volatile bool _disposed;

    /// <summary>The socket's name as <c>NOTIFY_SOCKET</c> takes it ("@..." for an abstract socket).</summary>
    public string Path { get; }

    public NotifyListener(string path)
    {
        Path = path;
        uint len = NotifyNative.Address(path, out var sa);
        _sock = NotifyNative.Socket(NotifyNative.AF_UNIX, NotifyNative.SOCK_DGRAM | NotifyNative.SOCK_CLOEXEC, 0);
        if (_sock < 0) throw new IOException($"notify socket: errno {NotifyNative.LastErrno}");
        int one = 1;
        // The kernel attaches the sender's pid and uid to every datagram: messages from anyone but our child are refused.
        if (NotifyNative.SetSockOpt(_sock, NotifyNative.SOL_SOCKET, NotifyNative.SO_PASSCRED, &one, sizeof(int)) != 0 ||
            NotifyNative.Bind(_sock, &sa, len) != 0)
        {
            int e = NotifyNative.LastErrno;
            NotifyNative.Close(_sock);
            throw new IOException($"bind notify socket {path}: errno {e}");
        }
    }

    /// <summary>A fresh abstract socket name for this process.</summary>
    public static string NewAbstractName(string prefix) =>
        $"@{prefix}/{NotifyNative.GetPid()}/{Convert.ToHexString(System.Security.Cryptography.RandomNumberGenerator.GetBytes(6))}";

    /// <summary>
    /// Waits up to <paramref name="timeoutMs"/> for one datagram; null on timeout or after Dispose. Attached fds
    /// arrive close-on-exec; they are the caller's to keep or close.
    /// </summary>
    public NotifyMessage? Receive(int timeoutMs)
    {
        if (_disposed) return null;
        var pfd = new Native.PollFd { Fd = _sock, Events = Native.POLLIN };
        int r = Native.Poll(&pfd, 1, timeoutMs);
        if (r <= 0 || _disposed) return null;
        byte* text = stackalloc byte[MaxText];
        int controlLen = NotifyNative.CmsgSpace(MaxFdsPerMessage * sizeof(int)) + NotifyNative.CmsgSpace(sizeof(NotifyNative.UCred));
        byte* control = stackalloc byte[controlLen];
        var iov = new Native.IoVec { Base = text, Len = MaxText };
        var msg = new Native.MsgHdr { Iov = &iov, IovLen = 1, Control = control, ControlLen = (nuint)controlLen };
        nint n;
        do n = NotifyNative.RecvMsg(_sock, &msg, NotifyNative.MSG_CMSG_CLOEXEC | 0x40 /*MSG_DONTWAIT*/);
        while (n < 0 && NotifyNative.LastErrno == Native.EINTR);
        if (n < 0) return null;
        var fds = new List<int>();
        int pid = 0;
        uint uid = uint.MaxValue;
        // Walk the control messages: SCM_RIGHTS (fds) and SCM_CREDENTIALS (sender).
        nuint off = 0;
        while (off + NotifyNative.CmsgHeader <= msg.ControlLen)
        {
            byte* c = control + off;
            nuint clen = *(nuint*)c;
            if (clen < NotifyNative.CmsgHeader || off + clen > msg.ControlLen) break;
            int level = *(int*)(c + 8), type = *(int*)(c + 12);
            int dataLen = (int)clen - NotifyNative.CmsgHeader;
            if (level == NotifyNative.SOL_SOCKET && type == NotifyNative.SCM_RIGHTS)
                for (int i = 0; i < dataLen / sizeof(int); i++) fds.Add(((int*)(c + NotifyNative.CmsgHeader))[i]);
            else if (level == NotifyNative.SOL_SOCKET && type == NotifyNative.SCM_CREDENTIALS && dataLen >= sizeof(NotifyNative.UCred))
            {
                var cred = *(NotifyNative.UCred*)(c + NotifyNative.CmsgHeader);
                pid = cred.Pid;
                uid = cred.Uid;
            }
            off += (nuint)NotifyNative.CmsgSpace(dataLen);
        }
        var s = Encoding.UTF8.GetString(text, (int)Math.Min(n, MaxText));
        if ((msg.Flags & (NotifyNative.MSG_TRUNC | NotifyNative.MSG_CTRUNC)) != 0)
        {
            // A cut message is not acted on: its fds are closed rather than stored under a wrong or missing name.
            foreach (var fd in fds) NotifyNative.Close(fd);
            return new NotifyMessage("", [], pid, uid);
        }
        return new NotifyMessage(s, fds.ToArray(), pid, uid);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        NotifyNative.Close(_sock);
    }
}
