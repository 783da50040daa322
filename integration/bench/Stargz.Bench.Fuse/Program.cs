// FUSE benchmark: the same tree on tmpfs and on our FUSE server (page cache, direct I/O, passthrough), reported as ratios.
// Run as root:  dotnet run -c Release --project integration/bench/Stargz.Bench.Fuse -- [--size-mib N] [--entries N] [--out FILE]
using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using Stargz.Fuse;
using Stargz.Fuse.Samples;

long sizeMib = 1024;
int entries = 100_000;
int repeats = 5;
int? readAheadKb = 1024;
int readerThreads = 4;
int maxReadKb = 1024;
bool alignedBuffers = true;
string? outFile = null;
var workloads = new HashSet<string> { "generator", "bytes", "file", "find" };
for (int i = 0; i < args.Length; i++)
{
    switch (args[i])
    {
        case "--size-mib": sizeMib = long.Parse(args[++i]); break;
        case "--entries": entries = int.Parse(args[++i]); break;
        case "--repeats": repeats = int.Parse(args[++i]); break;
        case "--out": outFile = args[++i]; break;
        case "--readahead-kb": readAheadKb = int.Parse(args[++i]) is var ra && ra > 0 ? ra : null; break;
        case "--threads": readerThreads = int.Parse(args[++i]); break;
        case "--max-read-kb": maxReadKb = int.Parse(args[++i]); break;
        // Reader buffers are page-aligned by default, as coreutils cat/cp/dd allocate theirs. This keeps .NET's
        // unaligned arrays instead: a 1 MiB buffer then spans 257 pages, which a direct-I/O read splits into two READs
        // (max_pages is capped at 256 by fs.fuse.max_pages_limit).
        case "--unaligned-buffers": alignedBuffers = false; break;
        // A subset of the workloads, e.g. "--only file,find" (default: all of generator, bytes, file, find).
        case "--only": workloads = [.. args[++i].Split(',')]; break;
        case "--generator-only":
        {
            // How fast the server can produce the bytes it serves without passthrough (one core).
            var gbuf = new byte[1 << 20];
            var gsw = Stopwatch.StartNew();
            for (long off = 0; off < 1L << 30; off += gbuf.Length) TestPattern.Fill(off, gbuf);
            Console.WriteLine($"generator: {1024 / gsw.Elapsed.TotalSeconds:N0} MiB/s");
            return 0;
        }
        default: Console.Error.WriteLine($"unknown argument {args[i]}"); return 2;
    }
}
if (Environment.UserName != "root") { Console.Error.WriteLine("run as root (mounts tmpfs and FUSE)"); return 2; }

