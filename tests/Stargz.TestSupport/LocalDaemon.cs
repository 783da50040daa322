using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;

namespace Stargz.TestSupport;

/// <summary>
/// Our daemon (`stargz-snapshotter`) as a child process: the native executable (<see cref="NativeExecutables"/>)
/// `--address SOCK --root ROOT --config CFG`, or on a developer's machine without it `dotnet DIR/stargz-snapshotter.dll`
/// next to the test assembly (reference src/Stargz.Daemon from the test project).
/// Restart with the same root/socket via <see cref="StartAsync(LocalDaemon)"/>. Dispose SIGTERMs it (then SIGKILL),
/// unmounts what is left under its root, and removes its dirs.
/// </summary>
public sealed class LocalDaemon : IAsyncDisposable
{
    private readonly StringBuilder _log = new();
    private Process? _process;
    private readonly TempDir _dir;
    private readonly bool _ownsDir;
    private string? _executable;
    private string _logLevel = "debug";
    private bool _underNohup;

    /// <summary>
    /// Runs as `stargz-snapshotter supervise FLAGS`: <see cref="Pid"/> is the supervisor, <see cref="ChildPid"/> the
    /// daemon it runs (restarted by it, keeping the FUSE connections in its fd store).
    /// </summary>
    public bool Supervised { get; private init; }

    public string Socket { get; }
    public string Root { get; }
    public string ConfigPath { get; }
    public int? ExitCode => _process is { HasExited: true } p ? p.ExitCode : null;
    public int Pid => _process?.Id ?? 0;

    private LocalDaemon(TempDir dir, bool ownsDir)
    {
        _dir = dir;
        _ownsDir = ownsDir;
        Socket = Path.Combine(dir.Path, "s.sock");
        Root = Path.Combine(dir.Path, "root");
        ConfigPath = Path.Combine(dir.Path, "config.toml");
    }

    public static string DllPath()
    {
        var p = Path.Combine(AppContext.BaseDirectory, "stargz-snapshotter.dll");
        if (!File.Exists(p)) throw new FileNotFoundException($"daemon not built next to the tests: {p} (reference src/Stargz.Daemon)");
        return p;
    }

    /// <summary>Starts a daemon in a new dir. <paramref name="configToml"/> is written to config.toml (empty file if null).</summary>
    /// <param name="underNohup">started through coreutils' <c>nohup</c>: SIGHUP ignored from the start (as any parent
    /// that ignores it passes it on).</param>
    public static async Task<LocalDaemon> StartAsync(string? configToml = null, IDictionary<string, string>? env = null,
        string[]? extraArgs = null, bool waitReady = true, string logLevel = "debug", bool supervised = false, bool underNohup = false)
    {
        // Socket paths must stay short (108 bytes), so the dir lives directly under /tmp.
        var d = new LocalDaemon(new TempDir("sgd"), ownsDir: true) { _logLevel = logLevel, Supervised = supervised, _underNohup = underNohup };
        await File.WriteAllTextAsync(d.ConfigPath, WithErofsDefault(configToml));
        await d.LaunchAsync(env, extraArgs, waitReady);
        return d;
    }

    /// <summary>
    /// Tests of the lazy FUSE layer keep it for their whole run: promotion to EROFS (on by default where the machine
    /// supports it) would swap a fully fetched layer's mount and drop its chunk files mid-test. A test of promotion
    /// says <c>[erofs]</c> itself. Appended: a new table at the end is valid after anything the test wrote.
    /// </summary>
    public static string WithErofsDefault(string? configToml) =>
        configToml != null && configToml.Contains("[erofs]", StringComparison.Ordinal) ? configToml
            : (configToml ?? "") + "\n[erofs]\npromote = false\n";

    /// <summary>Starts another snapshotter binary that takes the same flags (e.g. the reference's daemon built by
    /// integration/bench/reference-daemon/build.sh), in a new dir, ready once it logs that it serves.</summary>
    public static async Task<LocalDaemon> StartExecutableAsync(string executable, string? configToml = null, string logLevel = "debug")
    {
        var d = new LocalDaemon(new TempDir("sgd"), ownsDir: true) { _executable = executable, _logLevel = logLevel };
        await File.WriteAllTextAsync(d.ConfigPath, configToml ?? "");
        await d.LaunchAsync(null, null, waitReady: true);
        return d;
    }

    /// <summary>Starts the daemon again on the same socket, root and config (after <see cref="StopAsync"/> or <see cref="Kill"/>).</summary>
    public async Task RestartAsync(IDictionary<string, string>? env = null, string[]? extraArgs = null, bool waitReady = true)
    {
        if (_process is { HasExited: false }) throw new InvalidOperationException("daemon still running");
        _process?.Dispose();
        _process = null;
        await LaunchAsync(env, extraArgs, waitReady);
    }

