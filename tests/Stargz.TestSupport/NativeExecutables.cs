namespace Stargz.TestSupport;

/// <summary>
/// The shipped native (AOT) executables, as `tests/run-all.sh` publishes them:
/// `dotnet publish src/Stargz.Daemon -c Release -o artifacts/native/daemon` (and src/Stargz.Cli to artifacts/native/cli).
/// End-to-end tests run these, so a trim or AOT break fails them. STARGZ_NATIVE_DIR overrides artifacts/native.
/// Under CI a missing or stale binary fails the test; on a developer's machine the JIT build next to the tests is
/// used instead (say, after `dotnet build` alone), with a line saying so.
/// </summary>
public static class NativeExecutables
{
    public static string? Daemon(string jitAssembly) => Find("daemon", "stargz-snapshotter", jitAssembly);

    public static string? Cli(string? jitAssembly) => Find("cli", "stargz", jitAssembly);

    private static string? Find(string dir, string name, string? jitAssembly)
    {
        var root = Environment.GetEnvironmentVariable("STARGZ_NATIVE_DIR") is { Length: > 0 } d ? d : Path.Combine(StargzCli.RepoRoot(), "artifacts", "native");
        var path = Path.Combine(root, dir, name);
        string? why = null;
        if (!File.Exists(path)) why = $"native {name} not published at {path} (run tests/run-all.sh, or dotnet publish src/... -c Release -o {Path.Combine(root, dir)})";
        // A native binary older than the JIT build of the same code would test yesterday's code.
        else if (jitAssembly != null && File.Exists(jitAssembly) && File.GetLastWriteTimeUtc(path) < File.GetLastWriteTimeUtc(jitAssembly))
            why = $"native {path} is older than the build {jitAssembly}: publish it again";
        if (why is null) return path;
        if (Requires.UnderCi) throw new InvalidOperationException($"under CI the end-to-end tests run the native executables: {why}");
        Console.Error.WriteLine($"note: {why}; using the JIT build");
        return null;
    }
}