long size = sizeMib << 20;
const int DirFanout = 1000;
var work = Path.Combine(Path.GetTempPath(), $"stargz-bench-fuse-{Guid.NewGuid():N}");
var tmpfs = Path.Combine(work, "tmpfs");
var mnt = Path.Combine(work, "mnt");
Directory.CreateDirectory(tmpfs);
Directory.CreateDirectory(mnt);
Run("mount", "-t", "tmpfs", "-o", $"size={sizeMib + 512}m", "tmpfs", tmpfs);
var rows = new List<string[]>();
var filesystems = new List<MemoryFileSystem>(); // disposed before tmpfs is unmounted: they hold its files open
try
{
    Console.Error.WriteLine($"preparing {sizeMib} MiB file and {entries} entries on tmpfs ...");
    var large = Path.Combine(tmpfs, "large.bin");
    using (var fsOut = new FileStream(large, FileMode.Create, FileAccess.Write, FileShare.None, 0))
    {
        var buf = new byte[1 << 20];
        for (long off = 0; off < size; off += buf.Length)
        {
            TestPattern.Fill(off, buf);
            fsOut.Write(buf);
        }
    }
    var tree = Path.Combine(tmpfs, "tree");
    for (int i = 0; i < entries; i++)
    {
        var d = Path.Combine(tree, $"d{i / DirFanout:D4}");
        if (i % DirFanout == 0) Directory.CreateDirectory(d);
        File.WriteAllBytes(Path.Combine(d, $"f{i % DirFanout:D4}"), []);
    }

    MemoryFileSystem BuildFs(bool backed, bool directIo = false)
    {
        var fs = new MemoryFileSystem();
        filesystems.Add(fs);
        if (backed) fs.AddBackedFile("large.bin", large);
        else fs.AddGeneratedFile("large.bin", size, TestPattern.Fill).DirectIo = directIo;
        for (int i = 0; i < entries; i++) fs.AddFile($"tree/d{i / DirFanout:D4}/f{i % DirFanout:D4}", Array.Empty<byte>());
        return fs;
    }

    var fsPlain = BuildFs(backed: false);
    var fsBacked = BuildFs(backed: true);
    // Direct I/O is a per-open choice of the filesystem; only the big file needs it (metadata is unaffected).
    var fsDirect = BuildFs(backed: false, directIo: true);

    // One FUSE run on a fresh mount, so nothing is served from a warm page or dentry cache.
    double OnFuse(string label, MemoryFileSystem fs, bool passthrough, Func<string, double> measure, int maxRead)
    {
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions
        {
            Passthrough = passthrough, AllowOther = true, ReadAheadKb = readAheadKb, ReaderThreads = readerThreads,
            MaxRead = maxRead,
        });
        if (passthrough && !server.PassthroughNegotiated) throw new InvalidOperationException("passthrough not negotiated");
        var secs = measure(mnt);
        long allocated = Alloc.Last;
        long requests = 0;
        for (int op = 1; op < 64; op++) requests += server.RequestCount(op);
        Console.Error.WriteLine($"  {label} {secs:0.000}s: READ {server.ReadRequests} (spliced {server.SplicedReads}), LOOKUP {server.RequestCount(1)}, " +
            $"GETATTR {server.RequestCount(3)}, READDIRPLUS {server.RequestCount(44)}, READDIR {server.RequestCount(28)}, " +
            $"direct-I/O opens {server.DirectIoOpens}, passthrough opens {server.PassthroughOpens}; " +
            $"{allocated} B allocated in the timed section (whole process) = {(double)allocated / Math.Max(1, requests):0.0} B/request");
        return secs;
    }

    // The machine is shared and noisy: interleave tmpfs and the FUSE modes run by run and keep each one's best.
    // `direct` null: that mode is not run (NaN in the result).
    (double T, double F, double D, double P) Compare(Func<string, double> measure, MemoryFileSystem cached,
        MemoryFileSystem? direct, bool passthrough, int? maxRead = null)
    {
        int mr = maxRead ?? maxReadKb * 1024;
        double t = double.MaxValue, f = double.MaxValue, d = double.MaxValue, p = double.MaxValue;
        for (int r = 0; r < repeats; r++)
        {
            t = Math.Min(t, measure(tmpfs));
            f = Math.Min(f, OnFuse("fuse", cached, false, measure, mr));
            if (direct != null) d = Math.Min(d, OnFuse("fuse-dio", direct, false, measure, mr));
            if (passthrough) p = Math.Min(p, OnFuse("fuse+pt", fsBacked, true, measure, mr));
        }
        return (t, f, direct != null ? d : double.NaN, passthrough ? p : double.NaN);
    }

    foreach (var readers in workloads.Contains("generator") ? new[] { 1, 4, 16 } : [])
    {
        var (t, f, d, p) = Compare(root => SequentialRead(Path.Combine(root, "large.bin"), size, readers), fsPlain, fsDirect, true);
        rows.Add(Row($"sequential read {sizeMib} MiB, {readers} reader(s)", size / t, size / f, size / d, size / p, "MiB/s", 1.0 / (1 << 20)));
    }
    if (workloads.Contains("file"))
    {
        // Passthrough off, the same tmpfs file behind it: the server splices each reply from that file
        // (TryReadFromFile), so the bytes never enter the server's memory; the kernel copies them once.
        MemoryFileSystem FileFs(bool directIo)
        {
            var fs = new MemoryFileSystem();
            filesystems.Add(fs);
            var n = fs.AddBackedFile("large.bin", large);
            n.OfferPassthrough = false;
            n.DirectIo = directIo;
            return fs;
        }
        var fsFile = FileFs(false);
        var fsFileDirect = FileFs(true);
        // A max_read the process can splice whole (see LargestSplicedRead), so no reply falls back to pread.
        int maxRead = Math.Min(maxReadKb * 1024, FuseServer.LargestSplicedRead / 4096 * 4096);
        foreach (var readers in new[] { 1, 4, 16 })
        {
            var (t, f, d, p) = Compare(root => SequentialRead(Path.Combine(root, "large.bin"), size, readers), fsFile, fsFileDirect, false, maxRead);
            rows.Add(Row($"sequential read {sizeMib} MiB from a local file (spliced, max_read {maxRead >> 10} KiB, passthrough off), {readers} reader(s)",
                size / t, size / f, size / d, size / p, "MiB/s", 1.0 / (1 << 20)));
        }
    }
    if (workloads.Contains("bytes"))
    {
        // The same bytes held in a byte[]: replies are gathered from it with writev (TryReadDirect), no server copy.
        var bytes = File.ReadAllBytes(large);
        var fsMem = new MemoryFileSystem();
        fsMem.AddFile("large.bin", bytes);
        var fsMemDirect = new MemoryFileSystem();
        fsMemDirect.AddFile("large.bin", bytes).DirectIo = true;
        foreach (var readers in new[] { 1, 4, 16 })
        {
            var (t, f, d, p) = Compare(root => SequentialRead(Path.Combine(root, "large.bin"), size, readers), fsMem, fsMemDirect, false);
            rows.Add(Row($"sequential read {sizeMib} MiB from a byte[] (zero-copy reply), {readers} reader(s)",
                size / t, size / f, size / d, size / p, "MiB/s", 1.0 / (1 << 20)));
        }
    }
    if (workloads.Contains("find"))
    {
        var total = entries + (entries + DirFanout - 1) / DirFanout + 1; // files + their directories + the tree root
        var (t, f, d, p) = Compare(root => FindStat(Path.Combine(root, "tree"), total), fsPlain, null, true);
        rows.Add(Row($"find + stat over {entries:N0} entries", total / t, total / f, total / d, total / p, "entries/s", 1));
    }
}
finally
{
    foreach (var fs in filesystems) fs.Dispose();
    Run("umount", tmpfs);
    Directory.Delete(work, recursive: true);
}