    private async Task LaunchAsync(IDictionary<string, string>? env, string[]? extraArgs, bool waitReady)
    {
        var exe = _executable ?? NativeExecutables.Daemon(DllPath());
        var dotnet = Requires.Which("dotnet") ?? Path.Combine(Environment.GetEnvironmentVariable("DOTNET_ROOT") ?? "/usr/share/dotnet", "dotnet");
        var psi = new ProcessStartInfo(exe ?? dotnet) { UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true };
        if (_underNohup)
        {
            // nohup sets SIGHUP to ignored and execs the command: the same pid, SIGHUP ignored from its start.
            psi.FileName = Requires.Command("nohup");
            psi.ArgumentList.Add(exe ?? dotnet);
        }
        if (exe is null) psi.ArgumentList.Add(DllPath());
        if (Supervised) psi.ArgumentList.Add("supervise");
        // A test runner under a service manager (CI in a systemd unit) must not lend it to the daemon: the daemon
        // would keep its FUSE connections there and hand them over on SIGTERM instead of unmounting.
        foreach (var v in new[] { "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES" }) psi.Environment.Remove(v);
        foreach (var a in new[] { "--address", Socket, "--root", Root, "--config", ConfigPath, "--log-level", _logLevel }) psi.ArgumentList.Add(a);
        if (extraArgs != null) foreach (var a in extraArgs) psi.ArgumentList.Add(a);
        if (env != null) foreach (var kv in env) psi.Environment[kv.Key] = kv.Value;
        var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start the daemon");
        p.OutputDataReceived += (_, e) => { if (e.Data != null) lock (_log) _log.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data != null) lock (_log) _log.AppendLine(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        _process = p;
        if (waitReady) await WaitReadyAsync(TimeSpan.FromSeconds(60));
    }

    public async Task WaitReadyAsync(TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            if (_process!.HasExited) throw new InvalidOperationException($"daemon exited {_process.ExitCode}:\n{Log}");
            if (File.Exists(Socket) && Log.Contains("serving containerd snapshots API", StringComparison.Ordinal))
            {
                try
                {
                    using var s = new System.Net.Sockets.Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                    await s.ConnectAsync(new UnixDomainSocketEndPoint(Socket));
                    return;
                }
                catch (SocketException) { }
            }
            await Task.Delay(50);
        }
        throw new TimeoutException($"daemon not ready within {timeout}:\n{Log}");
    }

    public string Log { get { lock (_log) return _log.ToString(); } }

    /// <summary>How many times a daemon has logged that it serves (a supervised one logs it once per start).</summary>
    public int ServingCount
    {
        get
        {
            var log = Log;
            int n = 0;
            for (int i = log.IndexOf("serving containerd snapshots API", StringComparison.Ordinal); i >= 0;
                 i = log.IndexOf("serving containerd snapshots API", i + 1, StringComparison.Ordinal)) n++;
            return n;
        }
    }

    /// <summary>The supervised daemon's pid (the supervisor's child), or 0 while none runs.</summary>
    public int ChildPid
    {
        get
        {
            if (!Supervised || _process is not { HasExited: false } p) return 0;
            try
            {
                var children = File.ReadAllText($"/proc/{p.Id}/task/{p.Id}/children").Split(' ', StringSplitOptions.RemoveEmptyEntries);
                return children.Length > 0 ? int.Parse(children[0], System.Globalization.CultureInfo.InvariantCulture) : 0;
            }
            catch (IOException) { return 0; }
        }
    }

    /// <summary>Sends <paramref name="signal"/> to the supervisor (supervised) or the daemon.</summary>
    public void Signal(int signal)
    {
        var p = _process ?? throw new InvalidOperationException("not started");
        if (!p.HasExited) kill(p.Id, signal);
    }

    /// <summary>
    /// Supervised: sends <paramref name="signal"/> to the daemon (or, <paramref name="toSupervisor"/>, to the
    /// supervisor) and waits until a new daemon process serves; returns its pid.
    /// </summary>
    public async Task<int> SignalAndWaitRestartAsync(int signal, bool toSupervisor = false, TimeSpan? timeout = null)
    {
        if (!Supervised) throw new InvalidOperationException("not supervised");
        int old = ChildPid;
        int served = ServingCount;
        if (old == 0) throw new InvalidOperationException($"no supervised daemon runs:\n{Log}");
        kill(toSupervisor ? _process!.Id : old, signal);
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(60));
        while (DateTime.UtcNow < deadline)
        {
            if (_process!.HasExited) throw new InvalidOperationException($"supervisor exited {_process.ExitCode}:\n{Log}");
            int now = ChildPid;
            if (now != 0 && now != old && ServingCount > served) return now;
            await Task.Delay(20);
        }
        throw new TimeoutException($"no new daemon served within the timeout after signal {signal}:\n{Log}");
    }

    /// <summary>SIGTERM and wait for exit; returns the exit code.</summary>
    public async Task<int> StopAsync(TimeSpan? timeout = null)
    {
        var p = _process ?? throw new InvalidOperationException("not started");
        if (!p.HasExited) kill(p.Id, 15);
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(40));
        await p.WaitForExitAsync(cts.Token);
        return p.ExitCode;
    }

    /// <summary>SIGKILL: no shutdown code runs.</summary>
    public async Task KillAsync()
    {
        var p = _process ?? throw new InvalidOperationException("not started");
        if (!p.HasExited) kill(p.Id, 9);
        await p.WaitForExitAsync();
    }

    /// <summary>Waits for the process to exit on its own (e.g. a fault-injection crash); returns the exit code.</summary>
    public async Task<int> WaitExitAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        await _process!.WaitForExitAsync(cts.Token);
        return _process.ExitCode;
    }

    public async ValueTask DisposeAsync()
    {
        if (_process != null)
        {
            await ProcessRunner.TerminateAsync(_process, TimeSpan.FromSeconds(20));
            _process.Dispose();
        }
        Mounts.UnmountAllUnder(_dir.Path);
        if (_ownsDir) _dir.Dispose();
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);
}
