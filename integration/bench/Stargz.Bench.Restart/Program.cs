// Stargz.Bench.Restart: how long a running container's reads stall when the daemon is SIGKILLed and comes back.
// One container reads its lazily pulled files through its rootfs (overlayfs over our FUSE layers) in 256 KiB preads,
// dropping each range from the page cache after reading it (posix_fadvise DONTNEED), so every read reaches the daemon.
// Each run: 1 s of steady reads, SIGKILL the daemon (supervise starts it again), reads go on for 3 s after the new
// daemon listens. Reported per run: the longest single read, and how long after the new daemon was listening it
// completed. The reference's daemon, when given, is killed and restarted the same way (it has no fd store).
//   dotnet run -c Release --project integration/bench/Stargz.Bench.Restart -- [--runs 5] [--out FILE]
//       [--reference-daemon /tmp/stargz-reference/containerd-stargz-grpc-reference]
using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using Stargz.TestSupport;

int runs = 5;
string? outFile = null, referenceDaemon = null;
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--runs": runs = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--out": outFile = args[++i]; break;
        case "--reference-daemon": referenceDaemon = args[++i]; break;
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}
Requires.Root();
Requires.Fuse();
const int Files = 16, FileMiB = 4, ReadSize = 256 << 10;
using var work = new TempDir("bench-restart");
await using var registry = await LocalRegistry.StartAsync();
var l1 = work.Sub("l1");
var l2 = work.Sub("l2");
TestImages.WriteBusybox(l1);
Directory.CreateDirectory(Path.Combine(l2, "data"));
var rng = new Random(4242);
for (int f = 0; f < Files; f++)
{
    var bytes = new byte[FileMiB << 20];
    rng.NextBytes(bytes);
    await File.WriteAllBytesAsync(Path.Combine(l2, "data", $"f{f:00}.bin"), bytes);
}
await TestImages.BuildAsync(Path.Combine(work.Path, "oci"), "v1", [l1, l2]);
await TestImages.PushAsync(Path.Combine(work.Path, "oci"), "v1", registry.Host, "bench/restart:v1");
var image = $"{registry.Host}/bench/restart:esgz";
await using (var prep = await LocalContainerd.StartAsync())
{
    await prep.ConvertWithReferenceAsync($"{registry.Host}/bench/restart:v1", image);
}
const string Config = """
    noprefetch = true
    no_background_fetch = true
    """;

var report = new StringBuilder();
report.AppendLine($"# Read stall across a daemon SIGKILL ({DateTime.UtcNow:yyyy-MM-dd}, {Environment.ProcessorCount} cores, {runs} runs)");
report.AppendLine();
report.AppendLine("A running container reads its lazily pulled files (256 KiB preads through its overlayfs rootfs, each range dropped");
report.AppendLine("from the page cache after it is read, so every read reaches the daemon) while the daemon is SIGKILLed.");
report.AppendLine();
report.AppendLine("| daemon | run | steady read (median) | kill → new daemon listening | longest read | its end − listening | read errors |");
report.AppendLine("|---|---|---|---|---|---|---|");

var ours = new List<RunResult>();
await using (var daemon = await LocalDaemon.StartAsync(Config, supervised: true, logLevel: "info"))
await using (var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket))
{
    var rootfs = await StartReaderContainerAsync(ctd, image);
    for (int r = 1; r <= runs; r++)
    {
        int served = daemon.ServingCount;
        var res = await MeasureAsync(rootfs, daemon.Socket, async () =>
        {
            int old = daemon.ChildPid;
            Native.Kill(old, 9);
            while (File.Exists($"/proc/{old}/stat") && !File.ReadAllText($"/proc/{old}/stat").Contains(") Z ", StringComparison.Ordinal))
                await Task.Delay(1);
        }, async () =>
        {
            while (daemon.ServingCount == served) await Task.Delay(10);
        });
        ours.Add(res);
        report.AppendLine(Row("this daemon (supervise)", r.ToString(CultureInfo.InvariantCulture), res));
        Console.WriteLine(Row("this daemon (supervise)", r.ToString(CultureInfo.InvariantCulture), res));
    }
    await ctd.CtrAsync("tasks", "kill", "-s", "SIGKILL", "reader");
}
if (ours.Count > 0)
{
    // Each column's own median.
    static double Median(IEnumerable<double> xs) { var l = xs.OrderBy(x => x).ToList(); return l[l.Count / 2]; }
    var med = new RunResult(Median(ours.Select(r => r.SteadyMs)), Median(ours.Select(r => r.KillToListeningMs)),
        Median(ours.Select(r => r.LongestMs)), Median(ours.Select(r => r.AfterListening)), ours.Sum(r => r.Errors), ours.All(r => r.Recovered));
    report.AppendLine(Row("this daemon (supervise)", "median", med));
}
if (referenceDaemon != null)
{
    await using var daemon = await LocalDaemon.StartExecutableAsync(referenceDaemon, Config, "info");
    await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
    var rootfs = await StartReaderContainerAsync(ctd, image);
    var res = await MeasureAsync(rootfs, daemon.Socket, daemon.KillAsync, () => daemon.RestartAsync());
    report.AppendLine(Row("reference (restarted)", "1", res));
    Console.WriteLine(Row("reference (restarted)", "1", res));
    await ctd.CtrAsync("tasks", "kill", "-s", "SIGKILL", "reader");
}
Console.WriteLine(report);
if (outFile != null) await File.WriteAllTextAsync(outFile, report.ToString());
return 0;

