using System.Collections.Concurrent;
using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

public sealed class AsyncReadTests
{
    /// <summary>Serves the sample tree but finishes every read after a random delay, so replies overtake each other.</summary>
    private sealed class SlowReads(MemoryFileSystem inner) : IFuseFileSystem
    {
        private readonly ConcurrentDictionary<long, byte> _pending = new();
        public int OutOfOrder;
        public int Lookup(ulong parent, ReadOnlySpan<byte> name, out FuseEntry entry) => inner.Lookup(parent, name, out entry);
        public int GetAttr(ulong ino, out FuseAttr attr) => inner.GetAttr(ino, out attr);
        public int ReadDir(ulong ino, ulong handle, long offset, FuseDirWriter writer) => inner.ReadDir(ino, handle, offset, writer);
        public int Open(ulong ino, int flags, out FuseOpenResult result) => inner.Open(ino, flags, out result);

        public async ValueTask<int> ReadAsync(ulong ino, ulong handle, long offset, Memory<byte> destination, CancellationToken ct)
        {
            _pending[offset] = 0;
            await Task.Delay(Random.Shared.Next(0, 4), ct);
            _pending.TryRemove(offset, out _);
            foreach (var other in _pending.Keys)
                if (other < offset) { Interlocked.Increment(ref OutOfOrder); break; }
            return await inner.ReadAsync(ino, handle, offset, destination, ct);
        }
    }

    [Fact]
    public async Task Reads_that_complete_out_of_order_still_return_the_right_bytes()
    {
        Requires.Fuse();
        const long size = 64L << 20;
        var mem = new MemoryFileSystem();
        mem.AddGeneratedFile("data.bin", size, TestPattern.Fill);
        var fs = new SlowReads(mem);
        using var dir = new TempDir("fuse-async");
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { ReaderThreads = 4 });
        var file = Path.Combine(mnt, "data.bin");

        // Four readers on four quarters at once: many READs in flight, answered in random order.
        var parts = new Task<ProcessResult>[4];
        for (int i = 0; i < 4; i++)
        {
            var outFile = Path.Combine(dir.Path, $"part{i}");
            parts[i] = Tools.Run("dd", $"if={file}", $"of={outFile}", "bs=1M", $"skip={i * 16}", "count=16", "status=none");
        }
        foreach (var r in await Task.WhenAll(parts)) Assert.True(r.ExitCode == 0, r.StdErr);
        var want = new byte[16 << 20];
        for (int i = 0; i < 4; i++)
        {
            TestPattern.Fill(i * (16L << 20), want);
            var got = await File.ReadAllBytesAsync(Path.Combine(dir.Path, $"part{i}"), TestContext.Current.CancellationToken);
            Assert.True(want.AsSpan().SequenceEqual(got), $"quarter {i} differs");
        }
        Assert.True(fs.OutOfOrder > 0, "no read completed before an earlier one: the test did not exercise reordering");
        Assert.True(server.ReadRequests >= 64);
    }

    [Fact]
    public async Task The_bridge_counts_kernel_references_from_lookup_and_readdirplus()
    {
        Requires.Fuse();
        var mem = new MemoryFileSystem();
        var a = mem.AddFile("a.txt", "a\n");
        var d = mem.AddDir("d");
        var inDir = mem.AddFile("d/x.txt", "x\n");
        using var dir = new TempDir("fuse-refs");
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, mem);
        Assert.Equal(0UL, server.LookupCount(a.Ino));
        await Tools.Out("stat", Path.Combine(mnt, "a.txt"));
        Assert.True(server.LookupCount(a.Ino) >= 1);
        await Tools.Out("ls", "-l", Path.Combine(mnt, "d"));
        Assert.True(server.LookupCount(d.Ino) >= 1);
        Assert.True(server.LookupCount(inDir.Ino) >= 1);
    }
}
