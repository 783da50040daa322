using System.Diagnostics;
using System.Formats.Tar;
using System.Globalization;
using System.Text;
using Stargz.Estargz;
using Stargz.Layer;
using Stargz.Registry;
using Stargz.TestSupport;

// A layer whose chunks are all fetched and verified on disk, read through a fresh FUSE mount of it (the daemon's
// FUSE options: page cache, passthrough off), against the same bytes read from a local file on the same disk. The
// layer variants (reads spliced from the chunk files, the older copy through the memory cache, and passthrough on
// with the file's whole-file copy built) and the local file are read in turn, N times, in one process.
// Usage: Stargz.Bench.Layer [--file-mb N] [--repeats R] [--read-ahead-kb K] [--out FILE]
var fileMb = 256;
int? readAheadKb = null;
var repeats = 5;
string? outFile = null;
for (var i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--file-mb": fileMb = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--repeats": repeats = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--read-ahead-kb": readAheadKb = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
        case "--out": outFile = args[++i]; break;
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}

using var work = new TempDir("bench-layer");
var data = new byte[fileMb << 20];
// Half-compressible bytes (as binaries are): random with every other 4 KiB block zeroed.
new Random(42).NextBytes(data);
for (int off = 4096; off < data.Length; off += 8192) Array.Clear(data, off, Math.Min(4096, data.Length - off));
var native = Path.Combine(work.Path, "native.bin");
await File.WriteAllBytesAsync(native, data);

var tar = new MemoryStream();
using (var w = new TarWriter(tar, TarEntryFormat.Pax, leaveOpen: true))
{
    var e = new PaxTarEntry(TarEntryType.RegularFile, "data.bin") { DataStream = new MemoryStream(data), Mode = (UnixFileMode)0x1A4 };
    w.WriteEntry(e);
}
tar.Position = 0;
var blob = new MemoryStream();
var built = await EstargzBuilder.BuildAsync(tar, blob, new BuildOptions { CompressionLevel = 1 }, CancellationToken.None);

await using var registry = await LocalRegistry.StartAsync();
using var client = new RegistryClient();
var pushed = await client.PushBlobAsync(ImageReference.Parse($"{registry.Host}/bench/layer:latest"), blob.ToArray());
var labels = new Dictionary<string, string>
{
    [SnapshotLabels.Reference] = $"{registry.Host}/bench/layer:latest",
    [SnapshotLabels.Digest] = pushed.Digest,
    [SnapshotLabels.TocDigest] = built.TocDigest,
};

