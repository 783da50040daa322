using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.InteropServices;

namespace Stargz.Bench.Pull;

/// <summary>
/// What a daemon holds on disk under its root, as <c>du -s</c> counts it: allocated blocks (st_blocks × 512) of every
/// file and directory, each inode once, not crossing into mounts (the layers' FUSE and EROFS mounts under the root are
/// what the daemon serves, not what it stores; walking into a FUSE mount would also make the daemon answer lookups).
/// </summary>
public static class DiskUsage
{
    public sealed record Sample(long Allocated, long Apparent, int PromotedMarkers, IReadOnlyDictionary<string, long> ByDir);

    /// <summary>Walks <paramref name="root"/>; <c>ByDir</c> holds the allocated bytes by the first two path components
    /// below it (stargz/cache, stargz/erofs, stargz/httpcache, snapshotter/..., metadata.db, ...).</summary>
    public static Sample Measure(string root)
    {
        var mounts = MountPointsUnder(root);
        var seen = new HashSet<(ulong, ulong)>();
        var byDir = new Dictionary<string, long>(StringComparer.Ordinal);
        long allocated = 0, apparent = 0;
        var promoted = 0;
        var buf = new byte[256];
        var stack = new Stack<string>();
        stack.Push(root);
        while (stack.Count > 0)
        {
            var dir = stack.Pop();
            if (!Stat(dir, buf, out var dirStat)) continue;
            if (seen.Add((dirStat.Dev, dirStat.Ino)))
            {
                allocated += dirStat.Blocks * 512;
                Add(byDir, Group(root, dir), dirStat.Blocks * 512);
            }
            IEnumerable<string> entries;
            try { entries = Directory.EnumerateFileSystemEntries(dir); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { continue; } // removed meanwhile
            try
            {
                foreach (var e in entries)
                {
                    if (mounts.Contains(e)) continue;
                    if (!Stat(e, buf, out var st)) continue;
                    if ((st.Mode & 0xF000) == 0x4000) { stack.Push(e); continue; } // S_IFDIR
                    if (e.EndsWith(".promoted", StringComparison.Ordinal)) promoted++;
                    if (!seen.Add((st.Dev, st.Ino))) continue; // hard links count once
                    allocated += st.Blocks * 512;
                    if ((st.Mode & 0xF000) == 0x8000) apparent += st.Size; // S_IFREG
                    Add(byDir, Group(root, e), st.Blocks * 512);
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or DirectoryNotFoundException) { }
        }
        return new Sample(allocated, apparent, promoted, byDir);
    }

    /// <summary>"stargz/cache 181.0 MiB, stargz/erofs 3.1 MiB, ..." largest first (groups under 0.05 MiB left out).</summary>
    public static string Breakdown(IReadOnlyDictionary<string, long> byDir)
    {
        var items = new List<KeyValuePair<string, long>>(byDir);
        items.Sort((a, b) => b.Value.CompareTo(a.Value));
        var parts = new List<string>();
        foreach (var (k, v) in items)
            if (v >= 52_429) parts.Add(string.Create(CultureInfo.InvariantCulture, $"{k} {v / 1048576.0:F1} MiB"));
        return parts.Count == 0 ? "—" : string.Join(", ", parts);
    }

    private static string Group(string root, string path)
    {
        var rel = Path.GetRelativePath(root, path);
        if (rel == ".") return "(root)";
        var first = rel.IndexOf('/');
        if (first < 0) return rel;
        var second = rel.IndexOf('/', first + 1);
        return second < 0 ? rel : rel[..second];
    }

    private static void Add(Dictionary<string, long> d, string k, long v)
    {
        d.TryGetValue(k, out var x);
        d[k] = x + v;
    }

    private static HashSet<string> MountPointsUnder(string root)
    {
        var set = new HashSet<string>(StringComparer.Ordinal);
        var prefix = root.TrimEnd('/') + "/";
        foreach (var line in File.ReadLines("/proc/self/mountinfo"))
        {
            // Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            var f = line.Split(' ');
            if (f.Length < 5) continue;
            var mp = Unescape(f[4]);
            if (mp.StartsWith(prefix, StringComparison.Ordinal)) set.Add(mp);
        }
        return set;
    }

    private static string Unescape(string s)
    {
        if (!s.Contains('\\', StringComparison.Ordinal)) return s;
        var sb = new System.Text.StringBuilder(s.Length);
        for (var i = 0; i < s.Length; i++)
        {
            if (s[i] == '\\' && i + 3 < s.Length)
            {
                sb.Append((char)Convert.ToInt32(s.Substring(i + 1, 3), 8));
                i += 3;
            }
            else sb.Append(s[i]);
        }
        return sb.ToString();
    }

    private readonly record struct StatInfo(ulong Dev, ulong Ino, uint Mode, long Size, long Blocks);

    // struct stat of x86_64 Linux (glibc): st_dev @0, st_ino @8, st_nlink @16, st_mode @24, st_size @48, st_blocks @64.
    private static bool Stat(string path, byte[] buf, out StatInfo st)
    {
        if (lstat(path, buf) != 0) { st = default; return false; }
        st = new StatInfo(
            BinaryPrimitives.ReadUInt64LittleEndian(buf.AsSpan(0)),
            BinaryPrimitives.ReadUInt64LittleEndian(buf.AsSpan(8)),
            BinaryPrimitives.ReadUInt32LittleEndian(buf.AsSpan(24)),
            BinaryPrimitives.ReadInt64LittleEndian(buf.AsSpan(48)),
            BinaryPrimitives.ReadInt64LittleEndian(buf.AsSpan(64)));
        return true;
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int lstat(string path, [Out] byte[] buf);
}

/// <summary>Samples a daemon root's disk use every <see cref="Interval"/> until disposed, keeping the peak.</summary>
public sealed class DiskSampler : IAsyncDisposable
{
    private readonly string _root;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;
    private long _peak;

    public DiskSampler(string root, TimeSpan interval)
    {
        _root = root;
        Interval = interval;
        _loop = Task.Run(LoopAsync);
    }

    public TimeSpan Interval { get; set; }
    public long Peak => Interlocked.Read(ref _peak);
    /// <summary>Returns the peak so far and starts a new one from now (the next sample).</summary>
    public long TakePeak() => Interlocked.Exchange(ref _peak, 0);

    private async Task LoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            var s = DiskUsage.Measure(_root).Allocated;
            long p;
            while (s > (p = Interlocked.Read(ref _peak)) && Interlocked.CompareExchange(ref _peak, s, p) != p) { }
            try { await Task.Delay(Interval, _stop.Token); } catch (OperationCanceledException) { }
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await _loop;
        _stop.Dispose();
    }
}
