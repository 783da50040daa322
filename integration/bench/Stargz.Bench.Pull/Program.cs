using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using Stargz.Bench.Pull;
using Stargz.TestSupport;

// Lazy pull (ctr-remote rpull through a stargz snapshotter: ours, and with --reference-daemon the reference's) vs a full
// pull (ctr pull, containerd's overlayfs) vs the floor (the image already unpacked on overlayfs, page cache dropped,
// run only), each variant run once per round, rounds repeated N times in one process so all see the same machine
// load. Every registry byte goes through a counting forwarder, which with --wan emulates a WAN path. Per daemon it
// also measures exec to a listening socket, idle RSS, fds, peak RSS, CPU; with the large image, also after the
// background fetch has brought in everything. The method is written up at the top of integration/bench/pull-results.md.
var opt = new Options();
for (var i = 0; i < args.Length; i++)
{
    string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
    int NextInt() => int.Parse(Next(), CultureInfo.InvariantCulture);
    switch (args[i])
    {
        case "--image": opt.Image = Next(); break;
        case "--runs": opt.Runs = NextInt(); break;
        case "--data-mb": opt.DataMb = NextInt(); break;
        case "--bulk-layers": opt.BulkLayers = NextInt(); break;
        case "--bulk-mb": opt.BulkMb = NextInt(); break;
        case "--reference-daemon": opt.ReferenceDaemon = Path.GetFullPath(Next()); break;
        // This daemon from a publish (the native AOT build, say) instead of what NativeExecutables finds.
        case "--daemon": opt.OurDaemon = Path.GetFullPath(Next()); break;
        case "--wan": opt.DelayMs = 10; opt.Mbit = 200; break;
        case "--delay-ms": opt.DelayMs = double.Parse(Next(), CultureInfo.InvariantCulture); break;
        case "--mbit": opt.Mbit = double.Parse(Next(), CultureInfo.InvariantCulture); break;
        case "--warm": opt.Warm = true; break;
        case "--wait-fetch": opt.WaitFetch = true; break;
        case "--no-wait-fetch": opt.WaitFetch = false; break;
        case "--fetch-quiet-s": opt.FetchQuietS = NextInt(); break;
        case "--fetch-timeout-s": opt.FetchTimeoutS = NextInt(); break;
        case "--promote-timeout-s": opt.PromoteTimeoutS = NextInt(); break;
        case "--idle-s": opt.IdleS = double.Parse(Next(), CultureInfo.InvariantCulture); break;
        case "--out": opt.OutFile = Next(); break;
        // Keeps each daemon's log (at --log-level) in DIR, to see where a pull spends its time.
        case "--logs": opt.LogDir = Directory.CreateDirectory(Next()).FullName; break;
        case "--log-level": opt.LogLevel = Next(); break;
        // perf record -g of each lazy variant's daemon from pull start to container exit, into DIR.
        case "--profile": opt.ProfileDir = Directory.CreateDirectory(Next()).FullName; break;
        // Each registry request of the measured pulls and runs, with time from pull start, into FILE (loopback only).
        case "--trace-requests": opt.TraceFile = Path.GetFullPath(Next()); break;
        // Only some variants (0-based, in table order).
        case "--variants": opt.Only = [.. Next().Split(',').Select(x => int.Parse(x, CultureInfo.InvariantCulture))]; break;
        case "-h" or "--help": Console.WriteLine(Options.Usage); return 0;
        default: Console.Error.WriteLine($"unknown argument {args[i]}\n{Options.Usage}"); return 2;
    }
}
if (opt.Image is not ("python" or "large")) { Console.Error.WriteLine($"--image {opt.Image}: python or large"); return 2; }
opt.WaitFetch ??= opt.Image == "large";
if (opt.ReferenceDaemon is not null && !File.Exists(opt.ReferenceDaemon))
{
    Console.Error.WriteLine($"--reference-daemon {opt.ReferenceDaemon}: no such file (build it with integration/bench/reference-daemon/build.sh)");
    return 2;
}
if (opt.OurDaemon is not null && !File.Exists(opt.OurDaemon))
{
    Console.Error.WriteLine($"--daemon {opt.OurDaemon}: no such file (dotnet publish src/Stargz.Daemon -c Release -o artifacts/native/daemon)");
    return 2;
}
Requires.Root(); // containerd, mounts, drop_caches
var benchStart = DateTime.UtcNow;
string[] ours = opt.OurDaemon is not null ? [opt.OurDaemon]
    : NativeExecutables.Daemon(LocalDaemon.DllPath()) is string native ? [native]
    : [Requires.Which("dotnet") ?? "dotnet", LocalDaemon.DllPath()];
var ourKind = ours.Length == 1 && !ours[0].EndsWith(".dll", StringComparison.Ordinal) ? $"`{ours[0]}`" : "the JIT build (`dotnet stargz-snapshotter.dll`)";
Console.Error.WriteLine($"this daemon: {string.Join(' ', ours)}");

