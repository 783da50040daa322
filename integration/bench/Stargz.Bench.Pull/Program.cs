using System.Diagnostics;
using System.Globalization;
using System.Text;
using Stargz.Bench.Pull;
using Stargz.TestSupport;

// Lazy pull (ctr-remote rpull through a stargz snapshotter) vs full pull (ctr pull, containerd's overlayfs) of the same
// image, each followed by one container run, alternated N times in one process so all see the same machine load.
// With --reference-daemon, the reference's daemon (integration/bench/reference-daemon/build.sh) runs the same lazy pull.
// Usage: Stargz.Bench.Pull [--runs N] [--data-mb M] [--daemon PATH] [--reference-daemon PATH] [--variants I,J] [--logs DIR [--log-level L]]
//        [--profile DIR] [--out FILE]
var runs = 3;
var dataMb = 128;
string? outFile = null, referenceDaemon = null, ourDaemon = null, logDir = null, profileDir = null;
var logLevel = "info";
HashSet<int>? only = null;
for (var i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--runs": runs = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--data-mb": dataMb = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--reference-daemon": referenceDaemon = Path.GetFullPath(args[++i]); break;
        // This daemon from a publish (e.g. ReadyToRun, or other runtime settings) instead of the build output.
        case "--daemon": ourDaemon = Path.GetFullPath(args[++i]); break;
        case "--out": outFile = args[++i]; break;
        // Keeps each daemon's log (at --log-level) in DIR, to see where a pull spends its time.
        case "--logs": logDir = Directory.CreateDirectory(args[++i]).FullName; break;
        case "--log-level": logLevel = args[++i]; break;
        // perf record -g of each lazy variant's daemon from pull start to container exit, into DIR (JIT frames named
        // through DOTNET_PerfMapEnabled, set for this daemon's runs).
        case "--profile": profileDir = Directory.CreateDirectory(args[++i]).FullName; break;
        // Only some variants (0-based, in table order; the first is the full pull the ratios are taken against).
        case "--variants": only = [.. args[++i].Split(',').Select(x => int.Parse(x, CultureInfo.InvariantCulture))]; break;
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}
if (referenceDaemon is not null && !File.Exists(referenceDaemon))
{
    Console.Error.WriteLine($"--reference-daemon {referenceDaemon}: no such file (build it with integration/bench/reference-daemon/build.sh)");
    return 2;
}
if (ourDaemon is not null && !File.Exists(ourDaemon))
{
    Console.Error.WriteLine($"--daemon {ourDaemon}: no such file");
    return 2;
}

await using var registry = await LocalRegistry.StartAsync();
// Every pull goes through this proxy, which counts what the registry sends: the bytes a network would carry.
await using var proxy = ByteCountingForwarder.Start(registry.Port);
var host = $"127.0.0.1:{proxy.Port}";
using var work = new TempDir("bench-pull");
var layers = TestImages.WritePythonLayers(work.Path, dataMegabytes: dataMb);
var layout = Path.Combine(work.Path, "oci");
await TestImages.BuildAsync(layout, "v1", layers);
await TestImages.PushAsync(layout, "v1", registry.Host, "bench/python:v1");
var plain = $"{host}/bench/python:v1";
var esgz = $"{host}/bench/python:esgz";
// Another image (busybox and 300 small files of other bytes, so no chunk is shared with the measured one that the
// container reads): pulled lazily and read once before a "warm daemon" variant, as a node's long-running daemon has
// served other images before; the measured pull is still cold in every cache but the runtime's compiled code.
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
var warmEsgz = $"{host}/bench/warm:esgz";
var command = new[] { "/usr/bin/python3", "-c", "import json, email, http.client, argparse, decimal; print(json.dumps({'ok': True}))" };