var header = $"""
    | workload | tmpfs | FUSE (page cache) | FUSE / tmpfs | FUSE direct I/O | direct I/O / tmpfs | FUSE + passthrough | passthrough / tmpfs |
    |---|---|---|---|---|---|---|---|
    """;
var table = header + "\n" + string.Join("\n", rows.Select(r => "| " + string.Join(" | ", r) + " |"));
var md = $"""
    # FUSE benchmark (Stargz.Fuse vs tmpfs)

    `dotnet run -c Release --project integration/bench/Stargz.Bench.Fuse -- --out integration/bench/fuse-results.md`
    on {Environment.ProcessorCount} cores, Linux {Environment.OSVersion.Version}, {DateTime.UtcNow:yyyy-MM-dd}.
    Best of {repeats} interleaved runs (the machine is shared with other builds, so single runs are noisy); each FUSE run
    on a fresh mount (cold page and dentry cache); tmpfs is always warm (it is memory). Server: {readerThreads} reader
    threads on cloned fds, read_ahead_kb {readAheadKb?.ToString() ?? "kernel default"}, max_read {maxReadKb} KiB.
    Modes: "page cache" is the default open (the kernel fills page-cache pages from READ replies, readers copy
    from those); "direct I/O" opens the big file with FOPEN_DIRECT_IO (FuseOpenResult.DirectIo: the kernel copies
    each reply straight into the reader's buffer, no page cache); with passthrough the kernel reads the tmpfs copy.
    Without passthrough the server produces the bytes with a generator (a memory copy into the reply buffer);
    "from a local file" serves them from the same tmpfs file as passthrough, with passthrough off: each reply is
    spliced from that file (TryReadFromFile: the kernel copies the file's pages once, the server never touches them);
    "from a byte[]" serves them from one managed array through TryReadDirect (writev straight from the array).
    Sequential read: N threads each pread(2) a contiguous 1/N of the file in 1 MiB requests into
    {(alignedBuffers ? "page-aligned buffers (as cat/cp/dd use)" : "ordinary pinned .NET arrays, not page-aligned (--unaligned-buffers)")}.
    find + stat: `find DIR -printf '%s %m %n'` (one lstat per entry) over 100 directories of 1,000 empty files.
    Ratios are throughput relative to tmpfs (1.00 = as fast as tmpfs).

    {table}
    """;
