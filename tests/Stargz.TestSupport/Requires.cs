using Xunit;

namespace Stargz.TestSupport;

/// <summary>
/// Guards for tests that need real parts (root, /dev/fuse, docker-registry, containerd...).
/// On a developer's machine a missing part skips the test and says why; under CI (CI=true) it fails
/// the test, because CI installs everything and a skip there would hide a broken install step.
/// </summary>
public static class Requires
{
    public static bool UnderCi =>
        string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    /// <summary>Skips (developer) or fails (CI) the current test with <paramref name="why"/>.</summary>
    public static void Missing(string why)
    {
        if (UnderCi)
            Assert.Fail($"required dependency missing under CI: {why}");
        Assert.Skip($"skipped on this machine: {why}");
    }

    /// <summary>FUSE passthrough (backing files) needs Linux 6.9 or newer.</summary>
    public static void PassthroughKernel()
    {
        Fuse();
        var v = Environment.OSVersion.Version;
        if (v.Major < 6 || v.Major == 6 && v.Minor < 9) Missing($"FUSE passthrough needs Linux 6.9+, this is {v}");
    }

    /// <summary>Kernel EROFS (file-backed mounts) and mkfs.erofs (erofs-utils), for promoted layers.</summary>
    public static void Erofs()
    {
        Root();
        if (!File.ReadAllText("/proc/filesystems").Contains("\terofs")) Missing("the kernel has no erofs (/proc/filesystems)");
        Command("mkfs.erofs");
    }

    public static void Root()
    {
        if (!IsRoot) Missing("test needs root (mount(2), overlayfs, containerd)");
    }

    public static bool IsRoot => Environment.UserName == "root" || GetEuid() == 0;

    public static void Fuse()
    {
        Root();
        if (!File.Exists("/dev/fuse")) Missing("/dev/fuse is not present");
    }

    /// <summary>Returns the absolute path of <paramref name="name"/> on PATH (or in sbin dirs), or skips/fails.</summary>
    public static string Command(string name)
    {
        var path = Which(name);
        if (path is null) Missing($"command '{name}' not found on PATH (run integration/install-deps.sh)");
        return path!;
    }

    public static string? Which(string name)
    {
        if (name.Contains('/')) return File.Exists(name) ? name : null;
        var dirs = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Concat(new[] { "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin" });
        foreach (var d in dirs)
        {
            var p = Path.Combine(d, name);
            if (File.Exists(p)) return p;
        }
        return null;
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "geteuid")]
    private static extern uint GetEuid();
}