await using var registry = await LocalRegistry.StartAsync();
// Every measured pull goes through this forwarder, which counts what the registry sends: the bytes a network would carry.
await using var proxy = opt.Wan
    ? ByteCountingForwarder.Start(registry.Port, TimeSpan.FromMilliseconds(opt.DelayMs), (long)(opt.Mbit * 1e6))
    : ByteCountingForwarder.Start(registry.Port);
var host = $"127.0.0.1:{proxy.Port}";
// --trace-requests: one line per registry request and response, in ms from the measured pull's start.
using var trace = opt.TraceFile is null ? null : TextWriter.Synchronized(new StreamWriter(opt.TraceFile) { AutoFlush = true });
var traceFrom = Stopwatch.GetTimestamp();
if (trace is not null) proxy.Trace = (id, line) => trace.WriteLine($"{Stopwatch.GetElapsedTime(traceFrom).TotalMilliseconds,8:F1} c{id} {line}");
void Mark(string what) => trace?.WriteLine($"{Stopwatch.GetElapsedTime(traceFrom).TotalMilliseconds,8:F1} === {what}");
using var work = new TempDir("bench-pull");
var repo = opt.Image == "python" ? "bench/python" : "bench/large";
var layers = opt.Image == "python"
    ? TestImages.WritePythonLayers(work.Path, dataMegabytes: opt.DataMb)
    : TestImages.WriteJavaLayers(work.Path, opt.BulkLayers, opt.BulkMb);
long uncompressed = 0;
foreach (var dir in layers)
    foreach (var f in new DirectoryInfo(dir).EnumerateFiles("*", SearchOption.AllDirectories))
        if (f.LinkTarget is null) uncompressed += f.Length;
var jreBytes = 0L;
if (opt.Image == "large")
    foreach (var f in new DirectoryInfo(layers[1]).EnumerateFiles("*", SearchOption.AllDirectories))
        if (f.LinkTarget is null) jreBytes += f.Length;
var layout = Path.Combine(work.Path, "oci");
Console.Error.WriteLine($"building {repo}:v1 ({layers.Count} layers, {uncompressed / 1048576.0:F0} MiB) ...");
await TestImages.BuildAsync(layout, "v1", layers);
await TestImages.PushAsync(layout, "v1", registry.Host, $"{repo}:v1");
foreach (var dir in layers) Directory.Delete(dir, recursive: true); // the registry has them now
var plain = $"{host}/{repo}:v1";
var esgz = $"{host}/{repo}:esgz";
var warmEsgz = $"{host}/bench/warm:esgz";
string[] command = opt.Image == "python"
    ? ["/usr/bin/python3", "-c", "import json, email, http.client, argparse, decimal; print(json.dumps({'ok': True}))"]
    : [$"{TestImages.JavaHome}/bin/java", "-version"];
// Conversion straight against the registry (not through a WAN forwarder: it is set-up, not measured).
await using (var prep = await LocalContainerd.StartAsync())
{
    Console.Error.WriteLine("converting to eStargz with ctr-remote ...");
    await prep.ConvertWithReferenceAsync($"{registry.Host}/{repo}:v1", $"{registry.Host}/{repo}:esgz");
    if (opt.Warm)
    {
        // Another image (busybox and 300 small files of other bytes, so no chunk is shared with the measured one):
        // pulled lazily and read once before a "warm daemon" variant, as a node's long-running daemon has served
        // other images before; the measured pull is still cold in every cache but the runtime's compiled code.
        var warmDir = Path.Combine(work.Path, "warm");
        TestImages.WriteBusybox(warmDir);
        var warmRng = new Random(7);
        Directory.CreateDirectory(Path.Combine(warmDir, "files"));
        for (var i = 0; i < 300; i++)
        {
            var bytes = new byte[500 + warmRng.Next(20_000)];
            warmRng.NextBytes(bytes);
            await File.WriteAllBytesAsync(Path.Combine(warmDir, "files", $"f{i:D3}"), bytes);
        }
        await TestImages.BuildAsync(Path.Combine(work.Path, "warm-oci"), "v1", [warmDir]);
        await TestImages.PushAsync(Path.Combine(work.Path, "warm-oci"), "v1", registry.Host, "bench/warm:v1");
        await prep.ConvertWithReferenceAsync($"{registry.Host}/bench/warm:v1", $"{registry.Host}/bench/warm:esgz");
    }
}
var imageBytes = await LayerBytesAsync(registry.Host, repo, "esgz");
var plainBytes = await LayerBytesAsync(registry.Host, repo, "v1");

