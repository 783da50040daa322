using System.Runtime.InteropServices;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using Stargz.Fuse.Handover;

namespace Stargz.Daemon.Supervise;

/// <summary>
/// <c>stargz-snapshotter supervise [daemon flags]</c>: the fd store where no systemd keeps one. A small parent that
/// runs the daemon as its child, is the child's <c>$NOTIFY_SOCKET</c> (FDSTORE / FDSTOREREMOVE, as systemd), hands the
/// stored fds back as <c>LISTEN_FDS</c> when it starts the child again, and restarts it whenever it exits. SIGHUP:
/// the child is asked to hand over (SIGTERM) and the binary now on disk is started in its place (upgrade).
/// SIGTERM/SIGINT: the child stops for good (SIGINT: it unmounts), then the parent exits. The parent does no FUSE
/// or gRPC work: one loop waiting on the notify socket, the child and three signals.
/// </summary>
internal sealed unsafe class Supervisor
{
    public const string Usage = """
        usage: stargz-snapshotter supervise [daemon flags]
          Runs the daemon (with the same flags) as a child and restarts it when it exits, keeping its FUSE connections
          in an fd store meanwhile, so running containers keep their lazily pulled layers over a crash, restart or
          upgrade. SIGHUP: start the binary now on disk in the child's place (upgrade); SIGTERM/SIGINT: stop both
          (the daemon unmounts its layers).
        """;

    /// <summary>More than any node mounts (a few fds per mounted layer); fds beyond are refused (closed), as systemd's FileDescriptorStoreMax.</summary>
    private const int MaxStoredFds = 16384;
    private static readonly TimeSpan StopWait = TimeSpan.FromSeconds(60);
    private static readonly TimeSpan MaxBackoff = TimeSpan.FromSeconds(10);

    private readonly NotifyListener _listener;
    private readonly string[] _command;
    private readonly List<(string Name, int Fd)> _stored = [];
    private readonly HashSet<int> _children = [];
    private int _child;
    private DateTime _childStarted;
    private bool _everReady;
    private TimeSpan _backoff = TimeSpan.FromMilliseconds(100);
    private volatile int _requested; // 0 none, SIGHUP, SIGTERM or SIGINT

    private Supervisor(NotifyListener listener, string[] command)
    {
        _listener = listener;
        _command = command;
    }

