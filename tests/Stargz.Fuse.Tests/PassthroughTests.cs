using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

public sealed class PassthroughTests
{
    private static string MakeBacking(string dir, int size)
    {
        var path = Path.Combine(dir, "backing.bin");
        var data = new byte[size];
        new Random(7).NextBytes(data);
        File.WriteAllBytes(path, data);
        return path;
    }

    [Fact]
    public async Task With_passthrough_reads_go_to_the_backing_file_and_skip_user_space()
    {
        Requires.PassthroughKernel();
        using var dir = new TempDir("fuse-pt");
        var backing = MakeBacking(dir.Path, 8 << 20);
        using var fs = new MemoryFileSystem();
        fs.AddBackedFile("data.bin", backing);
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { Passthrough = true });
        Assert.True(server.PassthroughNegotiated, "kernel did not negotiate FUSE passthrough");

        var file = Path.Combine(mnt, "data.bin");
        Assert.Equal($"{8 << 20}\n", await Tools.Out("stat", "-c", "%s", file));
        var cmp = await Tools.Run("cmp", file, backing);
        Assert.True(cmp.ExitCode == 0, cmp.StdOut + cmp.StdErr);
        Assert.True(server.PassthroughOpens >= 1);
        Assert.Equal(0, fs.ReadCalls);

        // Overlayfs still stacks on a passthrough FUSE mount (the reason max_stack_depth is 1).
        var other = dir.Sub("other");
        var merged = dir.Sub("merged");
        await Tools.Out("mount", "-t", "overlay", "overlay", "-o", $"lowerdir={mnt}:{other}", merged);
        try
        {
            var viaOverlay = await Tools.Run("cmp", Path.Combine(merged, "data.bin"), backing);
            Assert.True(viaOverlay.ExitCode == 0, viaOverlay.StdOut + viaOverlay.StdErr);
        }
        finally
        {
            await Tools.Run("umount", merged);
        }
        Assert.Equal(0, fs.ReadCalls);
    }

    [Fact]
    public async Task Without_passthrough_the_same_bytes_come_through_user_space()
    {
        Requires.Fuse();
        using var dir = new TempDir("fuse-nopt");
        var backing = MakeBacking(dir.Path, 4 << 20);
        using var fs = new MemoryFileSystem();
        fs.AddBackedFile("data.bin", backing);
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { Passthrough = false });
        Assert.False(server.PassthroughNegotiated);
        var cmp = await Tools.Run("cmp", Path.Combine(mnt, "data.bin"), backing);
        Assert.True(cmp.ExitCode == 0, cmp.StdOut + cmp.StdErr);
        Assert.Equal(0, server.PassthroughOpens);
        Assert.True(fs.ReadCalls > 0);
    }

    [Fact]
    public async Task When_the_kernel_refuses_a_backing_file_reads_fall_back_to_user_space()
    {
        Requires.PassthroughKernel();
        using var dir = new TempDir("fuse-ptfb");
        // A backing file on overlayfs is already one level deep: the kernel refuses it for max_stack_depth 1.
        var l1 = dir.Sub("l1");
        var l2 = dir.Sub("l2");
        MakeBacking(l1, 2 << 20);
        var ovl = dir.Sub("ovl");
        await Tools.Out("mount", "-t", "overlay", "overlay", "-o", $"lowerdir={l1}:{l2}", ovl);
        var mnt = dir.Sub("mnt");
        var log = new List<string>();
        try
        {
            var backing = Path.Combine(ovl, "backing.bin");
            using var fs = new MemoryFileSystem();
            fs.AddBackedFile("data.bin", backing);
            using (var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { Passthrough = true, Log = m => { lock (log) log.Add(m); } }))
            {
                Assert.True(server.PassthroughNegotiated);
                var cmp = await Tools.Run("cmp", Path.Combine(mnt, "data.bin"), backing);
                Assert.True(cmp.ExitCode == 0, cmp.StdOut + cmp.StdErr);
                Assert.Equal(0, server.PassthroughOpens);
                Assert.True(fs.ReadCalls > 0);
                // Refused for good: later opens do not ask the kernel again (nor log it again).
                Assert.False(server.PassthroughUsable);
                cmp = await Tools.Run("cmp", Path.Combine(mnt, "data.bin"), backing);
                Assert.True(cmp.ExitCode == 0, cmp.StdOut + cmp.StdErr);
            }
            lock (log) Assert.Single(log, m => m.Contains("passthrough refused") && m.Contains("ELOOP"));
        }
        finally
        {
            await Tools.Run("umount", ovl);
        }
    }

    [Fact]
    public async Task A_file_open_through_user_space_is_not_switched_to_passthrough_under_its_readers()
    {
        Requires.PassthroughKernel();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-ptmix");
        var backing = MakeBacking(dir.Path, 4 << 20);
        using var fs = new MemoryFileSystem();
        var node = fs.AddBackedFile("data.bin", backing);
        node.OfferPassthrough = false; // the layer has not finished fetching this file yet
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { Passthrough = true });
        var file = Path.Combine(mnt, "data.bin");

        var first = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, 1);
        Assert.Equal(4096, await first.ReadAsync(new byte[4096], ct));
        node.OfferPassthrough = true; // now complete: new opens may use passthrough
        // The kernel refuses passthrough on an inode that has cached opens; the bridge must not ask for it.
        var second = await Tools.Run("cmp", file, backing);
        Assert.True(second.ExitCode == 0, second.StdOut + second.StdErr);
        Assert.Equal(0, server.PassthroughOpens);
        await first.DisposeAsync();

        // Once the last cached open is released, a new open gets passthrough.
        for (int i = 0; i < 50 && server.PassthroughOpens == 0; i++)
        {
            var again = await Tools.Run("cmp", file, backing);
            Assert.True(again.ExitCode == 0, again.StdOut + again.StdErr);
            if (server.PassthroughOpens == 0) await Task.Delay(100, ct);
        }
        Assert.True(server.PassthroughOpens > 0);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_binary_on_the_mount_executes(bool passthrough)
    {
        // exec maps the file (mmap, PROT_EXEC): what containers do with every binary of a layer.
        if (passthrough) Requires.PassthroughKernel();
        else Requires.Fuse();
        using var dir = new TempDir("fuse-exec");
        var echo = Requires.Command("echo");
        var backing = Path.Combine(dir.Path, "echo-copy");
        File.Copy(echo, backing);
        using var fs = new MemoryFileSystem();
        if (passthrough) fs.AddBackedFile("bin/echo", backing, 0x1ED);
        else fs.AddFile("bin/echo", File.ReadAllBytes(backing), 0x1ED);
        var mnt = dir.Sub("mnt");
        using var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { Passthrough = passthrough });
        var r = await ProcessRunner.RunAsync(Path.Combine(mnt, "bin", "echo"), ["hello", "from", "fuse"], TimeSpan.FromSeconds(30));
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("hello from fuse\n", r.StdOut);
        if (passthrough) Assert.True(server.PassthroughOpens > 0);
    }
}