// Our daemon promotes a fully fetched layer to an EROFS image by default where the machine can ([erofs] promote not
// set): the default row then waits for the promotion too before its disk is measured.
var promotes = ErofsAvailable();
// A quarter of the image's uncompressed bytes, for the budgeted row.
var quarterMb = Math.Max(1, (long)Math.Round(uncompressed / 4.0 / 1048576));
// Fixed indices (--variants), whether or not a row is enabled: 0 full, 1 floor, 2-3 this daemon, 4-5 the reference's,
// 6 this daemon with a disk budget, 7 this daemon without promotion, 8-9 warm.
string[]? reference = opt.ReferenceDaemon is null ? null : [opt.ReferenceDaemon];
var variants = new List<Variant>
{
    new("full (`ctr pull`, overlayfs)", Kind.Full),
    new("floor: already pulled and unpacked (overlayfs), caches dropped, run only", Kind.Floor),
    new("lazy (`ctr-remote rpull`), this daemon, default config", Kind.Lazy, ours, "", BackgroundFetch: true, WaitPromotion: promotes),
    new("lazy, this daemon, `no_background_fetch = true`", Kind.Lazy, ours, "no_background_fetch = true\n"),
    new("lazy, the reference's daemon (stargz-snapshotter 0.12, Go), default config", Kind.Lazy, reference, "", BackgroundFetch: true, Reference: true),
    new("lazy, the reference's daemon, `no_background_fetch = true`", Kind.Lazy, reference, "no_background_fetch = true\n", Reference: true),
    new($"lazy, this daemon, `[directory_cache] max_disk_mb = {quarterMb}` (a quarter of the image)", Kind.Lazy, ours,
        $"[directory_cache]\nmax_disk_mb = {quarterMb}\n", BackgroundFetch: true),
    new("lazy, this daemon, `[erofs] promote = false`", Kind.Lazy, promotes ? ours : null, "[erofs]\npromote = false\n", BackgroundFetch: true),
    new("lazy, this daemon, default config, warm daemon (another image pulled and read first)", Kind.Lazy, opt.Warm ? ours : null, "", Warm: true),
    new("lazy, the reference's daemon, default config, warm daemon", Kind.Lazy, opt.Warm ? reference : null, "", Warm: true, Reference: true),
};
var referenceDefault = reference is null ? -1 : 4;
const int ourDefault = 2;
var results = variants.Select(_ => new List<RunResult>()).ToArray();
var fdsIdle = new string[variants.Count];
var fdsAfter = new string[variants.Count];
var diskAfter = new string[variants.Count];
string[] tools = [Requires.Command("ctr"), Requires.Command("ctr-remote"), Requires.Command("runc"),
    Requires.Which("containerd-shim-runc-v2") ?? "/usr/bin/containerd-shim-runc-v2", Requires.Command("containerd"), ours[0], ours[^1],
    opt.ReferenceDaemon ?? ours[0]];
Console.Error.WriteLine($"[{DateTime.UtcNow - benchStart:hh\\:mm\\:ss}] image ready; measuring");
for (var r = 0; r < opt.Runs; r++)
{
    for (var v = 0; v < variants.Count; v++)
    {
        if (opt.Only is not null && !opt.Only.Contains(v)) continue;
        var variant = variants[v];
        if (variant.Kind == Kind.Lazy && variant.Command is null) continue; // not enabled in this run
        var res = variant.Kind switch
        {
            Kind.Full => await FullAsync(r),
            Kind.Floor => await FloorAsync(r),
            _ => await LazyAsync(v, r),
        };
        results[v].Add(res);
        Console.Error.WriteLine($"[{DateTime.UtcNow - benchStart:hh\\:mm\\:ss}] run {r + 1}/{opt.Runs} [{v}] {variant.Name}: {res}");
    }
}

Console.Write(Report());
if (opt.OutFile != null) await File.WriteAllTextAsync(opt.OutFile, Report());
return 0;

async Task<RunResult> FullAsync(int r)
{
    await using var ctd = await LocalContainerd.StartAsync();
    proxy.Reset();
    var sw = Stopwatch.StartNew();
    (await ctd.CtrAsync("image", "pull", "--plain-http", plain)).EnsureSuccess("ctr pull");
    var pulled = sw.Elapsed.TotalSeconds;
    (await ctd.CtrAsync(["run", "--rm", plain, $"full-{r}", .. command])).EnsureSuccess("ctr run (full)");
    return new RunResult { Seconds = sw.Elapsed.TotalSeconds, PullSeconds = pulled, Bytes = proxy.BytesToClients };
}

// The floor: what a run costs when the image is already on the node's disk but not in its page cache.
async Task<RunResult> FloorAsync(int r)
{
    await using var ctd = await LocalContainerd.StartAsync();
    // Straight from the registry: this pull is not measured.
    var local = $"{registry.Host}/{repo}:v1";
    (await ctd.CtrAsync("image", "pull", "--plain-http", local)).EnsureSuccess("ctr pull (floor; unpacks on overlayfs)");
    sync();
    await File.WriteAllTextAsync("/proc/sys/vm/drop_caches", "3");
    // Only the image's files stay cold: the tools every variant runs (warm in the lazy rows) are paged back in.
    PageBack(tools);
    var sw = Stopwatch.StartNew();
    (await ctd.CtrAsync(["run", "--rm", local, $"floor-{r}", .. command])).EnsureSuccess("ctr run (floor)");
    var seconds = sw.Elapsed.TotalSeconds;
    // The registry's blobs were dropped too: read them back so the variant after this one pulls as the others do.
    ReadBack(Directory.EnumerateFiles(registry.StorageDir, "*", SearchOption.AllDirectories));
    return new RunResult { Seconds = seconds };
}

