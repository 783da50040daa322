using System.Diagnostics;
using System.Globalization;
using System.Text;
using Stargz.TestSupport;

// Cold start (lazy pull + run to exit) of one image three ways: converted to eStargz without a record (our converter,
// `.no.prefetch.landmark`: everything on demand), optimized by `stargz image optimize`, and optimized by the
// reference's `ctr-remote image optimize`, for the same workload (the image's own Cmd). Each round runs every variant
// once with a fresh containerd and daemon (interleaved, so all see the same machine load); rows are medians.
// Registry requests go through a counting proxy, so each row also says how many blob range requests and bytes the
// cold start needed. Method and results: integration/bench/optimize-results.md.
int runs = 5, dataMb = 32;
string? outFile = null;
for (var i = 0; i < args.Length; i++)
{
    string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{args[i]} needs a value");
    switch (args[i])
    {
        case "--runs": runs = int.Parse(Next(), CultureInfo.InvariantCulture); break;
        case "--data-mb": dataMb = int.Parse(Next(), CultureInfo.InvariantCulture); break;
        case "--out": outFile = Next(); break;
        case "-h" or "--help":
            Console.WriteLine("usage: Stargz.Bench.Optimize [--runs 5] [--data-mb 32] [--out FILE]");
            return 0;
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}
Requires.Root();
var started = DateTime.UtcNow;
await using var registry = await LocalRegistry.StartAsync();
await using var proxy = new CountingProxy(registry.Host);
using var work = new TempDir("bench-optimize");
var layers = TestImages.WritePythonLayers(work.Path, dataMegabytes: dataMb);
string[] command = ["/usr/bin/python3", "-c", "import json, email, http.client, argparse, decimal; print(json.dumps({'ok': True}))"];
var layout = Path.Combine(work.Path, "oci");
Console.Error.WriteLine($"building bench/python:v1 ({layers.Count} layers) ...");
await TestImages.BuildAsync(layout, "v1", layers, cmd: command);
await TestImages.PushAsync(layout, "v1", registry.Host, "bench/python:v1");
foreach (var dir in layers) Directory.Delete(dir, recursive: true);
var src = $"{registry.Host}/bench/python:v1";

// Set-up, not measured: the three images.
double oursOptimizeSeconds, refOptimizeSeconds;
string oursRecord;
await using (var prep = await LocalContainerd.StartAsync())
{
    Console.Error.WriteLine("converting without a record (stargz image convert) ...");
    (await StargzCli.RunAsync(["image", "convert", "--plain-http", src, $"{registry.Host}/bench/python:esgz"], TimeSpan.FromMinutes(20)))
        .EnsureSuccess("stargz image convert");
    Console.Error.WriteLine("optimizing with stargz image optimize ...");
    var sw = Stopwatch.StartNew();
    var r = (await StargzCli.RunAsync(["image", "optimize", "--plain-http", "--address", prep.Socket, "--runc-root", prep.RuncRoot, "--period", "60",
        src, $"{registry.Host}/bench/python:opt-ours"], TimeSpan.FromMinutes(20))).EnsureSuccess("stargz image optimize");
    oursOptimizeSeconds = sw.Elapsed.TotalSeconds;
    oursRecord = r.StdOut.Split('\n').LastOrDefault(l => l.StartsWith("recorded ", StringComparison.Ordinal) && l.Contains(" files, ", StringComparison.Ordinal)) ?? "";
    Console.Error.WriteLine("optimizing with ctr-remote image optimize ...");
    (await prep.CtrAsync("image", "pull", "--plain-http", src)).EnsureSuccess("ctr pull");
    sw.Restart();
    (await prep.CtrRemoteAsync("image", "optimize", "--oci", "--period", "60", src, $"{registry.Host}/bench/python:opt-ref")).EnsureSuccess("ctr-remote image optimize");
    refOptimizeSeconds = sw.Elapsed.TotalSeconds;
    (await prep.CtrAsync("image", "push", "--plain-http", $"{registry.Host}/bench/python:opt-ref")).EnsureSuccess("ctr push");
}

(string Name, string Tag)[] variants =
[
    ("eStargz, no record (`.no.prefetch.landmark`: all on demand)", "esgz"),
    ("optimized by `stargz image optimize`", "opt-ours"),
    ("optimized by `ctr-remote image optimize`", "opt-ref"),
];
var results = variants.Select(_ => new List<(double Seconds, long Requests, long Bytes)>()).ToArray();
for (var round = 0; round < runs; round++)
{
    for (var v = 0; v < variants.Length; v++)
    {
        // A fresh daemon (default config: prefetch and background fetch on) and containerd for every cold start.
        await using var daemon = await LocalDaemon.StartAsync("", logLevel: "info");
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
        var image = $"{proxy.Host}/bench/python:{variants[v].Tag}";
        proxy.ResetCounts();
        var sw = Stopwatch.StartNew();
        (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess($"rpull {image}");
        (await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", image, $"cold-{round}-{v}", .. command])).EnsureSuccess($"run {image}\n{daemon.Log}");
        var seconds = sw.Elapsed.TotalSeconds;
        var asked = RangeBytes(proxy);
        results[v].Add((seconds, proxy.RangeRequests, asked));
        Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"round {round + 1}/{runs} {variants[v].Tag}: {seconds:F2} s, {proxy.RangeRequests} range requests, {asked / 1048576.0:F1} MiB"));
    }
}

// Bytes asked for in the blob ranges of the proxy's log ("GET PATH bytes=a-b,c-d").
static long RangeBytes(CountingProxy proxy)
{
    long sum = 0;
    lock (proxy.Log)
        foreach (var line in proxy.Log)
        {
            var at = line.IndexOf(" bytes=", StringComparison.Ordinal);
            if (at < 0) continue;
            foreach (var r in line[(at + 7)..].Split(','))
            {
                var dash = r.IndexOf('-');
                if (dash > 0 && long.TryParse(r[..dash], CultureInfo.InvariantCulture, out var a) && long.TryParse(r[(dash + 1)..], CultureInfo.InvariantCulture, out var b))
                    sum += b - a + 1;
            }
        }
    return sum;
}

static double Median(IEnumerable<double> xs)
{
    var s = xs.Order().ToArray();
    return s.Length == 0 ? double.NaN : s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
}
var load = File.ReadAllText("/proc/loadavg").Split(' ')[0];
var sb = new StringBuilder();
sb.AppendLine(CultureInfo.InvariantCulture, $"Run {started:yyyy-MM-dd HH:mm} UTC, {runs} rounds, loopback (counting proxy), {Environment.ProcessorCount} cores, load average at the end {load}.");
sb.AppendLine(CultureInfo.InvariantCulture, $"Image: busybox + python3.11 with its stdlib + dist-packages + {dataMb} MiB of data (3 layers); workload (the image's Cmd) `{string.Join(' ', command)}`.");
sb.AppendLine(CultureInfo.InvariantCulture, $"Set-up: `stargz image optimize` took {oursOptimizeSeconds:F1} s ({oursRecord.Trim()}); `ctr-remote image optimize` {refOptimizeSeconds:F1} s (after `ctr pull`).");
sb.AppendLine();
sb.AppendLine("| image | cold start (rpull + run to exit), median | blob range requests, median | bytes asked for in those ranges, median |");
sb.AppendLine("|---|---|---|---|");
for (var v = 0; v < variants.Length; v++)
    sb.AppendLine(CultureInfo.InvariantCulture,
        $"| {variants[v].Name} | {Median(results[v].Select(x => x.Seconds)):F2} s | {Median(results[v].Select(x => (double)x.Requests)):F0} | {Median(results[v].Select(x => (double)x.Bytes)) / 1048576.0:F1} MiB |");
sb.AppendLine();
sb.AppendLine("Every round: " + string.Join("; ", Enumerable.Range(0, runs).Select(r =>
    string.Join(", ", Enumerable.Range(0, variants.Length).Select(v => string.Create(CultureInfo.InvariantCulture, $"{variants[v].Tag} {results[v][r].Seconds:F2} s"))))));
Console.Write(sb.ToString());
if (outFile is not null) await File.WriteAllTextAsync(outFile, sb.ToString());
return 0;
