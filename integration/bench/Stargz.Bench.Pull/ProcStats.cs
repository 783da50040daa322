using System.Globalization;

namespace Stargz.Bench.Pull;

/// <summary>What /proc says about a daemon process: CPU time, memory, open file descriptors.</summary>
public static class ProcStats
{
    /// <summary>User + system time of the process and of its children it has waited for (fields 14–17 of
    /// /proc/PID/stat, after the parenthesised command name), in seconds (clock ticks of 1/100 s).</summary>
    public static double CpuSeconds(int pid)
    {
        var stat = File.ReadAllText($"/proc/{pid}/stat");
        var f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        long sum = 0;
        for (var i = 11; i <= 14; i++) sum += long.Parse(f[i], CultureInfo.InvariantCulture);
        return sum / 100.0;
    }

    /// <summary>A /proc/PID/status size field (VmRSS: resident now; VmHWM: peak resident) in MiB.</summary>
    public static double StatusMiB(int pid, string field)
    {
        foreach (var line in File.ReadLines($"/proc/{pid}/status"))
            if (line.StartsWith(field, StringComparison.Ordinal) && line.Length > field.Length && line[field.Length] == ':')
                return long.Parse(line.AsSpan(field.Length + 1).Trim().TrimEnd("kB").Trim(), CultureInfo.InvariantCulture) / 1024.0;
        return double.NaN;
    }

    public static int FdCount(int pid) => Directory.GetFileSystemEntries($"/proc/{pid}/fd").Length;

    /// <summary>The process's open fds by kind ("tcp, to the registry", "unix socket", "/dev/fuse", "file under the
    /// daemon root: stargz/…", "anon_inode:[eventpoll]", ...), most frequent first, as "N kind" items.</summary>
    public static string FdBreakdown(int pid, string daemonRoot, int registryPort)
    {
        var tcp = SocketInodes(pid, registryPort);
        var unix = UnixInodes(pid);
        var counts = new Dictionary<string, int>();
        foreach (var fd in Directory.GetFileSystemEntries($"/proc/{pid}/fd"))
        {
            string target;
            try { target = new FileInfo(fd).LinkTarget ?? "?"; }
            catch (IOException) { continue; } // closed meanwhile
            string kind;
            if (target.StartsWith("socket:[", StringComparison.Ordinal))
            {
                var inode = target[8..^1];
                kind = tcp.TryGetValue(inode, out var t) ? t : unix.TryGetValue(inode, out var u) ? u : "socket (other)";
            }
            else if (target.StartsWith("pipe:", StringComparison.Ordinal)) kind = "pipe";
            else if (target.StartsWith("anon_inode:", StringComparison.Ordinal)) kind = target;
            else if (target.StartsWith(daemonRoot + "/", StringComparison.Ordinal))
            {
                // Group files under the root by their first two directories (e.g. stargz/httpcache/…).
                var rel = target[(daemonRoot.Length + 1)..].Split('/');
                kind = rel.Length == 1 ? $"file under the daemon root: {rel[0]}"
                    : $"file under the daemon root: {string.Join('/', rel.Take(Math.Min(2, rel.Length - 1)))}/…";
            }
            else if (target.StartsWith("/dev/", StringComparison.Ordinal)) kind = target;
            else kind = $"file {target}";
            counts[kind] = counts.GetValueOrDefault(kind) + 1;
        }
        return string.Join(", ", counts.OrderByDescending(kv => kv.Value).ThenBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Value} {kv.Key}"));
    }

    // inode -> kind for the TCP sockets in the process's network namespace (/proc/PID/net/tcp{,6}: local, remote
    // address:port in hex, state 0A = listening, inode in column 10).
    private static Dictionary<string, string> SocketInodes(int pid, int registryPort)
    {
        var map = new Dictionary<string, string>();
        foreach (var file in new[] { "tcp", "tcp6" })
        {
            var path = $"/proc/{pid}/net/{file}";
            if (!File.Exists(path)) continue;
            foreach (var line in File.ReadLines(path).Skip(1))
            {
                var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (f.Length < 10) continue;
                var remotePort = int.Parse(f[2].AsSpan(f[2].IndexOf(':') + 1), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                map[f[9]] = f[3] == "0A" ? "tcp, listening" : remotePort == registryPort ? "tcp, to the registry" : "tcp, other";
            }
        }
        return map;
    }

    private static Dictionary<string, string> UnixInodes(int pid)
    {
        var map = new Dictionary<string, string>();
        var path = $"/proc/{pid}/net/unix";
        if (!File.Exists(path)) return map;
        foreach (var line in File.ReadLines(path).Skip(1))
        {
            var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (f.Length < 7) continue;
            // Flags 00010000 = __SO_ACCEPTCON: the listening socket.
            map[f[6]] = f[3] == "00010000" ? "unix socket, listening" : f.Length > 7 ? "unix socket, connected (to the listener's path)" : "unix socket, unnamed";
        }
        return map;
    }
}

/// <summary>
/// Samples a process's RSS (/proc/PID/status) and keeps the split of the largest sample: VmHWM says how high the
/// RSS went, not what it was made of (the executable's mapped pages, anonymous memory: GC heap, buffers, stacks).
/// </summary>
public sealed class RssSampler : IAsyncDisposable
{
    private readonly int _pid;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;
    private readonly Lock _gate = new();
    private (double Rss, double Anon, double File) _largest = (0, double.NaN, double.NaN);
    private int _disposed;

    public RssSampler(int pid, TimeSpan interval)
    {
        _pid = pid;
        _loop = Task.Run(() => LoopAsync(interval));
    }

    /// <summary>The largest sample so far: RSS, of which anonymous and file-backed, in MiB.</summary>
    public (double Rss, double Anon, double File) Largest { get { lock (_gate) return _largest; } }

    private async Task LoopAsync(TimeSpan interval)
    {
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                var rss = ProcStats.StatusMiB(_pid, "VmRSS");
                var anon = ProcStats.StatusMiB(_pid, "RssAnon");
                var file = ProcStats.StatusMiB(_pid, "RssFile");
                lock (_gate) if (rss > _largest.Rss) _largest = (rss, anon, file);
            }
            catch (IOException) { return; } // the process is gone
            try { await Task.Delay(interval, _stop.Token); } catch (OperationCanceledException) { }
        }
    }

    /// <summary>Stops sampling (again: nothing).</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        await _stop.CancelAsync();
        await _loop;
        _stop.Dispose();
    }
}
