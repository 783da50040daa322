using System.Diagnostics;
using System.Globalization;
using System.Text;
using Stargz.TestSupport;

// Lazy pull (ctr-remote rpull through our daemon) vs full pull (ctr pull, containerd's overlayfs) of the same image,
// each followed by one container run, alternated N times in one process so both see the same machine load.
// Usage: Stargz.Bench.Pull [--runs N] [--data-mb M] [--out FILE]
var runs = 3;
var dataMb = 128;
string? outFile = null;
for (var i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--runs": runs = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--data-mb": dataMb = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--out": outFile = args[++i]; break;
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}

await using var registry = await LocalRegistry.StartAsync();
using var work = new TempDir("bench-pull");
var layers = TestImages.WritePythonLayers(work.Path, dataMegabytes: dataMb);
var layout = Path.Combine(work.Path, "oci");
await TestImages.BuildAsync(layout, "v1", layers);
await TestImages.PushAsync(layout, "v1", registry.Host, "bench/python:v1");
var plain = $"{registry.Host}/bench/python:v1";
var esgz = $"{registry.Host}/bench/python:esgz";
var command = new[] { "/usr/bin/python3", "-c", "import json, email, http.client, argparse, decimal; print(json.dumps({'ok': True}))" };

var variants = new (string Name, string? DaemonToml)[]
{
    ("full (`ctr pull`, overlayfs)", null),
    ("lazy (`ctr-remote rpull`, stargz, default config)", ""),
    ("lazy, `no_background_fetch = true` (on-demand bytes only)", "no_background_fetch = true\n"),
};
var results = variants.Select(_ => new List<(double Seconds, double Bytes)>()).ToArray();
long imageBytes = 0, plainBytes = 0;
for (var r = 0; r < runs; r++)
{
    for (var v = 0; v < variants.Length; v++)
    {
        // Fresh daemon, containerd and cache every time: cold pulls only.
        var metricsPort = LocalRegistry.FreePort();
        await using var daemon = await LocalDaemon.StartAsync($"metrics_address = \"127.0.0.1:{metricsPort}\"\n{variants[v].DaemonToml}");
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
        if (r == 0 && v == 0)
        {
            await ctd.ConvertWithReferenceAsync(plain, esgz);
            imageBytes = await LayerBytesAsync(registry.Host, "bench/python", "esgz");
            plainBytes = await LayerBytesAsync(registry.Host, "bench/python", "v1");
        }
        await ctd.CtrAsync("images", "rm", "--sync", plain, esgz);
        await ctd.CtrAsync("content", "prune", "references");
        var sw = Stopwatch.StartNew();
        if (variants[v].DaemonToml is null)
        {
            (await ctd.CtrAsync("image", "pull", "--plain-http", plain)).EnsureSuccess("ctr pull");
            (await ctd.CtrAsync(["run", "--rm", plain, $"full-{r}", .. command])).EnsureSuccess("ctr run (full)");
            results[v].Add((sw.Elapsed.TotalSeconds, plainBytes));
        }
        else
        {
            (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", esgz)).EnsureSuccess("ctr-remote rpull");
            (await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", esgz, $"lazy-{r}", .. command])).EnsureSuccess("ctr run (lazy)");
            var seconds = sw.Elapsed.TotalSeconds;
            results[v].Add((seconds, await MetricAsync(metricsPort, "stargz_layer_fetched_bytes")));
        }
        Console.Error.WriteLine($"run {r + 1}/{runs} {variants[v].Name}: {results[v][^1].Seconds:F2} s, {results[v][^1].Bytes / 1048576.0:F1} MiB");
    }
}

static double Median(IEnumerable<double> xs) { var a = xs.OrderBy(x => x).ToArray(); return a[a.Length / 2]; }
var baseS = Median(results[0].Select(x => x.Seconds));
var baseB = Median(results[0].Select(x => x.Bytes));
var sb = new StringBuilder();
sb.AppendLine("# Lazy pull vs full pull");
sb.AppendLine();
sb.AppendLine($"`dotnet run -c Release --project integration/bench/Stargz.Bench.Pull -- --runs {runs} --data-mb {dataMb}` on {Environment.ProcessorCount} cores, {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC.");
sb.AppendLine($"Image: busybox + python3.11 and its stdlib + dist-packages + {dataMb} MiB of data (3 layers; {plainBytes / 1048576.0:F0} MiB gzip, {imageBytes / 1048576.0:F0} MiB as eStargz by ctr-remote).");
sb.AppendLine("Time from pull start until `python3 -c 'import json, email, http.client, argparse, decimal'` in a new container has exited;");
sb.AppendLine($"median of {runs} interleaved cold runs (fresh containerd, daemon and chunk cache each time). Bytes: layer bytes fetched from");
sb.AppendLine("the registry by the time the container exited (full pull: every layer blob; lazy: our daemon's stargz_layer_fetched_bytes).");
sb.AppendLine();
sb.AppendLine("| pull | seconds to container exit | layer bytes fetched | time vs full pull | bytes vs full pull |");
sb.AppendLine("|---|---:|---:|---:|---:|");
for (var v = 0; v < variants.Length; v++)
{
    var sec = Median(results[v].Select(x => x.Seconds));
    var bytes = Median(results[v].Select(x => x.Bytes));
    sb.AppendLine($"| {variants[v].Name} | {sec:F2} | {bytes / 1048576.0:F1} MiB | {sec / baseS:F2}x | {bytes / baseB:F2}x |");
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

static Task<double> MetricAsync(int port, string name) => DaemonMetrics.ReadAsync(port, name);