    public static int Run(string[] daemonArgs)
    {
        foreach (var a in daemonArgs)
            if (a is "-h" or "--help" or "-help")
            {
                Console.WriteLine(Usage);
                return 0;
            }
        // A bad flag would only make the child fail over and over: refuse it here, once.
        try { DaemonOptions.Parse(daemonArgs); }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"stargz-snapshotter supervise: {e.Message}\n{DaemonOptions.Usage}");
            return 2;
        }
        using var listener = new NotifyListener(NotifyListener.NewAbstractName("stargz-supervise"));
        var s = new Supervisor(listener, ChildCommand(daemonArgs));
        void OnSignal(PosixSignalContext c)
        {
            c.Cancel = true;
            int sig = c.Signal switch { PosixSignal.SIGHUP => ProcessNative.SIGHUP, PosixSignal.SIGINT => ProcessNative.SIGINT, _ => ProcessNative.SIGTERM };
            // A stop is never downgraded to an upgrade.
            if (sig == ProcessNative.SIGHUP) Interlocked.CompareExchange(ref s._requested, sig, 0);
            else s._requested = sig;
        }
        // SIGHUP is this process's upgrade command. Started under nohup (or by any parent that ignores it) it arrives
        // ignored, and the runtime leaves an ignored signal ignored: the upgrade would never come. So it takes the
        // default action back first, and the registration below then catches it.
        ProcessNative.Signal(ProcessNative.SIGHUP, ProcessNative.SIG_DFL);
        using var hup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, OnSignal);
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        return s.Loop();
    }

    /// <summary>The native executable itself, or (a development build) dotnet with the daemon's dll.</summary>
    private static string[] ChildCommand(string[] daemonArgs)
    {
        var exe = Environment.ProcessPath ?? throw new InvalidOperationException("cannot tell this executable's path");
        var prefix = Path.GetFileNameWithoutExtension(exe) == "dotnet"
            ? new[] { exe, Path.Combine(AppContext.BaseDirectory, typeof(Supervisor).Assembly.GetName().Name + ".dll") }
            : new[] { exe };
        return [.. prefix, .. daemonArgs];
    }

    private int Loop()
    {
        Log("Information", $"supervising {string.Join(' ', _command)}; fd store at {_listener.Path}");
        if (!Spawn()) return 1;
        bool upgrading = false;
        DateTime? stopDeadline = null;
        while (true)
        {
            if (_listener.Receive(200) is { } m) { Handle(m); continue; }
            int req = Interlocked.Exchange(ref _requested, 0);
            if (req is ProcessNative.SIGTERM or ProcessNative.SIGINT && stopDeadline == null)
            {
                Log("Information", $"stopping: the daemon (pid {_child}) stops for good and unmounts its layers");
                stopDeadline = DateTime.UtcNow + StopWait;
                if (_child > 0) ProcessNative.Kill(_child, ProcessNative.SIGINT);
            }
            else if (req == ProcessNative.SIGHUP && stopDeadline == null && !upgrading && _child > 0)
            {
                Log("Information", $"upgrade: the daemon (pid {_child}) hands its mounts over; {_command[0]} starts in its place");
                upgrading = true;
                ProcessNative.Kill(_child, ProcessNative.SIGTERM);
            }
            if (stopDeadline is { } d && DateTime.UtcNow > d && _child > 0)
            {
                Log("Warning", $"the daemon (pid {_child}) did not stop within {StopWait.TotalSeconds} s; killing it");
                ProcessNative.Kill(_child, ProcessNative.SIGKILL);
                stopDeadline = DateTime.UtcNow + StopWait;
            }
            if (_child <= 0) continue;
            int status;
            int r = ProcessNative.WaitPid(_child, &status, ProcessNative.WNOHANG);
            if (r == 0) continue;
            // Gone: first take every message it sent before dying, so the next child gets every fd.
            while (_listener.Receive(0) is { } late) Handle(late);
            var how = r < 0 ? $"lost (waitpid errno {ProcessNative.LastErrno})"
                : ProcessNative.Exited(status) ? $"exited with {ProcessNative.ExitCode(status)}"
                : $"killed by signal {ProcessNative.TermSignal(status)}";
            int code = r > 0 && ProcessNative.Exited(status) ? ProcessNative.ExitCode(status) : 1;
            var lived = DateTime.UtcNow - _childStarted;
            _child = 0;
            if (stopDeadline != null)
            {
                Log("Information", $"daemon {how}; closing {_stored.Count} stored fds and exiting");
                CloseAll();
                return 0;
            }
            if (!_everReady && code != 0)
            {
                // It never got as far as serving: a config or root problem that restarting will not fix.
                Log("Error", $"daemon {how} before it was ready; not restarting it");
                CloseAll();
                return code == 0 ? 1 : code;
            }
            if (upgrading)
            {
                upgrading = false;
                Log("Information", $"daemon {how}; starting the upgraded binary with {_stored.Count} stored fds");
            }
            else
            {
                _backoff = lived > TimeSpan.FromSeconds(30) ? TimeSpan.FromMilliseconds(100) : _backoff;
                Log("Warning", $"daemon {how} after {lived.TotalSeconds:0.0} s; restarting it in {_backoff.TotalMilliseconds:0} ms with {_stored.Count} stored fds");
                var until = DateTime.UtcNow + _backoff;
                while (DateTime.UtcNow < until && _requested is 0 or ProcessNative.SIGHUP)
                    if (_listener.Receive(50) is { } m2) Handle(m2);
                _backoff = TimeSpan.FromTicks(Math.Min(MaxBackoff.Ticks, _backoff.Ticks * 2));
                if (_requested is ProcessNative.SIGTERM or ProcessNative.SIGINT)
                {
                    Log("Information", $"stopping; closing {_stored.Count} stored fds");
                    CloseAll();
                    return 0;
                }
            }
            if (!Spawn())
            {
                CloseAll();
                return 1;
            }
        }
    }

    private void Handle(NotifyMessage m)
    {
        if (!_children.Contains(m.SenderPid))
        {
            // Only our children may store fds (an abstract socket can be reached by anything in the network namespace).
            foreach (var fd in m.Fds) ProcessNative.Close(fd);
            Log("Warning", $"ignored a notify message from pid {m.SenderPid} (not the daemon)");
            return;
        }
        var name = m.Value("FDNAME");
        if (m.Value("FDSTOREREMOVE") == "1" && name != null)
        {
            int removed = 0;
            for (int i = _stored.Count - 1; i >= 0; i--)
                if (_stored[i].Name == name)
                {
                    ProcessNative.Close(_stored[i].Fd);
                    _stored.RemoveAt(i);
                    removed++;
                }
            Log("Debug", $"fd store: removed {removed} fds of {name}");
        }
        if (m.Value("FDSTORE") == "1")
        {
            if (name == null || !ServiceManagerNotifier.IsValidName(name) || _stored.Count + m.Fds.Length > MaxStoredFds)
            {
                foreach (var fd in m.Fds) ProcessNative.Close(fd);
                Log("Warning", $"fd store: refused {m.Fds.Length} fds named \"{name}\" (bad name or more than {MaxStoredFds} fds)");
            }
            else
            {
                foreach (var fd in m.Fds) _stored.Add((name, fd));
                Log("Debug", $"fd store: kept {m.Fds.Length} fds of {name} ({_stored.Count} in all)");
            }
        }
        else foreach (var fd in m.Fds) ProcessNative.Close(fd); // fds not meant for the store are not kept
        if (m.Value("READY") == "1")
        {
            _everReady = true;
            Log("Information", $"daemon (pid {_child}) is ready");
        }
    }

    private bool Spawn()
    {
        int n = _stored.Count;
        var high = new int[n];
        // Copies above 3..3+n first, so the child's dup2s never overwrite one another.
        for (int i = 0; i < n; i++) high[i] = ProcessNative.Fcntl(_stored[i].Fd, ProcessNative.F_DUPFD_CLOEXEC, 3 + n);
        var env = new List<string>();
        foreach (System.Collections.DictionaryEntry e in Environment.GetEnvironmentVariables())
        {
            var k = (string)e.Key;
            if (k is "NOTIFY_SOCKET" or "LISTEN_FDS" or "LISTEN_PID" or "LISTEN_FDNAMES") continue;
            env.Add($"{k}={e.Value}");
        }
        env.Add($"NOTIFY_SOCKET={_listener.Path}");
        if (n > 0)
        {
            env.Add($"LISTEN_FDS={n}");
            var names = new StringBuilder();
            for (int i = 0; i < n; i++) names.Append(i == 0 ? "" : ":").Append(_stored[i].Name);
            env.Add($"LISTEN_FDNAMES={names}");
        }
        // LISTEN_PID must be the child's own pid: a shell learns it ($$) and execs the daemon in place.
        string[] argv = ["/bin/sh", "-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\"", .. _command];
        var mem = new List<nint>();
        byte* fa = stackalloc byte[ProcessNative.FileActionsSize];
        byte* attr = stackalloc byte[ProcessNative.AttrSize];
        byte* mask = stackalloc byte[ProcessNative.SigSetSize];
        byte* dflt = stackalloc byte[ProcessNative.SigSetSize];
        try
        {
            byte** av = Strings(argv, mem);
            byte** ev = Strings([.. env], mem);
            ProcessNative.FileActionsInit(fa);
            for (int i = 0; i < n; i++) ProcessNative.FileActionsAddDup2(fa, high[i], 3 + i);
            ProcessNative.AttrInit(attr);
            ProcessNative.SigEmptySet(mask);
            ProcessNative.SigEmptySet(dflt);
            foreach (var sig in new[] { ProcessNative.SIGHUP, ProcessNative.SIGINT, ProcessNative.SIGQUIT, ProcessNative.SIGTERM,
                         ProcessNative.SIGPIPE, ProcessNative.SIGCHLD, ProcessNative.SIGUSR1, ProcessNative.SIGUSR2 })
                ProcessNative.SigAddSet(dflt, sig);
            ProcessNative.AttrSetSigMask(attr, mask);
            ProcessNative.AttrSetSigDefault(attr, dflt);
            // Its own process group: a terminal's ^C reaches the supervisor, which stops the child in order.
            ProcessNative.AttrSetPGroup(attr, 0);
            ProcessNative.AttrSetFlags(attr, (short)(ProcessNative.POSIX_SPAWN_SETSIGMASK | ProcessNative.POSIX_SPAWN_SETSIGDEF | ProcessNative.POSIX_SPAWN_SETPGROUP));
            int pid;
            int rc = ProcessNative.PosixSpawn(&pid, av[0], fa, attr, av, ev);
            ProcessNative.FileActionsDestroy(fa);
            ProcessNative.AttrDestroy(attr);
            if (rc != 0)
            {
                Log("Error", $"cannot start {_command[0]}: errno {rc}");
                return false;
            }
            _child = pid;
            _children.Add(pid);
            _childStarted = DateTime.UtcNow;
            Log("Information", $"started the daemon, pid {pid}, with {n} stored fds");
            return true;
        }
        finally
        {
            foreach (var h in high) if (h >= 0) ProcessNative.Close(h);
            foreach (var p in mem) Marshal.FreeCoTaskMem(p);
        }
    }

    private static byte** Strings(string[] values, List<nint> mem)
    {
        var arr = (byte**)Marshal.AllocCoTaskMem((values.Length + 1) * sizeof(nint));
        mem.Add((nint)arr);
        for (int i = 0; i < values.Length; i++)
        {
            var p = Marshal.StringToCoTaskMemUTF8(values[i]);
            mem.Add(p);
            arr[i] = (byte*)p;
        }
        arr[values.Length] = null;
        return arr;
    }

    private void CloseAll()
    {
        foreach (var (_, fd) in _stored) ProcessNative.Close(fd);
        _stored.Clear();
    }

    /// <summary>One JSON line on stderr, shaped as the daemon's own log lines.</summary>
    private static void Log(string level, string message)
    {
        if (level == "Debug" && Environment.GetEnvironmentVariable("STARGZ_SUPERVISE_DEBUG") != "1") return;
        var line = $"{{\"Timestamp\":\"{DateTime.UtcNow:yyyy-MM-ddTHH:mm:ss.fffZ}\",\"LogLevel\":\"{level}\",\"Category\":\"stargz.supervise\",\"Message\":\"{JavaScriptEncoder.Default.Encode(message)}\"}}";
        Console.Error.WriteLine(line);
    }
}
