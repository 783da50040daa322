using System.IO.MemoryMappedFiles;
using System.Security.Cryptography;
using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

/// <summary>Files opened with FOPEN_DIRECT_IO (FuseOpenResult.DirectIo): bytes, no page cache, mmap and exec.</summary>
public sealed class DirectIoTests
{
    // Odd sizes so the last READ is short and not page-aligned.
    private const long GeneratedSize = (24L << 20) + 4567;

    private static byte[] Generated(long size)
    {
        var b = new byte[size];
        TestPattern.Fill(0, b);
        return b;
    }

    private static void RequireAllowMmapKernel()
    {
        Requires.Fuse();
        var v = Environment.OSVersion.Version;
        if (v.Major < 6 || v.Major == 6 && v.Minor < 6) Requires.Missing($"FUSE_DIRECT_IO_ALLOW_MMAP needs Linux 6.6+, this is {v}");
    }

    [Fact]
    public async Task Direct_io_files_read_the_expected_bytes_from_an_array_and_from_a_generator()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-dio");
        var fs = new MemoryFileSystem();
        // byte[] files are answered through TryReadDirect (writev from the array), generated ones through ReadAsync.
        fs.AddFile("array.bin", TestTree.RandomBytes).DirectIo = true;
        fs.AddGeneratedFile("generated.bin", GeneratedSize, TestPattern.Fill).DirectIo = true;
        var expectArray = Path.Combine(dir.Path, "array.expected");
        var expectGenerated = Path.Combine(dir.Path, "generated.expected");
        await File.WriteAllBytesAsync(expectArray, TestTree.RandomBytes, TestContext.Current.CancellationToken);
        await File.WriteAllBytesAsync(expectGenerated, Generated(GeneratedSize), TestContext.Current.CancellationToken);
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { ReadAheadKb = 1024 });

        foreach (var (name, expected) in new[] { ("array.bin", expectArray), ("generated.bin", expectGenerated) })
        {
            var cmp = await Tools.Run("cmp", Path.Combine(mnt, name), expected);
            Assert.True(cmp.ExitCode == 0, $"{name}: {cmp.StdOut}{cmp.StdErr}");
        }
        Assert.Equal(2, server.DirectIoOpens);
        // An unaligned read across the end: dd with a 1000-byte block from an offset that is not a page multiple.
        var tail = Path.Combine(dir.Path, "tail");
        await Tools.Out("dd", $"if={Path.Combine(mnt, "generated.bin")}", $"of={tail}", "bs=1000", $"skip={(GeneratedSize - 12_345) / 1000}", "status=none");
        long from = (GeneratedSize - 12_345) / 1000 * 1000;
        Assert.Equal(Generated(GeneratedSize).AsSpan((int)from).ToArray(), await File.ReadAllBytesAsync(tail, TestContext.Current.CancellationToken));
    }

    [Fact]
    public void A_repeated_read_of_a_direct_io_file_reaches_the_server_again_and_a_cached_one_does_not()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-dio-repeat");
        const long rangeStart = 3 << 20, rangeEnd = 4 << 20;
        // READs the server answered inside the range read. Not the server's READ count: the kernel's async readahead
        // past the range, started by the first read, may arrive while the second one is measured.
        long readsInRange = 0;
        void FillCounted(long offset, Span<byte> destination)
        {
            if (offset < rangeEnd && offset + destination.Length > rangeStart) Interlocked.Increment(ref readsInRange);
            TestPattern.Fill(offset, destination);
        }
        var fs = new MemoryFileSystem();
        fs.AddGeneratedFile("direct.bin", GeneratedSize, FillCounted).DirectIo = true;
        fs.AddGeneratedFile("cached.bin", GeneratedSize, FillCounted);
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions());
        var expected = Generated(GeneratedSize).AsSpan((int)rangeStart, (int)(rangeEnd - rangeStart)).ToArray();

        // READs of the range the server answered for each of two reads of the same 1 MiB through one open file.
        (long First, long Second) ReadTwice(string name)
        {
            using var h = File.OpenHandle(Path.Combine(mnt, name));
            var buf = new byte[rangeEnd - rangeStart];
            var counts = new long[2];
            for (int i = 0; i < 2; i++)
            {
                long before = Interlocked.Read(ref readsInRange);
                Assert.Equal(buf.Length, RandomAccess.Read(h, buf, rangeStart));
                counts[i] = Interlocked.Read(ref readsInRange) - before;
                Assert.True(expected.AsSpan().SequenceEqual(buf), $"{name}: read {i + 1} returned wrong bytes");
            }
            return (counts[0], counts[1]);
        }

        var cached = ReadTwice("cached.bin");
        Assert.True(cached.First > 0, "the first read of the cached file did not reach the server");
        Assert.Equal(0, cached.Second); // served from the page cache: this is what direct I/O gives up
        var direct = ReadTwice("direct.bin");
        Assert.True(direct.First > 0, "the first read of the direct-I/O file did not reach the server");
        Assert.True(direct.Second > 0, "the second read of the direct-I/O file was served from the page cache");
        Assert.Equal(1, server.DirectIoOpens);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task A_direct_io_file_maps_shared_only_with_allow_mmap_and_executes_either_way(bool allowMmap)
    {
        RequireAllowMmapKernel();
        using var dir = new TempDir("fuse-dio-mmap");
        var fs = new MemoryFileSystem();
        fs.AddFile("data.bin", TestTree.RandomBytes).DirectIo = true;
        // exec maps the binary privately (MAP_PRIVATE), which FOPEN_DIRECT_IO never forbade.
        fs.AddFile("bin/echo", await File.ReadAllBytesAsync(Requires.Command("echo"), TestContext.Current.CancellationToken), 0x1ED).DirectIo = true;
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { DirectIoAllowMmap = allowMmap });
        Assert.Equal(allowMmap, server.DirectIoAllowMmapNegotiated);

        // MemoryMappedFileAccess.Read maps MAP_SHARED on Linux, the mapping the kernel guards with ALLOW_MMAP.
        var file = Path.Combine(mnt, "data.bin");
        if (allowMmap)
        {
            using var mmf = MemoryMappedFile.CreateFromFile(file, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            using var view = mmf.CreateViewStream(0, 0, MemoryMappedFileAccess.Read);
            Assert.Equal(SHA256.HashData(TestTree.RandomBytes), await SHA256.HashDataAsync(view, TestContext.Current.CancellationToken));
        }
        else
        {
            var e = Assert.ThrowsAny<IOException>(() =>
            {
                using var mmf = MemoryMappedFile.CreateFromFile(file, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
                using var view = mmf.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            });
            Assert.Contains("No such device", e.Message); // ENODEV from fuse_file_mmap
        }

        var r = await ProcessRunner.RunAsync(Path.Combine(mnt, "bin", "echo"), ["direct", "io"], TimeSpan.FromSeconds(30));
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("direct io\n", r.StdOut);
        Assert.True(server.DirectIoOpens >= 2, $"{server.DirectIoOpens} direct-I/O opens for a mapped file and an exec");
    }
}
