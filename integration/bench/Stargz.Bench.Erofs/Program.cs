using System.Buffers;
using System.Diagnostics;
using System.Formats.Tar;
using System.Globalization;
using System.Text;
using Stargz.Estargz;
using Stargz.Layer;
using Stargz.Registry;
using Stargz.TestSupport;

// One fully fetched layer of many files, three ways: through its FUSE mount (the daemon's FUSE options, every chunk
// verified on disk), through its promoted EROFS image ([erofs] promote), and the same tree written to local disk (ext4
// here) under overlayfs, as containerd's overlayfs snapshotter would serve it. Two workloads per mount: `find` + `stat`
// (readdir of every dir and lstat of every entry, in process) and reading every file once (1 MiB reads), each through
// a fresh overlayfs mount over the variant (a new container's rootfs). The layer's own mount stays mounted across
// repeats, as in the daemon (--cold: a fresh one each repeat, so its caches start cold); the backing data (chunk
// files, image file, local files) stays in the page cache for all three alike. Variants interleaved; medians reported.
// Usage: Stargz.Bench.Erofs [--files N] [--repeats R] [--cold] [--out FILE]
var files = 8000;
var repeats = 7;
var cold = false;
string? outFile = null;
for (var i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--files": files = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--repeats": repeats = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--out": outFile = args[++i]; break;
        case "--cold": cold = true; break;
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}

using var work = new TempDir("bench-erofs");
// The tree: files/20 dirs of 20 files; 90% small (1-16 KiB), 10% medium (64-256 KiB), plus 4 files of 8 MiB.
// Half-compressible bytes (as binaries are).
var rng = new Random(42);
var local = work.Sub("local");
var tar = new MemoryStream();
long totalBytes = 0;
using (var w = new TarWriter(tar, TarEntryFormat.Pax, leaveOpen: true))
{
    void Add(string rel, int size)
    {
        var data = new byte[size];
        rng.NextBytes(data);
        for (int off = 4096; off < data.Length; off += 8192) Array.Clear(data, off, Math.Min(4096, data.Length - off));
        var path = Path.Combine(local, rel);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllBytes(path, data);
        w.WriteEntry(new PaxTarEntry(TarEntryType.RegularFile, rel) { DataStream = new MemoryStream(data), Mode = (UnixFileMode)0x1A4 });
        totalBytes += size;
    }
    for (int f = 0; f < files; f++)
        Add($"d{f / 20 / 20:D3}/s{f / 20 % 20:D2}/f{f % 20:D2}.bin", f % 10 == 0 ? rng.Next(64 << 10, 256 << 10) : rng.Next(1 << 10, 16 << 10));
    for (int b = 0; b < 4; b++) Add($"big/b{b}.bin", 8 << 20);
}
tar.Position = 0;
var blob = new MemoryStream();
var built = await EstargzBuilder.BuildAsync(tar, blob, new BuildOptions { CompressionLevel = 1 }, CancellationToken.None);

await using var registry = await LocalRegistry.StartAsync();
using var client = new RegistryClient();
var pushed = await client.PushBlobAsync(ImageReference.Parse($"{registry.Host}/bench/erofs:latest"), blob.ToArray());
var labels = new Dictionary<string, string>
{
    [SnapshotLabels.Reference] = $"{registry.Host}/bench/erofs:latest",
    [SnapshotLabels.Digest] = pushed.Digest,
    [SnapshotLabels.TocDigest] = built.TocDigest,
};
var fuseOptions = new Stargz.Fuse.FuseMountOptions { AllowOther = true, AttrTimeout = TimeSpan.FromSeconds(1), EntryTimeout = TimeSpan.FromSeconds(1) };
await using var fuse = new LayerManager(client, new LayerOptions { CacheDirectory = work.Sub("cache-fuse"), BackgroundPause = TimeSpan.Zero }, fuseOptions);
await using var promoted = new LayerManager(client,
    new LayerOptions { CacheDirectory = Path.Combine(work.Sub("promoted"), "cache"), BackgroundPause = TimeSpan.Zero, PromoteToErofs = true }, fuseOptions);
var empty = work.Sub("empty");
var mounts = 0;

// Fetch both layers fully; the second one is promoted.
foreach (var (m, promote) in new[] { (fuse, false), (promoted, true) })
{
    var mp = work.Sub($"mnt{mounts++}");
    await m.MountAsync(mp, labels, CancellationToken.None);
    var deadline = DateTime.UtcNow.AddMinutes(5);
    while (promote ? !m.IsPromoted(mp) : !m.Layers[0].AllChunksFetched)
    {
        if (DateTime.UtcNow > deadline) throw new TimeoutException(promote ? "the layer was not promoted within 5 minutes" : "not fully fetched within 5 minutes");
        if (m.Layers[0].PromotionError is { } e) throw new InvalidOperationException("promotion failed: " + e);
        await Task.Delay(100);
    }
    await m.UnmountAsync(mp, CancellationToken.None);
}

// The lower mounts of FUSE and promoted layers: one each for the whole run (warm), as the daemon keeps a layer mounted
// while containers come and go; with --cold, a fresh one for every repeat.
var lowers = new string?[2];
async Task<string> LowerAsync(int variant)
{
    if (variant == 2) return local;
    if (lowers[variant] is { } mounted) return mounted;
    var mp = work.Sub($"mnt{mounts++}");
    await (variant == 0 ? fuse : promoted).MountAsync(mp, labels, CancellationToken.None);
    return lowers[variant] = mp;
}

