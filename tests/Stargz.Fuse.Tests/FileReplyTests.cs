using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

/// <summary>
/// READ replies spliced from a local file (IFuseFileSystem.TryReadFromFile), the path a backed file takes when
/// passthrough is off or refused: right bytes in page-cache and direct-I/O mode, and a clean pread fallback.
/// </summary>
public sealed class FileReplyTests
{
    // Odd size: the last READ is short and ends inside a page.
    private const int BackingSize = (24 << 20) + 4567;

    private static string MakeBacking(string dir, string name, int size, int seed)
    {
        var path = Path.Combine(dir, name);
        var data = new byte[size];
        new Random(seed).NextBytes(data);
        File.WriteAllBytes(path, data);
        return path;
    }

    private static FuseMountOptions Options() => new()
    {
        // Every reply of this size can be spliced in this process (1 MiB with CAP_SYS_RESOURCE, else a little less).
        MaxRead = FuseServer.LargestSplicedRead / 4096 * 4096,
        ReadAheadKb = 1024,
    };

    [Fact]
    public async Task A_backed_file_without_passthrough_is_answered_by_splice_with_its_exact_bytes()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-splice");
        var backing = MakeBacking(dir.Path, "backing.bin", BackingSize, 11);
        using var fs = new MemoryFileSystem();
        var cached = fs.AddBackedFile("cached.bin", backing);
        cached.OfferPassthrough = false;
        var direct = fs.AddBackedFile("direct.bin", backing);
        direct.OfferPassthrough = false;
        direct.DirectIo = true;
        var mnt = dir.Sub("mnt");
        Assert.True(FuseServer.LargestSplicedRead >= 64 * 1024, $"largest spliced read {FuseServer.LargestSplicedRead}");
        using var server = FuseServer.Mount(mnt, fs, Options());

        foreach (var name in new[] { "cached.bin", "direct.bin" })
        {
            var cmp = await Tools.Run("cmp", Path.Combine(mnt, name), backing);
            Assert.True(cmp.ExitCode == 0, $"{name}: {cmp.StdOut}{cmp.StdErr}");
        }
        Assert.True(server.SplicedReads > 0, "no READ was spliced");
        Assert.Equal(0, server.FileReadFallbacks);
        Assert.Equal(1, server.DirectIoOpens);

