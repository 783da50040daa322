using System.Text;

namespace Stargz.Fuse.Handover;

/// <summary>
/// The service manager's side channel as sd_notify(3) speaks it: datagrams of "KEY=VALUE" lines to the unix socket in
/// <c>$NOTIFY_SOCKET</c>, with file descriptors attached (SCM_RIGHTS) for <c>FDSTORE=1</c>. systemd and
/// <c>stargz-snapshotter supervise</c> both listen there.
/// </summary>
public sealed unsafe class ServiceManagerNotifier : IDisposable
{
    private readonly int _sock;
    private readonly NotifyNative.SockAddrUn _addr;
    private readonly uint _addrLen;
    private readonly Lock _lock = new();
    private bool _disposed;

    /// <summary>The socket the messages go to.</summary>
    public string SocketPath { get; }

    public ServiceManagerNotifier(string socketPath)
    {
        SocketPath = socketPath;
        _addrLen = NotifyNative.Address(socketPath, out _addr);
        _sock = NotifyNative.Socket(NotifyNative.AF_UNIX, NotifyNative.SOCK_DGRAM | NotifyNative.SOCK_CLOEXEC, 0);
        if (_sock < 0) throw new IOException($"notify socket: errno {NotifyNative.LastErrno}");
    }

    /// <summary>A notifier for <c>$NOTIFY_SOCKET</c>, or null when no service manager listens.</summary>
    public static ServiceManagerNotifier? FromEnvironment()
    {
        var path = Environment.GetEnvironmentVariable("NOTIFY_SOCKET");
        if (string.IsNullOrEmpty(path) || (path[0] != '/' && path[0] != '@')) return null;
        return new ServiceManagerNotifier(path);
    }

    /// <summary>
    /// Sends <paramref name="state"/> (newline-separated assignments) with <paramref name="fds"/> attached. Throws
    /// <see cref="IOException"/> with the errno when the manager cannot be reached.
    /// </summary>
    public void Send(string state, ReadOnlySpan<int> fds = default)
    {
        var text = Encoding.UTF8.GetBytes(state);
        int controlLen = fds.Length == 0 ? 0 : NotifyNative.CmsgSpace(fds.Length * sizeof(int));
        byte* control = stackalloc byte[Math.Max(controlLen, 1)];
        new Span<byte>(control, Math.Max(controlLen, 1)).Clear();
        if (fds.Length > 0)
        {
            *(nuint*)control = (nuint)(NotifyNative.CmsgHeader + fds.Length * sizeof(int));
            *(int*)(control + 8) = NotifyNative.SOL_SOCKET;
            *(int*)(control + 12) = NotifyNative.SCM_RIGHTS;
            for (int i = 0; i < fds.Length; i++) ((int*)(control + NotifyNative.CmsgHeader))[i] = fds[i];
        }
        fixed (byte* t = text)
        {
            var iov = new Native.IoVec { Base = t, Len = (nuint)text.Length };
            var addr = _addr;
            var msg = new Native.MsgHdr
            {
                Name = &addr, NameLen = _addrLen, Iov = &iov, IovLen = 1,
                Control = fds.Length > 0 ? control : null, ControlLen = (nuint)controlLen,
            };
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                nint n;
                do n = NotifyNative.SendMsg(_sock, &msg, NotifyNative.MSG_NOSIGNAL);
                while (n < 0 && NotifyNative.LastErrno == Native.EINTR);
                if (n < 0) throw new IOException($"notify {SocketPath}: errno {NotifyNative.LastErrno}");
            }
        }
    }

    /// <summary>Stores <paramref name="fds"/> in the manager's fd store under <paramref name="name"/>.</summary>
    public void StoreFds(string name, ReadOnlySpan<int> fds) => Send($"FDSTORE=1\nFDNAME={CheckName(name)}", fds);

    /// <summary>Drops every fd stored under <paramref name="name"/>.</summary>
    public void RemoveFds(string name) => Send($"FDSTOREREMOVE=1\nFDNAME={CheckName(name)}");

    /// <summary>Names as sd_pid_notify_with_fds accepts them: 1-255 printable ASCII characters, no ':'.</summary>
    public static bool IsValidName(string name)
    {
        if (name.Length is 0 or > 255) return false;
        foreach (var c in name)
            if (c is < (char)0x21 or > (char)0x7e or ':') return false;
        return true;
    }

    private static string CheckName(string name) =>
        IsValidName(name) ? name : throw new ArgumentException($"'{name}' is not a valid fd store name");

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            NotifyNative.Close(_sock);
        }
    }
}

/// <summary>
/// The fds a service manager passed at start (sd_listen_fds(3)): <c>LISTEN_FDS</c> descriptors from fd 3, named by
/// <c>LISTEN_FDNAMES</c>, meant for this process when <c>LISTEN_PID</c> is ours.
/// </summary>
public static class ListenFds
{
    public const int First = 3;

    /// <summary>
    /// Takes the passed fds (once: the variables are cleared so children do not see them), marks them close-on-exec
    /// and returns them with their names. Empty when none were passed to this process.
    /// </summary>
    public static IReadOnlyList<(string Name, int Fd)> Take() =>
        Take(Environment.GetEnvironmentVariable, NotifyNative.GetPid(), clear: true);

    internal static IReadOnlyList<(string Name, int Fd)> Take(Func<string, string?> env, int pid, bool clear)
    {
        var count = env("LISTEN_FDS");
        var forPid = env("LISTEN_PID");
        var names = env("LISTEN_FDNAMES");
        if (clear)
            foreach (var v in new[] { "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES" }) Environment.SetEnvironmentVariable(v, null);
        if (count == null || !int.TryParse(count, out int n) || n <= 0 || n > 65536) return [];
        // Inherited from a parent that meant them for someone else: not ours to use.
        if (forPid == null || !int.TryParse(forPid, out int p) || p != pid) return [];
        var split = names?.Split(':') ?? [];
        var list = new List<(string, int)>(n);
        for (int i = 0; i < n; i++)
        {
            int fd = First + i;
            if (clear)
            {
                int flags = NotifyNative.Fcntl(fd, NotifyNative.F_GETFD, 0);
                if (flags < 0) continue; // not open after all
                NotifyNative.Fcntl(fd, NotifyNative.F_SETFD, flags | NotifyNative.FD_CLOEXEC);
            }
            list.Add((i < split.Length && split[i].Length > 0 ? split[i] : "unknown", fd));
        }
        return list;
    }
}
