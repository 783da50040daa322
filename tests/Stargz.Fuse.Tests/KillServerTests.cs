using System.Diagnostics;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

public sealed class KillServerTests
{
    [Fact]
    public async Task Killing_the_server_leaves_no_hung_reader_and_the_dead_mount_is_cleaned()
    {
        Requires.Fuse();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-kill");
        var mnt = dir.Sub("mnt");
        using var host = Process.Start(TestHost.StartInfo(mnt))!;
        Process? reader = null;
        try
        {
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            Assert.Equal("READY", await host.StandardOutput.ReadLineAsync(wait.Token));
            Assert.Equal("hello from the child\n", await Tools.Out("cat", Path.Combine(mnt, "hello.txt")));

            // A reader stuck in a READ the server will never answer.
            reader = Process.Start(new ProcessStartInfo(Requires.Command("cat"), Path.Combine(mnt, "block.bin"))
            { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true })!;
            Assert.Equal("READ-PENDING", await host.StandardOutput.ReadLineAsync(wait.Token));
            Assert.False(reader.HasExited);

            host.Kill(); // SIGKILL: no cleanup code of the server runs
            await host.WaitForExitAsync(wait.Token);

            using var readerWait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            readerWait.CancelAfter(TimeSpan.FromSeconds(15));
            await reader.WaitForExitAsync(readerWait.Token);
            Assert.NotEqual(0, reader.ExitCode);

            var stat = await Tools.Run("stat", mnt);
            Assert.NotEqual(0, stat.ExitCode);
            Assert.Contains("Transport endpoint is not connected", stat.StdErr);
            Assert.True(FuseServer.IsDeadMount(mnt));

            Assert.True(FuseServer.CleanupDeadMount(mnt));
            Assert.False(FuseServer.IsMountPoint(mnt));
            Assert.False(FuseServer.IsDeadMount(mnt));
            Assert.Equal(0, (await Tools.Run("stat", mnt)).ExitCode);
            Assert.False(FuseServer.CleanupDeadMount(mnt)); // nothing left to clean
        }
        finally
        {
            if (!host.HasExited) host.Kill();
            if (reader is { HasExited: false }) reader.Kill();
            reader?.Dispose();
            FuseServer.CleanupDeadMount(mnt);
            if (FuseServer.IsMountPoint(mnt)) await Tools.Run("umount", "-l", mnt);
        }
    }

    [Fact]
    public async Task A_stopped_server_is_detected_by_timeout_and_its_mount_aborted_and_removed()
    {
        Requires.Fuse();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-stop");
        var mnt = dir.Sub("mnt");
        using var host = Process.Start(TestHost.StartInfo(mnt))!;
        try
        {
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            Assert.Equal("READY", await host.StandardOutput.ReadLineAsync(wait.Token));
            Assert.False(FuseServer.IsDeadMount(mnt, TimeSpan.FromSeconds(5)));

            await Tools.Out("kill", "-STOP", host.Id.ToString());
            // Alive but not answering: only a bounded probe can tell, and it must not hang the caller.
            var sw = System.Diagnostics.Stopwatch.StartNew();
            Assert.True(FuseServer.IsDeadMount(mnt, TimeSpan.FromSeconds(1)));
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20));
            Assert.True(FuseServer.CleanupDeadMount(mnt, TimeSpan.FromSeconds(1)));
            Assert.False(FuseServer.IsMountPoint(mnt));

            // Resumed, the server finds its connection gone and ends on its own.
            await Tools.Out("kill", "-CONT", host.Id.ToString());
            await host.WaitForExitAsync(wait.Token);
            Assert.Equal(0, host.ExitCode);
        }
        finally
        {
            if (!host.HasExited)
            {
                await Tools.Run("kill", "-CONT", host.Id.ToString());
                host.Kill();
            }
            FuseServer.CleanupDeadMount(mnt, TimeSpan.FromSeconds(1));
            if (FuseServer.IsMountPoint(mnt)) await Tools.Run("umount", "-l", mnt);
        }
    }

    [Fact]
    public async Task Mounting_again_over_the_dead_mount_of_a_killed_server_works()
    {
        Requires.Fuse();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-remount");
        var mnt = dir.Sub("mnt");
        using (var host = Process.Start(TestHost.StartInfo(mnt))!)
        {
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            Assert.Equal("READY", await host.StandardOutput.ReadLineAsync(wait.Token));
            host.Kill();
            await host.WaitForExitAsync(wait.Token);
        }
        try
        {
            Assert.True(FuseServer.IsDeadMount(mnt));
            var fs = new Stargz.Fuse.Samples.MemoryFileSystem();
            fs.AddFile("again.txt", "second life\n");
            using var server = FuseServer.Mount(mnt, fs);
            Assert.Equal("second life\n", await Tools.Out("cat", Path.Combine(mnt, "again.txt")));
            server.Unmount();
            Assert.False(FuseServer.IsMountPoint(mnt));
        }
        finally
        {
            FuseServer.CleanupDeadMount(mnt);
            for (int i = 0; i < 5 && FuseServer.IsMountPoint(mnt); i++) await Tools.Run("umount", "-l", mnt);
        }
    }
}