        // Direct I/O passes the reader's offsets through: an unaligned read across the end of the file.
        long from = BackingSize - 12_345 - 17;
        using (var h = File.OpenHandle(Path.Combine(mnt, "direct.bin")))
        {
            var buf = new byte[20_000];
            int n = RandomAccess.Read(h, buf, from);
            Assert.Equal(BackingSize - from, n);
            var expected = new byte[n];
            using var b = File.OpenHandle(backing);
            RandomAccess.Read(b, expected, from);
            Assert.True(expected.AsSpan().SequenceEqual(buf.AsSpan(0, n)), "unaligned tail read returned wrong bytes");
        }
    }

    [Fact]
    public async Task A_backing_file_shorter_than_promised_is_answered_by_pread_and_splicing_resumes_after()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-splice-short");
        var shrinking = MakeBacking(dir.Path, "shrinking.bin", 8 << 20, 12);
        var intact = MakeBacking(dir.Path, "intact.bin", 8 << 20, 13);
        using var fs = new MemoryFileSystem();
        // Direct I/O: every read reaches the server, so the shrunk range is certainly asked for.
        foreach (var (name, path) in new[] { ("shrinking.bin", shrinking), ("intact.bin", intact) })
        {
            var n = fs.AddBackedFile(name, path);
            n.OfferPassthrough = false;
            n.DirectIo = true;
        }
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, Options());

        // The filesystem still says 8 MiB; the file under it now ends 3 MiB + 100 bytes in. The splice comes up
        // short, the bridge drops its pipe and answers with pread: the reader sees the bytes that exist, then EOF.
        using (var t = File.OpenHandle(shrinking, FileMode.Open, FileAccess.ReadWrite)) RandomAccess.SetLength(t, (3 << 20) + 100);
        // Read until a read returns 0 (the size the kernel holds is still 8 MiB, so not File.ReadAllBytes).
        var got = new MemoryStream();
        await using (var f = new FileStream(Path.Combine(mnt, "shrinking.bin"), FileMode.Open, FileAccess.Read, FileShare.Read, 0))
            await f.CopyToAsync(got, TestContext.Current.CancellationToken);
        Assert.Equal(await File.ReadAllBytesAsync(shrinking, TestContext.Current.CancellationToken), got.ToArray());
        Assert.True(server.FileReadFallbacks > 0, "the short file was not answered by the pread fallback");

        long splicedBefore = server.SplicedReads;
        var cmp = await Tools.Run("cmp", Path.Combine(mnt, "intact.bin"), intact);
        Assert.True(cmp.ExitCode == 0, cmp.StdOut + cmp.StdErr);
        Assert.True(server.SplicedReads > splicedBefore, "splicing did not resume after the fallback");
    }

    [Fact]
    public async Task A_handle_the_filesystem_disposes_right_after_lending_it_still_answers_and_closes_after_the_reply()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-splice-lend");
        var backing = MakeBacking(dir.Path, "backing.bin", 4 << 20, 14);
        var lent = Path.Combine(dir.Path, "lent.bin");
        File.Copy(backing, lent);
        using var inner = new MemoryFileSystem();
        var n = inner.AddBackedFile("data.bin", backing);
        n.OfferPassthrough = false;
        n.DirectIo = true;
        var fs = new DisposeAfterLendFileSystem(inner, lent);
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, Options());

        var cmp = await Tools.Run("cmp", Path.Combine(mnt, "data.bin"), backing);
        Assert.True(cmp.ExitCode == 0, cmp.StdOut + cmp.StdErr);
        // Every READ with bytes to send went by splice from a handle closed before the reply (the EOF READ sends none).
        Assert.True(fs.Lends > 0);
        Assert.Equal(fs.Lends, server.SplicedReads);
        Assert.Equal(0, server.FileReadFallbacks);
        // Each lent descriptor closed once its reply was sent: none is left open.
        Assert.Equal(0, OpenDescriptorsOf(lent));
    }

    [Fact]
    public async Task A_file_range_that_fails_with_EIO_is_answered_through_ReadAsync_with_the_right_bytes()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-splice-eio");
        const int size = (2 << 20) + 333;
        // A real file whose every read fails with EIO, as on a failing disk: a file of a second FUSE mount.
        using var broken = new MemoryFileSystem();
        broken.AddFile("eio.bin", new byte[size]).FailReads = Errno.EIO;
        var brokenMnt = dir.Sub("broken");
        using var brokenServer = FuseServer.Mount(brokenMnt, broken, Options());

        static void Content(long offset, Span<byte> dst)
        {
            for (int k = 0; k < dst.Length; k++) dst[k] = (byte)((offset + k) * 31 >> 3);
        }
        using var fs = new MemoryFileSystem();
        var n = fs.AddGeneratedFile("data.bin", size, Content);
        n.SplicePath = Path.Combine(brokenMnt, "eio.bin");
        n.DirectIo = true; // every read reaches the server
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, Options());

        var got = await File.ReadAllBytesAsync(Path.Combine(mnt, "data.bin"), TestContext.Current.CancellationToken);
        var expected = new byte[size];
        Content(0, expected);
        Assert.Equal(size, got.Length);
        Assert.True(expected.AsSpan().SequenceEqual(got), "a READ whose file failed returned wrong bytes");
        // Every READ with bytes met the failing file, was reported to the filesystem, and went through ReadAsync.
        Assert.True(server.FileReadErrors > 0, "no file read failed");
        Assert.Equal(server.FileReadErrors, fs.FileReadFailures);
        Assert.Equal(Errno.EIO, fs.LastFileReadErrno);
        Assert.Equal(0, server.SplicedReads);
    }

    [Fact]
    public void A_closed_handle_cannot_be_lent()
    {
        using var dir = new TempDir("fuse-lend-closed");
        var h = File.OpenHandle(MakeBacking(dir.Path, "f.bin", 4096, 15));
        h.Dispose();
        Assert.False(FuseFileRange.TryLend(h, 0, 4096, out var range));
        Assert.Null(range.File);
    }

    private static int OpenDescriptorsOf(string path)
    {
        int count = 0;
        foreach (var fd in Directory.EnumerateFileSystemEntries("/proc/self/fd"))
        {
            try { if (new FileInfo(fd).LinkTarget == path) count++; }
            catch (IOException) { } // closed while listing
        }
        return count;
    }

    /// <summary>Serves <paramref name="inner"/>'s tree, but answers every read from a fresh handle of
    /// <paramref name="path"/> that it disposes as soon as it has lent it (a cache evicting a handle mid-read).</summary>
    private sealed class DisposeAfterLendFileSystem(MemoryFileSystem inner, string path) : IFuseFileSystem
    {
        private int _lends;
        /// <summary>Ranges lent with at least one byte.</summary>
        public int Lends => Volatile.Read(ref _lends);
        public int Lookup(ulong parent, ReadOnlySpan<byte> name, out FuseEntry entry) => inner.Lookup(parent, name, out entry);
        public int GetAttr(ulong ino, out FuseAttr attr) => inner.GetAttr(ino, out attr);
        public int Open(ulong ino, int flags, out FuseOpenResult result) => inner.Open(ino, flags, out result);
        public int ReadDir(ulong ino, ulong handle, long offset, FuseDirWriter writer) => inner.ReadDir(ino, handle, offset, writer);
        public ValueTask<int> ReadAsync(ulong ino, ulong handle, long offset, Memory<byte> destination, CancellationToken cancellationToken)
            => throw new InvalidOperationException("reads must go through TryReadFromFile");
        public bool TryReadFromFile(ulong ino, ulong handle, long offset, int size, out FuseFileRange range)
        {
            using var h = File.OpenHandle(path);
            long length = RandomAccess.GetLength(h);
            int len = offset >= length ? 0 : (int)Math.Min(size, length - offset);
            if (!FuseFileRange.TryLend(h, offset, len, out range)) return false;
            if (len > 0) Interlocked.Increment(ref _lends);
            return true;
        }
    }
}
