using System.Diagnostics;
using Stargz.TestSupport;

namespace Stargz.Daemon.Tests;

/// <summary>The shipped systemd unit: valid for systemd, and set up so a restart keeps the FUSE connections.</summary>
public sealed class SystemdUnitTests
{
    private static string UnitPath => Path.Combine(StargzCli.RepoRoot(), "src", "Stargz.Daemon", "stargz-snapshotter.service");

    [Fact]
    public void The_unit_keeps_fuse_connections_in_its_fd_store_and_restarts_always()
    {
        var lines = File.ReadAllLines(UnitPath).Select(l => l.Trim()).Where(l => l.Length > 0 && l[0] != '#').ToList();
        Assert.Contains("Type=notify", lines);          // READY=1, and the notify socket the fd store needs
        Assert.Contains("Restart=always", lines);
        Assert.Contains("KillMode=mixed", lines);       // SIGTERM to the daemon only: it hands its mounts over
        var max = lines.Single(l => l.StartsWith("FileDescriptorStoreMax=", StringComparison.Ordinal));
        Assert.True(int.Parse(max["FileDescriptorStoreMax=".Length..], System.Globalization.CultureInfo.InvariantCulture) >= 4096);
        Assert.Contains(lines, l => l.StartsWith("ExecStart=/usr/local/bin/stargz-snapshotter ", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Systemd_analyze_verify_accepts_the_unit()
    {
        var analyze = Requires.Which("systemd-analyze");
        if (analyze == null) { Requires.Missing("systemd-analyze (Debian package systemd) is not installed"); return; }
        // Verified as installed: the ExecStart binary must exist, so point it at a copy of this machine's executable.
        using var dir = new TempDir("unit");
        var exe = Path.Combine(dir.Path, "stargz-snapshotter");
        File.Copy("/bin/true", exe);
        var unit = File.ReadAllText(UnitPath).Replace("/usr/local/bin/stargz-snapshotter", exe, StringComparison.Ordinal);
        var path = Path.Combine(dir.Path, "stargz-snapshotter.service");
        await File.WriteAllTextAsync(path, unit, TestContext.Current.CancellationToken);
        var psi = new ProcessStartInfo(analyze) { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        psi.ArgumentList.Add("verify");
        psi.ArgumentList.Add(path);
        using var p = Process.Start(psi)!;
        var err = await p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        var output = await p.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        await p.WaitForExitAsync(TestContext.Current.CancellationToken);
        Assert.True(p.ExitCode == 0, $"systemd-analyze verify: {err}{output}");
        // Warnings about this unit (unknown keys, bad values) would be printed even with exit code 0.
        Assert.DoesNotContain("stargz-snapshotter.service:", err);
    }
}