async Task<RunResult> LazyAsync(int v, int r)
{
    var variant = variants[v];
    // Fresh daemon, containerd and cache every time: cold pulls only.
    var env = opt.ProfileDir is null ? null : new Dictionary<string, string> { ["DOTNET_PerfMapEnabled"] = "1" };
    await using var daemon = await BenchDaemon.StartAsync(variant.Command!, variant.Toml!, opt.LogLevel, env);
    var res = new RunResult { ListenMs = daemon.ExecToListening.TotalMilliseconds, ServingMs = daemon.ExecToServing.TotalMilliseconds };
    var idleAt = daemon.ListeningAt + (long)(opt.IdleS * Stopwatch.Frequency);
    var wait = Stopwatch.GetElapsedTime(Stopwatch.GetTimestamp(), idleAt);
    if (wait > TimeSpan.Zero) await Task.Delay(wait);
    res.IdleRssMiB = ProcStats.StatusMiB(daemon.Pid, "VmRSS");
    res.IdleAnonMiB = ProcStats.StatusMiB(daemon.Pid, "RssAnon");
    res.IdleFds = ProcStats.FdCount(daemon.Pid);
    fdsIdle[v] = ProcStats.FdBreakdown(daemon.Pid, daemon.Root, proxy.Port);
    await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
    // Every lazy row samples its daemon's disk the same way (5 times a second during pull and run, then once a second).
    await using var disk = new DiskSampler(daemon.Root, TimeSpan.FromMilliseconds(200));
    if (variant.Warm)
    {
        (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", warmEsgz)).EnsureSuccess("ctr-remote rpull (warm-up image)");
        (await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", warmEsgz, $"warm-{r}", "/bin/sh", "-c", "cat /files/* > /dev/null"]))
            .EnsureSuccess("ctr run (warm-up image)");
    }
    proxy.Reset();
    var cpuBefore = ProcStats.CpuSeconds(daemon.Pid);
    using var perf = opt.ProfileDir is null ? null : Process.Start(new ProcessStartInfo("perf",
        ["record", "-q", "-g", "-F", "999", "-p", daemon.Pid.ToString(CultureInfo.InvariantCulture), "-o", Path.Combine(opt.ProfileDir, $"run{r + 1}-variant{v}.data")])
        { RedirectStandardError = true });
    await using var rssSampler = new RssSampler(daemon.Pid, TimeSpan.FromMilliseconds(20));
    var start = Stopwatch.GetTimestamp();
    traceFrom = start;
    Mark($"round {r + 1}, {variant.Name}: pull");
    (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", esgz)).EnsureSuccess("ctr-remote rpull");
    res.PullSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
    Mark("run");
    (await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", esgz, $"lazy-{r}", .. command])).EnsureSuccess("ctr run (lazy)");
    res.Seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
    Mark("exited");
    if (perf is not null)
    {
        kill(perf.Id, 2); // SIGINT: perf writes its file and exits
        await perf.WaitForExitAsync();
    }
    // Background fetches go on after the container exits: count what had arrived by then.
    res.Bytes = proxy.BytesToClients;
    res.PeakRssMiB = ProcStats.StatusMiB(daemon.Pid, "VmHWM");
    await rssSampler.DisposeAsync(); // stops sampling: what follows is not pull + run
    (_, res.PeakAnonMiB, res.PeakFileMiB) = rssSampler.Largest;
    var cpu = ProcStats.CpuSeconds(daemon.Pid);
    res.CpuSeconds = cpu;
    res.CpuPullToExit = cpu - cpuBefore;
    res.AfterRunFds = ProcStats.FdCount(daemon.Pid);
    fdsAfter[v] = ProcStats.FdBreakdown(daemon.Pid, daemon.Root, proxy.Port);
    var atExit = DiskUsage.Measure(daemon.Root);
    res.PeakDiskRun = Math.Max(disk.TakePeak(), atExit.Allocated);
    disk.Interval = TimeSpan.FromSeconds(1);
    var diskNow = atExit;
    if (opt.WaitFetch == true && variant.BackgroundFetch)
    {
        // Done when no byte has come from the registry for FetchQuietS (both daemons start their background fetch
        // once mounts and reads have been quiet for 5 s; neither pauses that long in the middle of one).
        var quiet = TimeSpan.FromSeconds(opt.FetchQuietS);
        var deadline = Stopwatch.GetTimestamp() + (long)(opt.FetchTimeoutS * (double)Stopwatch.Frequency);
        while (Stopwatch.GetElapsedTime(proxy.LastToClientsTimestamp) < quiet && Stopwatch.GetTimestamp() < deadline)
            await Task.Delay(200);
        if (Stopwatch.GetElapsedTime(proxy.LastToClientsTimestamp) < quiet)
            Console.Error.WriteLine($"warning: bytes still arriving after {opt.FetchTimeoutS} s; the background-fetch columns of this run are at that bound");
        res.FetchedAllSeconds = Stopwatch.GetElapsedTime(start, proxy.LastToClientsTimestamp).TotalSeconds;
        res.FetchedAllBytes = proxy.BytesToClients;
        res.FetchedPeakRssMiB = ProcStats.StatusMiB(daemon.Pid, "VmHWM");
        res.FetchedRssMiB = ProcStats.StatusMiB(daemon.Pid, "VmRSS");
        res.FetchedCpuSeconds = ProcStats.CpuSeconds(daemon.Pid);
        if (variant.WaitPromotion)
        {
            // Promotion (mkfs.erofs at idle priority, then a check of every file against the TOC, then the layer's
            // chunk files are dropped) goes on after the last byte: wait for a `.promoted` record per layer, then for
            // the disk to settle (the chunk files go after the record is written).
            var pdeadline = Stopwatch.GetTimestamp() + (long)(opt.PromoteTimeoutS * (double)Stopwatch.Frequency);
            while ((diskNow = DiskUsage.Measure(daemon.Root)).PromotedMarkers < layers.Count && Stopwatch.GetTimestamp() < pdeadline)
                await Task.Delay(500);
            if (diskNow.PromotedMarkers < layers.Count)
                Console.Error.WriteLine($"warning: {diskNow.PromotedMarkers} of {layers.Count} layers promoted after {opt.PromoteTimeoutS} s; measuring the disk as it is");
            else
                res.PromotedSeconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            res.PromotedLayers = diskNow.PromotedMarkers;
            for (var i = 0; i < 60; i++)
            {
                await Task.Delay(1000);
                var next = DiskUsage.Measure(daemon.Root);
                var same = next.Allocated == diskNow.Allocated;
                diskNow = next;
                if (same) break;
            }
        }
        else diskNow = DiskUsage.Measure(daemon.Root);
        res.DiskBytes = diskNow.Allocated;
        res.DiskApparentBytes = diskNow.Apparent;
        res.PeakDiskAll = Math.Max(Math.Max(res.PeakDiskRun, disk.Peak), diskNow.Allocated);
    }
    diskAfter[v] = DiskUsage.Breakdown(diskNow.ByDir);
    if (opt.LogDir is not null) await File.WriteAllTextAsync(Path.Combine(opt.LogDir, $"run{r + 1}-variant{v}.log"), daemon.Log);
    return res;
}

string Report()
{
    static double Median(IEnumerable<double> xs)
    {
        var a = xs.Where(x => !double.IsNaN(x)).OrderBy(x => x).ToArray();
        return a.Length == 0 ? double.NaN : a.Length % 2 == 1 ? a[a.Length / 2] : (a[a.Length / 2 - 1] + a[a.Length / 2]) / 2;
    }
    double M(int v, Func<RunResult, double> f) => v < 0 || results[v].Count == 0 ? double.NaN : Median(results[v].Select(f));
    static string Ratio(double x, double b) => double.IsNaN(x) || double.IsNaN(b) || b == 0 ? "—" : $"{x / b:F2}x";
    static string Val(double x, string fmt, string unit) => double.IsNaN(x) ? "—" : x.ToString(fmt, CultureInfo.InvariantCulture) + unit;
    // A value with its ratio to the reference's default row, for the daemon tables.
    string VR(int v, Func<RunResult, double> f, string fmt, string unit)
    {
        var x = M(v, f);
        if (double.IsNaN(x)) return "—";
        var b = M(referenceDefault, f);
        return v == referenceDefault || double.IsNaN(b) ? Val(x, fmt, unit) : $"{Val(x, fmt, unit)} ({Ratio(x, b)})";
    }
    var full = variants.FindIndex(x => x.Kind == Kind.Full);
    var floor = variants.FindIndex(x => x.Kind == Kind.Floor);
    var baseS = M(full, x => x.Seconds);
    var floorS = M(floor, x => x.Seconds);
    var refS = M(referenceDefault, x => x.Seconds);
    var ourS = M(ourDefault, x => x.Seconds);
    var net = opt.Wan
        ? $"through the forwarder emulating a WAN path: {opt.DelayMs:0.#} ms each way, {opt.Mbit:0.#} Mbit/s each direction"
        : "on loopback (the forwarder only counts)";
    var sb = new StringBuilder();
    sb.AppendLine($"# Pull benchmark: {opt.Image} image, {(opt.Wan ? "WAN" : "loopback")}");
    sb.AppendLine();
    sb.AppendLine($"`dotnet run -c Release --project integration/bench/Stargz.Bench.Pull -- {opt.CommandLine}` on {Environment.ProcessorCount} cores,");
    sb.AppendLine($"{benchStart:yyyy-MM-dd HH:mm} UTC ({(DateTime.UtcNow - benchStart).TotalMinutes:F0} min), load average at the end {File.ReadAllText("/proc/loadavg").Split(' ')[0]}; this daemon: {ourKind}.");
    if (opt.Image == "python")
        sb.AppendLine($"Image: busybox + python3.11 and its stdlib + dist-packages + {opt.DataMb} MiB of data ({layers.Count} layers; {uncompressed / 1048576.0:F0} MiB uncompressed, {plainBytes / 1048576.0:F0} MiB gzip, {imageBytes / 1048576.0:F0} MiB as eStargz by ctr-remote).");
    else
        sb.AppendLine($"Image: busybox + libc/libstdc++, openjdk-17-jre-headless ({jreBytes / 1048576.0:F0} MiB), {opt.BulkLayers} layers of {opt.BulkMb} MiB incompressible bulk ({layers.Count} layers; {uncompressed / 1048576.0:F0} MiB uncompressed, {plainBytes / 1048576.0:F0} MiB gzip, {imageBytes / 1048576.0:F0} MiB as eStargz by ctr-remote).");
    sb.AppendLine($"Workload: `{string.Join(' ', command.Select(a => a.Contains(' ', StringComparison.Ordinal) ? $"\"{a}\"" : a))}`. Network: {net}. Median of {opt.Runs} interleaved run(s); fresh containerd, daemon and cache each time.");
    sb.AppendLine();
    sb.AppendLine("| variant | seconds to container exit | of which the pull | × floor | × reference default | × this daemon default | × full pull | bytes from the registry |");
    sb.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (var v = 0; v < variants.Count; v++)
    {
        if (results[v].Count == 0) continue;
        var s = M(v, x => x.Seconds);
        var isLazy = variants[v].Kind == Kind.Lazy;
        sb.AppendLine($"| {variants[v].Name} | {s:F2} | {Val(M(v, x => x.PullSeconds), "F2", "")} | {(v == floor ? "1.00x" : Ratio(s, floorS))} | {(isLazy ? Ratio(s, refS) : "—")} | {(isLazy ? Ratio(s, ourS) : "—")} | {Ratio(s, baseS)} | {(variants[v].Kind == Kind.Floor ? "—" : $"{M(v, x => x.Bytes) / 1048576.0:F1} MiB")} |");
    }
    sb.AppendLine();
    sb.AppendLine("Daemons (ratios to the reference's default-config row in brackets):");
    sb.AppendLine();
    sb.AppendLine("| daemon variant | exec → listening | exec → serving | idle RSS | fds idle / after the run | peak RSS, pull + run | CPU, exec to container exit | of which pull to exit | peak disk, pull + run |");
    sb.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (var v = 0; v < variants.Count; v++)
    {
        if (results[v].Count == 0 || variants[v].Kind != Kind.Lazy) continue;
        sb.AppendLine($"| {variants[v].Name} | {VR(v, x => x.ListenMs, "F0", " ms")} | {VR(v, x => x.ServingMs, "F0", " ms")} | {VR(v, x => x.IdleRssMiB, "F1", " MiB")} | {M(v, x => x.IdleFds):F0} / {M(v, x => x.AfterRunFds):F0} | {VR(v, x => x.PeakRssMiB, "F0", " MiB")} | {VR(v, x => x.CpuSeconds, "F2", " s")} | {VR(v, x => x.CpuPullToExit, "F2", " s")} | {VR(v, x => x.PeakDiskRun / 1048576.0, "F1", " MiB")} |");
    }
    if (opt.WaitFetch == true && results.Any(r => r.Any(x => !double.IsNaN(x.FetchedAllSeconds))))
    {
        sb.AppendLine();
        sb.AppendLine($"After the background fetch (done: no byte from the registry for {opt.FetchQuietS} s; RSS read then). Disk: what the daemon holds under its root, allocated blocks as `du -s` counts them, not crossing into its mounts (chunk files, TOCs, whole-file copies, EROFS images, metadata; the reference's: its httpcache and fscache, snapshotter dirs); × uncompressed: that over the image's {uncompressed / 1048576.0:F1} MiB of uncompressed file bytes.{(promotes ? $" This daemon promotes fully fetched layers to EROFS by default (as shipped: `[erofs] promote` not set, this machine has erofs and mkfs.erofs): its default row waits after the last byte until every layer's `.promoted` record is written and the disk has settled (the layer's chunk files are dropped), and \"promoted at\" is then." : " This machine cannot promote to EROFS (no erofs in the kernel or no mkfs.erofs): this daemon's layers stay on FUSE.")}");
        sb.AppendLine();
        sb.AppendLine("| daemon variant | last byte at (s from pull start) | bytes from the registry | disk then | × uncompressed | peak disk | promoted at | peak RSS | RSS then | CPU, exec to then |");
        sb.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (var v = 0; v < variants.Count; v++)
        {
            if (results[v].Count == 0 || double.IsNaN(M(v, x => x.FetchedAllSeconds))) continue;
            sb.AppendLine($"| {variants[v].Name} | {VR(v, x => x.FetchedAllSeconds, "F1", "")} | {M(v, x => x.FetchedAllBytes) / 1048576.0:F1} MiB | {VR(v, x => x.DiskBytes / 1048576.0, "F1", " MiB")} | {Val(M(v, x => x.DiskBytes) / uncompressed, "F3", "")} | {VR(v, x => x.PeakDiskAll / 1048576.0, "F1", " MiB")} | {Val(M(v, x => x.PromotedSeconds), "F1", " s")} | {VR(v, x => x.FetchedPeakRssMiB, "F0", " MiB")} | {VR(v, x => x.FetchedRssMiB, "F0", " MiB")} | {VR(v, x => x.FetchedCpuSeconds, "F2", " s")} |");
        }
    }
    sb.AppendLine();
    sb.AppendLine("Disk of each daemon's last run by directory under its root (allocated; after the background fetch where waited for, else at container exit):");
    sb.AppendLine();
    for (var v = 0; v < variants.Count; v++)
    {
        if (results[v].Count == 0 || variants[v].Kind != Kind.Lazy) continue;
        sb.AppendLine($"- {variants[v].Name}: {diskAfter[v]}");
    }
    sb.AppendLine();
    sb.AppendLine("Open fds of each daemon's last run, by kind (idle; after the run):");
    sb.AppendLine();
    for (var v = 0; v < variants.Count; v++)
    {
        if (results[v].Count == 0 || variants[v].Kind != Kind.Lazy) continue;
        sb.AppendLine($"- {variants[v].Name}: idle: {fdsIdle[v]}; after the run: {fdsAfter[v]}");
    }
    return sb.ToString();
}

static async Task<long> LayerBytesAsync(string host, string repo, string tag)
{
    long sum = 0;
    foreach (var (_, size) in await DaemonMetrics.ManifestLayersAsync(host, repo, tag)) sum += size;
    return sum;
}

// Reads files into the page cache (and forgets the bytes).
static void ReadBack(IEnumerable<string> files)
{
    var buf = new byte[1 << 20];
    foreach (var f in files.Distinct())
    {
        if (!File.Exists(f)) continue;
        using var s = new FileStream(f, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1, FileOptions.SequentialScan);
        while (s.Read(buf, 0, buf.Length) > 0) { }
    }
}

// Brings executables back into the page cache as running them does: through page faults on a mapping. Read with
// read(2), a file comes in as large folios (readahead), which Linux 6.18 maps whole on a fault: each daemon's idle RSS
// was ~1.8 MiB higher (this one's 25.8 against 24.0 MiB, the reference's 16.2 against 14.3, 2026-12-06) than after a
// cold exec, an install (cp) or this, the states a node's daemon starts from.
static unsafe void PageBack(IEnumerable<string> files)
{
    foreach (var f in files.Distinct())
    {
        if (!File.Exists(f) || new FileInfo(f).Length == 0) continue;
        using var map = System.IO.MemoryMappedFiles.MemoryMappedFile.CreateFromFile(f, FileMode.Open, null, 0,
            System.IO.MemoryMappedFiles.MemoryMappedFileAccess.Read);
        using var view = map.CreateViewAccessor(0, 0, System.IO.MemoryMappedFiles.MemoryMappedFileAccess.Read);
        byte* p = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        try
        {
            var sum = 0;
            for (long at = 0; at < view.Capacity; at += Environment.SystemPageSize) sum += p[at];
            GC.KeepAlive(sum);
        }
        finally
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
    }
}

// As the daemon decides when [erofs] promote is not set: erofs in the kernel and mkfs.erofs on the PATH.
static bool ErofsAvailable()
{
    var fs = File.Exists("/proc/filesystems") && File.ReadLines("/proc/filesystems").Any(l => l.Trim().EndsWith("erofs", StringComparison.Ordinal));
    return fs && Requires.Which("mkfs.erofs") is not null;
}

[DllImport("libc", SetLastError = true)]
static extern int kill(int pid, int sig);

[DllImport("libc")]
static extern void sync();

enum Kind { Full, Floor, Lazy }

/// <param name="Command">null: a lazy row not enabled in this run (no reference daemon, no --warm, no promotion here).</param>
/// <param name="WaitPromotion">with --wait-fetch, also wait for every layer's EROFS promotion before measuring the disk.</param>
record Variant(string Name, Kind Kind, string[]? Command = null, string? Toml = null, bool BackgroundFetch = false,
    bool Reference = false, bool Warm = false, bool WaitPromotion = false);

sealed class RunResult
{
    public double Seconds = double.NaN, PullSeconds = double.NaN, Bytes = double.NaN;
    public double ListenMs = double.NaN, ServingMs = double.NaN, IdleRssMiB = double.NaN, IdleAnonMiB = double.NaN, IdleFds = double.NaN, AfterRunFds = double.NaN;
    public double PeakRssMiB = double.NaN, PeakAnonMiB = double.NaN, PeakFileMiB = double.NaN, CpuSeconds = double.NaN, CpuPullToExit = double.NaN;
    public double FetchedAllSeconds = double.NaN, FetchedAllBytes = double.NaN, FetchedPeakRssMiB = double.NaN,
        FetchedRssMiB = double.NaN, FetchedCpuSeconds = double.NaN;
    public double PeakDiskRun = double.NaN, DiskBytes = double.NaN, DiskApparentBytes = double.NaN, PeakDiskAll = double.NaN,
        PromotedSeconds = double.NaN, PromotedLayers = double.NaN;

    public override string ToString()
    {
        var sb = new StringBuilder().Append(CultureInfo.InvariantCulture, $"{Seconds:F2} s");
        if (!double.IsNaN(PullSeconds)) sb.Append(CultureInfo.InvariantCulture, $" (pull {PullSeconds:F2} s)");
        if (!double.IsNaN(Bytes)) sb.Append(CultureInfo.InvariantCulture, $", {Bytes / 1048576.0:F1} MiB");
        if (!double.IsNaN(ListenMs))
            sb.Append(CultureInfo.InvariantCulture, $"; listening after {ListenMs:F0} ms, serving after {ServingMs:F0} ms, idle RSS {IdleRssMiB:F1} MiB ({IdleAnonMiB:F1} anonymous), fds {IdleFds} / {AfterRunFds}, peak RSS {PeakRssMiB:F0} MiB (largest sample: {PeakAnonMiB:F1} anonymous, {PeakFileMiB:F1} file), CPU {CpuSeconds:F2} s ({CpuPullToExit:F2} s pull to exit)");
        if (!double.IsNaN(PeakDiskRun)) sb.Append(CultureInfo.InvariantCulture, $", peak disk {PeakDiskRun / 1048576.0:F1} MiB");
        if (!double.IsNaN(FetchedAllSeconds))
            sb.Append(CultureInfo.InvariantCulture, $"; everything fetched at {FetchedAllSeconds:F1} s ({FetchedAllBytes / 1048576.0:F1} MiB), peak RSS {FetchedPeakRssMiB:F0} MiB, RSS {FetchedRssMiB:F0} MiB, CPU {FetchedCpuSeconds:F2} s");
        if (!double.IsNaN(PromotedLayers)) sb.Append(CultureInfo.InvariantCulture, $"; {PromotedLayers} layers promoted at {PromotedSeconds:F1} s");
        if (!double.IsNaN(DiskBytes))
            sb.Append(CultureInfo.InvariantCulture, $"; disk {DiskBytes / 1048576.0:F1} MiB ({DiskApparentBytes / 1048576.0:F1} MiB apparent), peak {PeakDiskAll / 1048576.0:F1} MiB");
        return sb.ToString();
    }
}

sealed class Options
{
    public const string Usage = """
        Stargz.Bench.Pull [--image python|large] [--runs N] [--daemon PATH] [--reference-daemon PATH]
          [--wan | --delay-ms D --mbit B] [--data-mb M] [--bulk-layers N] [--bulk-mb M] [--warm]
          [--wait-fetch | --no-wait-fetch] [--fetch-quiet-s S] [--fetch-timeout-s S] [--promote-timeout-s S] [--idle-s S]
          [--variants I,J] [--logs DIR [--log-level L]] [--profile DIR] [--trace-requests FILE] [--out FILE]
        """;
    public string Image = "python";
    public int Runs = 3, DataMb = 128, BulkLayers = 3, BulkMb = 128, FetchQuietS = 10, FetchTimeoutS = 900, PromoteTimeoutS = 600;
    public double DelayMs, Mbit, IdleS = 2;
    public string? OurDaemon, ReferenceDaemon, OutFile, LogDir, ProfileDir, TraceFile;
    public string LogLevel = "info";
    public bool Warm;
    public bool? WaitFetch;
    public HashSet<int>? Only;
    public bool Wan => DelayMs > 0 || Mbit > 0;

    /// <summary>The flags that shape the result, for the report's header (paths as PATH).</summary>
    public string CommandLine
    {
        get
        {
            var s = new StringBuilder().Append(CultureInfo.InvariantCulture, $"--image {Image} --runs {Runs}");
            if (Image == "python") s.Append(CultureInfo.InvariantCulture, $" --data-mb {DataMb}");
            else s.Append(CultureInfo.InvariantCulture, $" --bulk-layers {BulkLayers} --bulk-mb {BulkMb}");
            if (OurDaemon is not null) s.Append(" --daemon PATH");
            if (ReferenceDaemon is not null) s.Append(" --reference-daemon PATH");
            if (Wan) s.Append(CultureInfo.InvariantCulture, $" --delay-ms {DelayMs:0.#} --mbit {Mbit:0.#}");
            if (Warm) s.Append(" --warm");
            if (IdleS != 2) s.Append(CultureInfo.InvariantCulture, $" --idle-s {IdleS:0.#}");
            if (WaitFetch == true && Image == "python") s.Append(" --wait-fetch");
            if (WaitFetch == false && Image == "large") s.Append(" --no-wait-fetch");
            if (Only is not null) s.Append(" --variants ").Append(string.Join(',', Only.Order()));
            return s.ToString();
        }
    }
}