async Task DropLowerAsync(int variant)
{
    if (variant == 2 || lowers[variant] is not { } mp) return;
    await (variant == 0 ? fuse : promoted).UnmountAsync(mp, CancellationToken.None);
    lowers[variant] = null;
}

// A container's rootfs: a fresh read-only overlay over the layer's lower dir (and an empty one: overlayfs wants two
// lower dirs without an upper dir).
async Task<string> MountAsync(int variant)
{
    var lower = await LowerAsync(variant);
    var mp = work.Sub($"ovl{mounts++}");
    (await ProcessRunner.RunAsync("mount", ["-t", "overlay", "overlay", "-o", $"ro,lowerdir={lower}:{empty}", mp])).EnsureSuccess("mount overlay");
    return mp;
}

async Task UnmountAsync(int variant, string mp)
{
    (await ProcessRunner.RunAsync("umount", [mp])).EnsureSuccess("umount overlay");
    if (cold) await DropLowerAsync(variant);
}

// `find` + `stat` in process (no process start in the time): readdir of every dir, lstat of every entry.
static (double Seconds, long Entries) FindStat(string root)
{
    var sw = Stopwatch.StartNew();
    long n = 0, sum = 0;
    foreach (var e in new DirectoryInfo(root).EnumerateFileSystemInfos("*", SearchOption.AllDirectories))
    {
        sum += (long)e.UnixFileMode + e.LastWriteTimeUtc.Ticks % 7 + (e is FileInfo fi ? fi.Length : 0);
        n++;
    }
    GC.KeepAlive(sum);
    return (sw.Elapsed.TotalSeconds, n);
}

static (double Seconds, long Bytes) ReadAll(string root)
{
    var buf = ArrayPool<byte>.Shared.Rent(1 << 20);
    long bytes = 0;
    var sw = Stopwatch.StartNew();
    foreach (var f in Directory.EnumerateFiles(root, "*", SearchOption.AllDirectories))
    {
        using var h = File.OpenHandle(f, FileMode.Open, FileAccess.Read);
        long off = 0;
        int n;
        while ((n = RandomAccess.Read(h, buf, off)) > 0) off += n;
        bytes += off;
    }
    var s = sw.Elapsed.TotalSeconds;
    ArrayPool<byte>.Shared.Return(buf);
    return (s, bytes);
}

long expectedEntries = -1;
{
    var (_, n) = FindStat(local);
    expectedEntries = n;
}
string[] names = ["overlayfs over the FUSE layer (fetched)", "overlayfs over the promoted EROFS image", "overlayfs over local disk (ext4)"];
var findTimes = names.Select(_ => new List<double>()).ToArray();
var readTimes = names.Select(_ => new List<double>()).ToArray();
for (int r = 0; r < repeats; r++)
{
    for (int v = 0; v < names.Length; v++)
    {
        var mp = await MountAsync(v);
        try
        {
            var (fs, entries) = FindStat(mp);
            if (entries != expectedEntries) throw new InvalidOperationException($"{names[v]}: {entries} entries, the layer has {expectedEntries}");
            findTimes[v].Add(fs);
            var (s, bytes) = ReadAll(mp);
            if (bytes != totalBytes) throw new InvalidOperationException($"{names[v]}: read {bytes} bytes, the layer has {totalBytes}");
            readTimes[v].Add(s);
        }
        finally { await UnmountAsync(v, mp); }
    }
}

static double Median(List<double> xs)
{
    var s = xs.Order().ToList();
    return s.Count % 2 == 1 ? s[s.Count / 2] : (s[s.Count / 2 - 1] + s[s.Count / 2]) / 2;
}

var sb = new StringBuilder();
sb.AppendLine($"{files + 4} files ({totalBytes / (1 << 20)} MiB) in {files / 400 + files / 20 + 2} dirs; blob {blob.Length / (1 << 20)} MiB; " +
    $"{Environment.ProcessorCount} cores, kernel {Environment.OSVersion.Version}; median of {repeats} interleaved repeats; " +
    (cold ? "fresh layer mounts every repeat (cold)." : "layer mounts kept, fresh overlay every repeat (warm)."));
sb.AppendLine();
sb.AppendLine("| variant | find + stat (ms) | vs overlayfs | read every file (ms) | MiB/s | vs overlayfs |");
sb.AppendLine("|---|---:|---:|---:|---:|---:|");
var baseFind = Median(findTimes[2]);
var baseRead = Median(readTimes[2]);
for (int v = 0; v < names.Length; v++)
{
    var f = Median(findTimes[v]);
    var rd = Median(readTimes[v]);
    // "vs overlayfs" is speed relative to overlayfs on local disk: its time over this one's (1.00x = as fast).
    sb.AppendLine(CultureInfo.InvariantCulture, $"| {names[v]} | {f * 1000:0} | {baseFind / f:0.00}x | {rd * 1000:0} | {totalBytes / (1 << 20) / rd:0} | {baseRead / rd:0.00}x |");
}
for (int v = 0; v < 2; v++) await DropLowerAsync(v);
Console.Write(sb.ToString());
if (outFile != null) await File.WriteAllTextAsync(outFile, sb.ToString());
return 0;
