using System.Diagnostics;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

public sealed class NonRootTests
{
    private const int Nobody = 65534;

    [Fact]
    public async Task A_non_root_server_mounts_through_fusermount3_and_unmounts_itself()
    {
        Requires.Fuse();
        Requires.Command("fusermount3");
        // Debian's udev rule makes /dev/fuse 0666; some containers ship it 0600 (root only), which rules out user mounts.
        if ((File.GetUnixFileMode("/dev/fuse") & UnixFileMode.OtherWrite) == 0)
            Requires.Missing("/dev/fuse is not accessible to other users (mode 0600): run `chmod 0666 /dev/fuse`");
        var setpriv = Requires.Command("setpriv");
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-nonroot");
        var mnt = dir.Sub("mnt");
        // fusermount3 lets a user mount only on a directory the user owns.
        await Tools.Out("chown", $"{Nobody}:{Nobody}", mnt);
        await Tools.Out("chmod", "755", dir.Path);
        using var host = Process.Start(TestHost.StartInfo(mnt, asUser: Nobody))!;
        try
        {
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(60));
            var first = await host.StandardOutput.ReadLineAsync(wait.Token);
            if (first != "READY") Assert.Fail($"host said '{first}': {await ReadErr(host)}");

            // Without allow_other only the mounting user may enter the mount.
            var asNobody = await ProcessRunner.RunAsync(setpriv, [$"--reuid={Nobody}", $"--regid={Nobody}", "--clear-groups",
                "cat", Path.Combine(mnt, "hello.txt")], TimeSpan.FromSeconds(30));
            if (asNobody.ExitCode != 0) Assert.Fail($"cat as nobody: {asNobody.StdErr}; host: {await ReadErr(host)}");
            Assert.Equal("hello from the child\n", asNobody.StdOut);
            var mounts = await File.ReadAllTextAsync("/proc/self/mounts", ct);
            Assert.Contains($"stargz-testhost {mnt} fuse.stargz ro,nosuid,nodev,relatime,user_id={Nobody},group_id={Nobody}", mounts);

            await host.StandardInput.WriteLineAsync("unmount");
            await host.StandardInput.FlushAsync(ct);
            await host.WaitForExitAsync(wait.Token);
            Assert.Equal(0, host.ExitCode);
            Assert.False(FuseServer.IsMountPoint(mnt));
        }
        finally
        {
            if (!host.HasExited) host.Kill();
            FuseServer.CleanupDeadMount(mnt);
            if (FuseServer.IsMountPoint(mnt)) await Tools.Run("umount", "-l", mnt);
        }
    }

    private static async Task<string> ReadErr(Process p)
    {
        if (!p.HasExited) p.Kill();
        return await p.StandardError.ReadToEndAsync();
    }
}
