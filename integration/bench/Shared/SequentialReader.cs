using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Stargz.Bench;

/// <summary>
/// The sequential-read workload the benchmarks share: N threads, each pread(2)-ing its own contiguous 1/N of a file in
/// 1 MiB requests into a pinned buffer (page-aligned if asked, as coreutils' buffers are), all started at once.
/// </summary>
internal static class SequentialReader
{
    /// <summary>Reads the whole file; returns the seconds taken and the bytes the process allocated meanwhile.</summary>
    public static (double Seconds, long Allocated) Read(string path, long size, int readers, bool alignedBuffers = false)
    {
        using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        long slice = size / readers;
        var threads = new Thread[readers];
        long total = 0;
        using var go = new ManualResetEventSlim();
        for (int r = 0; r < readers; r++)
        {
            long start = r * slice, end = r == readers - 1 ? size : start + slice;
            var arr = GC.AllocateUninitializedArray<byte>((1 << 20) + (alignedBuffers ? 4096 : 0), pinned: true);
            int skew = alignedBuffers ? (int)((4096 - Marshal.UnsafeAddrOfPinnedArrayElement(arr, 0) % 4096) % 4096) : 0;
            var buf = new ArraySegment<byte>(arr, skew, 1 << 20);
            threads[r] = new Thread(() =>
            {
                go.Wait();
                long got = 0;
                for (long off = start; off < end;)
                {
                    int n = RandomAccess.Read(h, buf.AsSpan(0, (int)Math.Min(buf.Count, end - off)), off);
                    if (n <= 0) throw new IOException($"short read at {off} of {path}");
                    off += n;
                    got += n;
                }
                Interlocked.Add(ref total, got);
            });
            threads[r].Start();
        }
        long allocBefore = GC.GetTotalAllocatedBytes(precise: true);
        var sw = Stopwatch.StartNew();
        go.Set();
        foreach (var t in threads) t.Join();
        sw.Stop();
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - allocBefore;
        if (total != size) throw new IOException($"read {total} of {size} bytes of {path}");
        return (sw.Elapsed.TotalSeconds, allocated);
    }
}