static string Row(string who, string run, RunResult r) =>
    $"| {who} | {run} | {r.SteadyMs:0.0} ms | {r.KillToListeningMs:0} ms | {r.LongestMs:0} ms | " +
    (r.Errors > 0 && !r.Recovered ? "never recovers (reads fail)" : $"{r.AfterListening:+0;-0} ms") + $" | {r.Errors} |";

static async Task<string> StartReaderContainerAsync(LocalContainerd ctd, string image)
{
    (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess("rpull");
    (await ctd.CtrAsync("run", "-d", "--snapshotter", "stargz", image, "reader", "/bin/sleep", "100000")).EnsureSuccess("ctr run reader");
    var rootfs = Path.Combine(ctd.StateDir, "io.containerd.runtime.v2.task", ctd.Namespace, "reader", "rootfs");
    if (!File.Exists(Path.Combine(rootfs, "data", "f00.bin"))) throw new InvalidOperationException($"no rootfs at {rootfs}");
    return rootfs;
}

/// <param name="kill">returns once the daemon process is gone (its socket refuses from then on).</param>
/// <param name="waitBack">returns once the new daemon serves.</param>
static async Task<RunResult> MeasureAsync(string rootfs, string socket, Func<Task> kill, Func<Task> waitBack)
{
    var reads = new List<(long End, double Ms, bool Ok)>();
    using var stop = new CancellationTokenSource();
    var reader = new Thread(() => ReadLoop(rootfs, reads, stop.Token)) { IsBackground = true, Name = "reader" };
    reader.Start();
    await Task.Delay(1000);
    // The new daemon is listening at the first accepted connect after the old one's socket has refused one (a
    // dying daemon may accept for a moment after the signal): probed every millisecond from before the kill.
    long killAt = 0, listeningAt = 0;
    var probe = new Thread(() =>
    {
        var ep = new UnixDomainSocketEndPoint(socket);
        bool down = false;
        while (!stop.IsCancellationRequested)
        {
            using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                s.Connect(ep);
                if (down) { Volatile.Write(ref listeningAt, Stopwatch.GetTimestamp()); return; }
            }
            catch (SocketException) { if (Volatile.Read(ref killAt) != 0) down = true; }
            Thread.Sleep(1);
        }
    }) { IsBackground = true };
    probe.Start();
    Volatile.Write(ref killAt, Stopwatch.GetTimestamp());
    await kill();
    await waitBack();
    probe.Join(TimeSpan.FromSeconds(60));
    await Task.Delay(3000);
    stop.Cancel();
    reader.Join(TimeSpan.FromSeconds(120));
    List<(long End, double Ms, bool Ok)> snapshot;
    lock (reads) snapshot = [.. reads];
    var steady = snapshot.Where(x => x.End < killAt && x.Ok).Select(x => x.Ms).OrderBy(x => x).ToList();
    var during = snapshot.Where(x => x.End >= killAt).ToList();
    var longest = during.Count == 0 ? default : during.MaxBy(x => x.Ms);
    long listen = Volatile.Read(ref listeningAt);
    // Negative: the longest read was answered before the new daemon listened (adoption comes first).
    double afterListening = listen == 0 || longest.End == 0 ? double.NaN : (longest.End - listen) * 1000.0 / Stopwatch.Frequency;
    int errors = during.Count(x => !x.Ok);
    bool recovered = during.Count > 0 && during[^1].Ok;
    return new RunResult(steady.Count == 0 ? double.NaN : steady[steady.Count / 2],
        listen == 0 ? double.NaN : Stopwatch.GetElapsedTime(killAt, listen).TotalMilliseconds, longest.Ms, afterListening, errors, recovered);
}

static void ReadLoop(string rootfs, List<(long End, double Ms, bool Ok)> reads, CancellationToken stop)
{
    var buf = new byte[ReadSize];
    while (!stop.IsCancellationRequested)
    {
        for (int f = 0; f < Files && !stop.IsCancellationRequested; f++)
        {
            var path = Path.Combine(rootfs, "data", $"f{f:00}.bin");
            for (long off = 0; off < (long)FileMiB << 20 && !stop.IsCancellationRequested; off += ReadSize)
            {
                long t0 = Stopwatch.GetTimestamp();
                bool ok = true;
                try
                {
                    using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read);
                    ok = RandomAccess.Read(h, buf, off) == ReadSize;
                    // Drop the range again: the next pass reads it through the daemon, not the page cache.
                    Native.Fadvise(h.DangerousGetHandle().ToInt32(), off, ReadSize, 4 /*POSIX_FADV_DONTNEED*/);
                }
                catch (IOException) { ok = false; }
                catch (UnauthorizedAccessException) { ok = false; }
                long t1 = Stopwatch.GetTimestamp();
                lock (reads) reads.Add((t1, Stopwatch.GetElapsedTime(t0, t1).TotalMilliseconds, ok));
                if (!ok) Thread.Sleep(10);
            }
        }
    }
}

internal sealed record RunResult(double SteadyMs, double KillToListeningMs, double LongestMs, double AfterListening, int Errors, bool Recovered);

internal static partial class Native
{
    [LibraryImport("libc", EntryPoint = "kill")]
    public static partial int Kill(int pid, int sig);

    [LibraryImport("libc", EntryPoint = "posix_fadvise")]
    public static partial int Fadvise(int fd, long offset, long len, int advice);
}
