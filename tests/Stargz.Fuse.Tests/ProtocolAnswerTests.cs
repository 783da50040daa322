using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

/// <summary>
/// What the server itself answers for operations a read-only tree does not support. The mount is made without
/// MS_RDONLY so the requests reach the server instead of being refused by the VFS.
/// </summary>
public sealed class ProtocolAnswerTests
{
    private const int OpIoctl = 39, OpCreate = 35, OpMkNod = 8, OpSetXattr = 21, OpUnlink = 10, OpOpen = 14, OpInit = 26;

    [Fact]
    public async Task Modifications_reaching_the_server_are_answered_EROFS()
    {
        Requires.Fuse();
        Requires.Command("setfattr");
        var fs = new MemoryFileSystem();
        fs.AddFile("hello.txt", "hello\n");
        using var dir = new TempDir("fuse-erofs");
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { ReadOnly = false });
        Assert.DoesNotContain($" {mnt} fuse.stargz ro,", await File.ReadAllTextAsync("/proc/self/mounts", TestContext.Current.CancellationToken));
        Assert.True(server.ProtocolMinor >= 31);
        Assert.Equal(1, server.RequestCount(OpInit));

        var touch = await Tools.Run("touch", Path.Combine(mnt, "new.txt"));
        Assert.Contains("Read-only file system", touch.StdErr);
        Assert.True(server.RequestCount(OpCreate) + server.RequestCount(OpMkNod) > 0, "create never reached the server");

        var write = await Tools.Run("sh", "-c", $"echo x >> {Path.Combine(mnt, "hello.txt")}");
        Assert.Contains("Read-only file system", write.StdErr);
        Assert.True(server.RequestCount(OpOpen) > 0);

        var setx = await Tools.Run("setfattr", "-n", "user.x", "-v", "1", Path.Combine(mnt, "hello.txt"));
        Assert.Contains("Read-only file system", setx.StdErr);
        Assert.True(server.RequestCount(OpSetXattr) > 0);

        var rm = await Tools.Run("rm", "-f", Path.Combine(mnt, "hello.txt"));
        Assert.Contains("Read-only file system", rm.StdErr);
        Assert.True(server.RequestCount(OpUnlink) > 0);
        Assert.Equal("hello\n", await Tools.Out("cat", Path.Combine(mnt, "hello.txt")));
    }

    [Fact]
    public async Task Unsupported_operations_answer_ENOSYS()
    {
        Requires.Fuse();
        Requires.Command("lsattr");
        var fs = new MemoryFileSystem();
        fs.AddFile("hello.txt", "hello\n");
        using var dir = new TempDir("fuse-enosys");
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs);
        // lsattr asks for inode flags with an ioctl; FUSE forwards it and reports our ENOSYS as "not supported"
        // (ENOTTY on older kernels, EOPNOTSUPP through the fileattr path on newer ones).
        var r = await Tools.Run("lsattr", Path.Combine(mnt, "hello.txt"));
        Assert.NotEqual(0, r.ExitCode);
        Assert.Matches("Operation not supported|Inappropriate ioctl for device", r.StdErr);
        Assert.True(server.RequestCount(OpIoctl) > 0, "the ioctl never reached the server");
    }
}
