using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

public sealed class LifecycleTests
{
    private static MemoryFileSystem SmallTree()
    {
        var fs = new MemoryFileSystem();
        fs.AddFile("a.txt", "aaa\n");
        fs.AddFile("d/b.txt", "bbb\n");
        fs.AddGeneratedFile("d/big.bin", 4 << 20, TestPattern.Fill);
        return fs;
    }

    private static int TestPatternByte(long off)
    {
        Span<byte> b = stackalloc byte[1];
        TestPattern.Fill(off, b);
        return b[0];
    }

    [Fact]
    public async Task Unmount_is_clean_and_the_server_ends()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-life");
        var mnt = dir.Sub("mnt");
        var server = FuseServer.Mount(mnt, SmallTree());
        Assert.True(FuseServer.IsMountPoint(mnt));
        Assert.Equal("aaa\n", await Tools.Out("cat", Path.Combine(mnt, "a.txt")));
        server.Unmount();
        Assert.True(server.Completion.IsCompleted);
        Assert.False(FuseServer.IsMountPoint(mnt));
        Assert.Equal("", await Tools.Out("ls", "-A", mnt));
    }

    [Fact]
    public async Task Unmount_of_a_busy_mount_aborts_it_and_open_files_fail()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-busy");
        var mnt = dir.Sub("mnt");
        var server = FuseServer.Mount(mnt, SmallTree());
        try
        {
            using var open = new FileStream(Path.Combine(mnt, "d", "big.bin"), FileMode.Open, FileAccess.Read, FileShare.Read, 1);
            Assert.Equal(TestPatternByte(0), open.ReadByte());
            server.Unmount();
            Assert.True(server.Completion.IsCompleted);
            Assert.False(FuseServer.IsMountPoint(mnt));
            // Bytes not yet in the page cache now need the dead connection.
            open.Position = 3 << 20;
            Assert.ThrowsAny<IOException>(() => open.ReadByte());
        }
        finally
        {
            server.Dispose();
        }
        Assert.Equal(0, (await Tools.Run("stat", mnt)).ExitCode);
    }

    [Fact]
    public async Task Lazy_unmount_keeps_serving_open_files_until_they_close()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-lazy");
        var mnt = dir.Sub("mnt");
        var server = FuseServer.Mount(mnt, SmallTree());
        FileStream? open = null;
        try
        {
            open = new FileStream(Path.Combine(mnt, "a.txt"), FileMode.Open, FileAccess.Read, FileShare.Read, 1);
            server.Unmount(lazy: true);
            Assert.False(FuseServer.IsMountPoint(mnt));
            Assert.False(server.Completion.IsCompleted);
            var buf = new byte[4];
            Assert.Equal(4, open.Read(buf));
            Assert.Equal("aaa\n", System.Text.Encoding.ASCII.GetString(buf));
            open.Dispose();
            await server.Completion.WaitAsync(TimeSpan.FromSeconds(10), TestContext.Current.CancellationToken);
        }
        finally
        {
            // Closing the last file ends a detached mount; only then can the server stop.
            open?.Dispose();
            server.Dispose();
        }
    }

    [Fact]
    public async Task Fusermount3_path_mounts_and_unmounts()
    {
        Requires.Fuse();
        Requires.Command("fusermount3");
        using var dir = new TempDir("fuse-fm");
        var mnt = dir.Sub("mnt");
        using (var server = FuseServer.Mount(mnt, SmallTree(), new FuseMountOptions { UseFusermount = true, FsName = "stargz-fm" }))
        {
            Assert.Equal("bbb\n", await Tools.Out("cat", Path.Combine(mnt, "d", "b.txt")));
            var mounts = await File.ReadAllTextAsync("/proc/self/mounts", TestContext.Current.CancellationToken);
            Assert.Contains($"stargz-fm {mnt} fuse.stargz ro,", mounts);
            server.Unmount();
            Assert.True(server.Completion.IsCompleted);
        }
        Assert.False(FuseServer.IsMountPoint(mnt));
    }
}