Console.WriteLine(md);
if (outFile != null) File.WriteAllText(outFile, md + "\n");
return 0;

// A NaN rate is a mode that was not run for this workload: shown as a dash.
static string[] Row(string name, double tmpfsRate, double fuseRate, double dioRate, double ptRate, string unit, double scale)
    => [name, $"{tmpfsRate * scale:N0} {unit}", $"{fuseRate * scale:N0} {unit}", $"{fuseRate / tmpfsRate:0.00}x",
        double.IsNaN(dioRate) ? "—" : $"{dioRate * scale:N0} {unit}", double.IsNaN(dioRate) ? "—" : $"{dioRate / tmpfsRate:0.00}x",
        double.IsNaN(ptRate) ? "—" : $"{ptRate * scale:N0} {unit}", double.IsNaN(ptRate) ? "—" : $"{ptRate / tmpfsRate:0.00}x"];

// Returns seconds.
double SequentialRead(string path, long size, int readers) => SequentialReadWith(path, size, readers, alignedBuffers);

static double SequentialReadWith(string path, long size, int readers, bool aligned)
{
    var (seconds, allocated) = Stargz.Bench.SequentialReader.Read(path, size, readers, aligned);
    Alloc.Last = allocated;
    return seconds;
}

static double FindStat(string dir, int expected)
{
    var sw = Stopwatch.StartNew();
    var psi = new ProcessStartInfo("find") { RedirectStandardOutput = true, UseShellExecute = false };
    psi.ArgumentList.Add(dir);
    psi.ArgumentList.Add("-printf");
    psi.ArgumentList.Add("%s %m %n\n");
    long allocBefore = GC.GetTotalAllocatedBytes(precise: true);
    using var p = Process.Start(psi)!;
    int lines = 0;
    var buf = new byte[1 << 16];
    var stdout = p.StandardOutput.BaseStream;
    for (int n; (n = stdout.Read(buf)) > 0;) lines += buf.AsSpan(0, n).Count((byte)'\n');
    p.WaitForExit();
    sw.Stop();
    Alloc.Last = GC.GetTotalAllocatedBytes(precise: true) - allocBefore;
    if (p.ExitCode != 0 || lines != expected) throw new IOException($"find: exit {p.ExitCode}, {lines} of {expected} entries");
    return sw.Elapsed.TotalSeconds;
}

static void Run(string file, params string[] a)
{
    var psi = new ProcessStartInfo(file) { UseShellExecute = false };
    foreach (var x in a) psi.ArgumentList.Add(x);
    using var p = Process.Start(psi)!;
    p.WaitForExit();
    if (p.ExitCode != 0) throw new InvalidOperationException($"{file} {string.Join(' ', a)} exited {p.ExitCode}");
}

static class Alloc
{
    /// <summary>Bytes the whole process allocated during the last timed section (server and benchmark together).</summary>
    public static long Last;
}