var variants = new List<(string Name, string? DaemonToml, string? Executable, bool Warm)>
{
    ("full (`ctr pull`, overlayfs)", null, null, false),
    ("lazy (`ctr-remote rpull`, this daemon, default config)", "", ourDaemon, false),
    ("lazy, this daemon, `no_background_fetch = true` (on-demand bytes only)", "no_background_fetch = true\n", ourDaemon, false),
};
if (referenceDaemon is not null)
{
    variants.Add(("lazy, the reference's daemon (stargz-snapshotter 0.12, Go), default config", "", referenceDaemon, false));
    variants.Add(("lazy, the reference's daemon, `no_background_fetch = true`", "no_background_fetch = true\n", referenceDaemon, false));
}
variants.Add(("lazy, this daemon, default config, warm daemon (another image pulled and read first)", "", ourDaemon, true));
if (referenceDaemon is not null)
    variants.Add(("lazy, the reference's daemon, default config, warm daemon", "", referenceDaemon, true));
var results = variants.Select(_ => new List<(double Seconds, double PullSeconds, double Bytes, double PeakRssMiB, double CpuSeconds)>()).ToArray();
long imageBytes = 0, plainBytes = 0;
for (var r = 0; r < runs; r++)
{
    for (var v = 0; v < variants.Count; v++)
    {
        if (only is not null && v != 0 && !only.Contains(v)) continue;
        var (name, toml, exe, warm) = variants[v];
        // Fresh daemon, containerd and cache every time: cold pulls only.
        await using var daemon = exe is null
            ? await LocalDaemon.StartAsync(toml, logLevel: logLevel,
                env: profileDir is null ? null : new Dictionary<string, string> { ["DOTNET_PerfMapEnabled"] = "1" })
            : await LocalDaemon.StartExecutableAsync(exe, toml, logLevel: logLevel);
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
        if (r == 0 && v == 0)
        {
            await ctd.ConvertWithReferenceAsync($"{host}/bench/warm:v1", warmEsgz);
            await ctd.CtrAsync("images", "rm", "--sync", $"{host}/bench/warm:v1", warmEsgz);
            await ctd.ConvertWithReferenceAsync(plain, esgz);
            imageBytes = await LayerBytesAsync(registry.Host, "bench/python", "esgz");
            plainBytes = await LayerBytesAsync(registry.Host, "bench/python", "v1");
        }
        await ctd.CtrAsync("images", "rm", "--sync", plain, esgz);
        await ctd.CtrAsync("content", "prune", "references");
        if (warm)
        {
            (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", warmEsgz)).EnsureSuccess("ctr-remote rpull (warm-up image)");
            (await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", warmEsgz, $"warm-{r}", "/bin/sh", "-c", "cat /files/* > /dev/null"]))
                .EnsureSuccess("ctr run (warm-up image)");
        }
        proxy.Reset();
        var cpuBefore = CpuSeconds(daemon.Pid);
        using var perf = profileDir is null || toml is null ? null : Process.Start(new ProcessStartInfo("perf",
            ["record", "-q", "-g", "-F", "999", "-p", daemon.Pid.ToString(CultureInfo.InvariantCulture), "-o", Path.Combine(profileDir, $"run{r + 1}-variant{v}.data")])
            { RedirectStandardError = true });
        var sw = Stopwatch.StartNew();
        double pulled;
        if (toml is null)
        {
            (await ctd.CtrAsync("image", "pull", "--plain-http", plain)).EnsureSuccess("ctr pull");
            pulled = sw.Elapsed.TotalSeconds;
            (await ctd.CtrAsync(["run", "--rm", plain, $"full-{r}", .. command])).EnsureSuccess("ctr run (full)");
        }
        else
        {
            (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", esgz)).EnsureSuccess("ctr-remote rpull");
            pulled = sw.Elapsed.TotalSeconds;
            (await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", esgz, $"lazy-{r}", .. command])).EnsureSuccess("ctr run (lazy)");
        }
        var seconds = sw.Elapsed.TotalSeconds;
        if (perf is not null)
        {
            kill(perf.Id, 2); // SIGINT: perf writes its file and exits
            await perf.WaitForExitAsync();
        }
        // Background fetches go on after the container exits: count what had arrived by then.
        var bytes = proxy.BytesToClients;
        var rss = toml is null ? double.NaN : PeakRssMiB(daemon.Pid);
        var cpu = toml is null ? double.NaN : CpuSeconds(daemon.Pid) - cpuBefore;
        results[v].Add((seconds, pulled, bytes, rss, cpu));
        if (logDir is not null) await File.WriteAllTextAsync(Path.Combine(logDir, $"run{r + 1}-variant{v}.log"), daemon.Log);
        Console.Error.WriteLine($"run {r + 1}/{runs} {name}: {seconds:F2} s (pull {pulled:F2} s), {bytes / 1048576.0:F1} MiB, peak RSS {rss:F0} MiB, CPU {cpu:F2} s");
    }
}

static double Median(IEnumerable<double> xs) { var a = xs.OrderBy(x => x).ToArray(); return a[a.Length / 2]; }
var baseS = Median(results[0].Select(x => x.Seconds));
var baseB = Median(results[0].Select(x => x.Bytes));
var sb = new StringBuilder();
sb.AppendLine("# Lazy pull vs full pull");
sb.AppendLine();
sb.AppendLine($"`dotnet run -c Release --project integration/bench/Stargz.Bench.Pull -- --runs {runs} --data-mb {dataMb}{(ourDaemon is null ? "" : " --daemon PATH")}{(referenceDaemon is null ? "" : " --reference-daemon PATH")}` on {Environment.ProcessorCount} cores, {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC.");
sb.AppendLine($"Image: busybox + python3.11 and its stdlib + dist-packages + {dataMb} MiB of data (3 layers; {plainBytes / 1048576.0:F0} MiB gzip, {imageBytes / 1048576.0:F0} MiB as eStargz by ctr-remote).");
sb.AppendLine("Time from pull start until `python3 -c 'import json, email, http.client, argparse, decimal'` in a new container has exited;");
sb.AppendLine($"median of {runs} interleaved cold runs (fresh containerd, daemon and chunk cache each time). Bytes: what the registry had sent");
sb.AppendLine("(through a counting proxy: manifests, layers, HTTP headers) by the time the container exited. Peak RSS: the snapshotter");
sb.AppendLine($"daemon's VmHWM at that moment; daemon CPU: its user + system time from pull start to then. Both daemons log at {logLevel}.");
sb.AppendLine();
sb.AppendLine("| pull | seconds to container exit | of which the pull | bytes from the registry | time vs full pull | bytes vs full pull | daemon peak RSS | daemon CPU |");
sb.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|");
for (var v = 0; v < variants.Count; v++)
{
    if (results[v].Count == 0) continue;
    var sec = Median(results[v].Select(x => x.Seconds));
    var pull = Median(results[v].Select(x => x.PullSeconds));
    var bytes = Median(results[v].Select(x => x.Bytes));
    var rss = Median(results[v].Select(x => x.PeakRssMiB));
    var cpu = Median(results[v].Select(x => x.CpuSeconds));
    sb.AppendLine($"| {variants[v].Name} | {sec:F2} | {pull:F2} | {bytes / 1048576.0:F1} MiB | {sec / baseS:F2}x | {bytes / baseB:F2}x | {(double.IsNaN(rss) ? "—" : $"{rss:F0} MiB")} | {(double.IsNaN(cpu) ? "—" : $"{cpu:F2} s")} |");
}
Console.Write(sb.ToString());
if (outFile != null) await File.WriteAllTextAsync(outFile, sb.ToString());
return 0;

static async Task<long> LayerBytesAsync(string host, string repo, string tag)
{
    long sum = 0;
    foreach (var (_, size) in await DaemonMetrics.ManifestLayersAsync(host, repo, tag)) sum += size;
    return sum;
}

// utime + stime (fields 14 and 15 of /proc/PID/stat, after the parenthesised command name), in clock ticks of 1/100 s.
static double CpuSeconds(int pid)
{
    var stat = File.ReadAllText($"/proc/{pid}/stat");
    var f = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
    return (long.Parse(f[11], CultureInfo.InvariantCulture) + long.Parse(f[12], CultureInfo.InvariantCulture)) / 100.0;
}

static double PeakRssMiB(int pid)
{
    foreach (var line in File.ReadLines($"/proc/{pid}/status"))
        if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
            return long.Parse(line.AsSpan(6).Trim().TrimEnd("kB").Trim(), CultureInfo.InvariantCulture) / 1024.0;
    return double.NaN;
}

[System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
static extern int kill(int pid, int sig);