var variants = new (string Name, LayerOptions Options, bool Passthrough)[]
{
    ("layer, reads spliced from the chunk files", new LayerOptions { CacheDirectory = work.Sub("cache-splice") }, false),
    ("layer, reads copied through the memory cache", new LayerOptions { CacheDirectory = work.Sub("cache-copy"), SpliceFromChunkFiles = false }, false),
    ("layer, `[fuse] passthrough = true` (whole-file copy)", new LayerOptions { CacheDirectory = work.Sub("cache-passthrough") }, true),
};
var managers = new LayerManager[variants.Length];
int mounts = 0;
try
{
    for (int v = 0; v < variants.Length; v++)
    {
        // The daemon's FUSE options (RemoteLayerWiring), plus the readahead under test if given.
        managers[v] = new LayerManager(client, variants[v].Options,
            new Stargz.Fuse.FuseMountOptions { AllowOther = true, ReadAheadKb = readAheadKb, Passthrough = variants[v].Passthrough });
        // First mount: read everything once (fetched from the registry, verified, written to disk), then unmount.
        var mp = work.Sub($"mnt{mounts++}");
        await managers[v].MountAsync(mp, labels, CancellationToken.None);
        Read(Path.Combine(mp, "data.bin"), data.Length, 1);
        if (variants[v].Passthrough)
        {
            // Once every chunk is on disk (the background fetch has written them), the next open has the whole-file
            // copy built; wait for it.
            var deadline = DateTime.UtcNow.AddMinutes(2);
            while (!managers[v].Layers[0].AllChunksFetched)
            {
                if (DateTime.UtcNow > deadline) throw new TimeoutException("the layer was not fully fetched within 2 minutes");
                await Task.Delay(50);
            }
            File.OpenHandle(Path.Combine(mp, "data.bin")).Dispose();
            while (managers[v].AssembledFilesBuilt == 0)
            {
                if (DateTime.UtcNow > deadline) throw new TimeoutException("the whole-file copy was not built (does the kernel offer FUSE passthrough?)");
                await Task.Delay(50);
            }
        }
        await managers[v].UnmountAsync(mp, CancellationToken.None);
    }
    Read(native, data.Length, 1);

    var readers = new[] { 1, 4 };
    // [reader count][0 = native, 1.. = variants] -> seconds per repeat
    var times = readers.Select(_ => Enumerable.Range(0, variants.Length + 1).Select(_ => new List<double>()).ToArray()).ToArray();
    for (int r = 0; r < repeats; r++)
    {
        for (int k = 0; k < readers.Length; k++)
        {
            times[k][0].Add(Read(native, data.Length, readers[k]));
            for (int v = 0; v < variants.Length; v++)
            {
                // A fresh mount each time: the kernel's page cache of the FUSE file starts empty.
                var mp = work.Sub($"mnt{mounts++}");
                await managers[v].MountAsync(mp, labels, CancellationToken.None);
                times[k][v + 1].Add(Read(Path.Combine(mp, "data.bin"), data.Length, readers[k]));
                await managers[v].UnmountAsync(mp, CancellationToken.None);
            }
        }
    }

    var sb = new StringBuilder();
    sb.AppendLine($"# Reading a fetched layer vs a local file");
    sb.AppendLine();
    sb.AppendLine($"`dotnet run -c Release --project integration/bench/Stargz.Bench.Layer -- --file-mb {fileMb} --repeats {repeats}" +
        (readAheadKb is int ra ? $" --read-ahead-kb {ra}" : "") + "` on " +
        $"{Environment.ProcessorCount} cores, {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC, kernel {File.ReadAllText("/proc/sys/kernel/osrelease").Trim()}.");
    sb.AppendLine($"One {fileMb} MiB file in a layer of {built.Size >> 20} MiB (4 MiB chunks, all fetched and verified on disk), read with 1 MiB " +
        "reads by 1 or 4 threads (each its own part) through a fresh mount (daemon defaults: page cache, passthrough off, unless the row says so);");
    sb.AppendLine($"the local file is the same bytes on the same disk, in the page cache. Median of {repeats} interleaved repeats.");
    sb.AppendLine();
    sb.AppendLine("| read | readers | MiB/s | vs local file |");
    sb.AppendLine("|---|---:|---:|---:|");
    for (int k = 0; k < readers.Length; k++)
    {
        double nativeMedian = Median(times[k][0]);
        sb.AppendLine($"| local file | {readers[k]} | {fileMb / nativeMedian:F0} | 1.00x |");
        for (int v = 0; v < variants.Length; v++)
        {
            double m = Median(times[k][v + 1]);
            sb.AppendLine($"| {variants[v].Name} | {readers[k]} | {fileMb / m:F0} | {nativeMedian / m:F2}x |");
        }
    }
    Console.Write(sb.ToString());
    if (outFile != null) await File.WriteAllTextAsync(outFile, sb.ToString());
    return 0;
}
finally
{
    foreach (var m in managers) if (m != null) await m.DisposeAsync();
    Mounts.UnmountAllUnder(work.Path);
}

static double Median(List<double> xs)
{
    var s = xs.OrderBy(x => x).ToArray();
    return s.Length % 2 == 1 ? s[s.Length / 2] : (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2;
}

// Returns seconds; checks every byte arrived.
static double Read(string path, long size, int readers) => Stargz.Bench.SequentialReader.Read(path, size, readers).Seconds;
