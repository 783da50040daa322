using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using Stargz.TestSupport;

namespace Stargz.Bench.Pull;

/// <summary>
/// A snapshotter daemon (ours or the reference's: both take `--address --root --config --log-level`) started for one
/// measured run, timed from just before exec until its socket accepts a connection. Unlike TestSupport's LocalDaemon
/// (which waits for a log line, polling every 50 ms), readiness here is the socket alone, probed every millisecond
/// from a dedicated thread: first the connect (listening), then on that connection the server's HTTP/2 SETTINGS frame
/// in answer to a client preface (serving: a daemon that binds its socket before its host is built, as ours does, is
/// listening well before it serves). Dispose SIGTERMs it (then SIGKILL), unmounts what is left under its dir and removes it.
/// </summary>
public sealed class BenchDaemon : IAsyncDisposable
{
    private readonly StringBuilder _log = new();
    private readonly TempDir _dir = new("sgd"); // directly under /tmp: socket paths must stay under 108 bytes
    private Process? _process;

    public string Socket => Path.Combine(_dir.Path, "s.sock");
    public string Root => Path.Combine(_dir.Path, "root");
    public int Pid => _process?.Id ?? 0;
    /// <summary>From just before exec until the first successful connect to <see cref="Socket"/>.</summary>
    public TimeSpan ExecToListening { get; private set; }
    /// <summary>Stopwatch timestamp of the first successful connect.</summary>
    public long ListeningAt { get; private set; }
    /// <summary>From just before exec until the server's first HTTP/2 frame on the probe's connection.</summary>
    public TimeSpan ExecToServing { get; private set; }
    public string Log { get { lock (_log) return _log.ToString(); } }

    /// <param name="command">the executable, then any arguments before the daemon's own (e.g. dotnet DLL).</param>
    public static async Task<BenchDaemon> StartAsync(IReadOnlyList<string> command, string configToml, string logLevel,
        IDictionary<string, string>? env = null)
    {
        var d = new BenchDaemon();
        try
        {
            var config = Path.Combine(d._dir.Path, "config.toml");
            await File.WriteAllTextAsync(config, configToml);
            var psi = new ProcessStartInfo(command[0]) { UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true };
            for (var i = 1; i < command.Count; i++) psi.ArgumentList.Add(command[i]);
            foreach (var a in new[] { "--address", d.Socket, "--root", d.Root, "--config", config, "--log-level", logLevel }) psi.ArgumentList.Add(a);
            if (env != null) foreach (var kv in env) psi.Environment[kv.Key] = kv.Value;
            foreach (var v in new[] { "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES" }) psi.Environment.Remove(v); // no service manager of ours
            var started = Stopwatch.GetTimestamp();
            var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {command[0]}");
            d._process = p;
            p.OutputDataReceived += (_, e) => { if (e.Data != null) lock (d._log) d._log.AppendLine(e.Data); };
            p.ErrorDataReceived += (_, e) => { if (e.Data != null) lock (d._log) d._log.AppendLine(e.Data); };
            p.BeginOutputReadLine();
            p.BeginErrorReadLine();
            // A thread of its own, so the 1 ms probe cadence does not depend on the thread pool.
            var probe = new TaskCompletionSource<(long Listening, long Serving)>(TaskCreationOptions.RunContinuationsAsynchronously);
            var thread = new Thread(() => Probe(d.Socket, p, probe, TimeSpan.FromSeconds(60))) { IsBackground = true, Name = "listen-probe" };
            thread.Start();
            var (at, serving) = await probe.Task;
            d.ListeningAt = at;
            d.ExecToListening = Stopwatch.GetElapsedTime(started, at);
            d.ExecToServing = Stopwatch.GetElapsedTime(started, serving);
            return d;
        }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException)
        {
            var log = d.Log;
            await d.DisposeAsync();
            throw new InvalidOperationException($"{command[0]} did not start: {e.Message}\n{log}", e);
        }
    }

    // The client connection preface and an empty SETTINGS frame (RFC 9113 3.4, 6.5).
    private static readonly byte[] Http2Preface = [.. "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"u8, 0, 0, 0, 4, 0, 0, 0, 0, 0];

    private static void Probe(string socket, Process p, TaskCompletionSource<(long, long)> done, TimeSpan timeout)
    {
        var deadline = Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        var endpoint = new UnixDomainSocketEndPoint(socket);
        while (Stopwatch.GetTimestamp() < deadline)
        {
            using (var s = new System.Net.Sockets.Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
            {
                try
                {
                    s.Connect(endpoint);
                    var listening = Stopwatch.GetTimestamp();
                    s.ReceiveTimeout = (int)timeout.TotalMilliseconds;
                    s.Send(Http2Preface);
                    // Any frame header back (9 bytes) means the server reads and answers on the connection.
                    var header = new byte[9];
                    for (var got = 0; got < header.Length;)
                    {
                        var n = s.Receive(header, got, header.Length - got, SocketFlags.None);
                        if (n == 0) throw new InvalidOperationException("the daemon closed the probe's connection before answering");
                        got += n;
                    }
                    done.SetResult((listening, Stopwatch.GetTimestamp()));
                    return;
                }
                catch (SocketException) { }
                catch (InvalidOperationException e)
                {
                    done.SetException(e);
                    return;
                }
            }
            if (p.HasExited)
            {
                done.SetException(new InvalidOperationException($"exited with {p.ExitCode} before listening"));
                return;
            }
            Thread.Sleep(1);
        }
        done.SetException(new TimeoutException($"{socket} not accepting connections within {timeout}"));
    }

    public async ValueTask DisposeAsync()
    {
        if (_process != null)
        {
            await ProcessRunner.TerminateAsync(_process, TimeSpan.FromSeconds(20));
            _process.Dispose();
        }
        Mounts.UnmountAllUnder(_dir.Path);
        _dir.Dispose();
    }
}
