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
    public static async Task<LocalDaemon> StartAsync(string? configToml = null, IDictionary<string, string>? env = null,
        string[]? extraArgs = null, bool waitReady = true, string logLevel = "debug")
    {
        // Socket paths must stay short (108 bytes), so the dir lives directly under /tmp.
        var d = new LocalDaemon(new TempDir("sgd"), ownsDir: true) { _logLevel = logLevel };
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
        if (exe is null) psi.ArgumentList.Add(DllPath());
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
            try
            {
                if (!_process.HasExited)
                {
                    kill(_process.Id, 15);
                    using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
                    try { await _process.WaitForExitAsync(cts.Token); }
                    catch (OperationCanceledException) { _process.Kill(); await _process.WaitForExitAsync(); }
                }
            }
            catch (InvalidOperationException) { }
            _process.Dispose();
        }
        Mounts.UnmountAllUnder(_dir.Path);
        if (_ownsDir) _dir.Dispose();
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);
}
