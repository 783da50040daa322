namespace Stargz.TestSupport;

/// <summary>
/// Our `stargz` command (src/Stargz.Cli) as a child process, the way a user runs it: the native executable
/// (<see cref="NativeExecutables"/>), or on a developer's machine without it a JIT build, built once per test run from
/// this checkout into a private artifacts dir under /tmp, so the build neither depends on nor disturbs the
/// checkout's own bin/obj dirs (other builds may be using them at the same time).
/// </summary>
public static class StargzCli
{
    private static readonly SemaphoreSlim BuildLock = new(1, 1);
    private static string? _dll;

    /// <summary>The checkout's root: the first parent of the test assembly's dir that holds Stargz.sln.</summary>
    public static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "Stargz.sln"))) return d.FullName;
        throw new DirectoryNotFoundException($"no Stargz.sln above {AppContext.BaseDirectory}");
    }

    public static async Task<string> DllAsync()
    {
        await BuildLock.WaitAsync();
        try
        {
            if (_dll != null) return _dll;
            var artifacts = Path.Combine(Path.GetTempPath(), "stargz-cli-test-build");
            var project = Path.Combine(RepoRoot(), "src", "Stargz.Cli", "Stargz.Cli.csproj");
            (await ProcessRunner.RunAsync(Dotnet(), ["build", project, "-c", "Release", "--artifacts-path", artifacts, "-nologo", "-v", "q",
                    // No MSBuild nodes or compiler server left running after the tests.
                    "-nodeReuse:false", "-p:UseSharedCompilation=false"],
                TimeSpan.FromMinutes(10))).EnsureSuccess("dotnet build src/Stargz.Cli");
            var dll = Directory.EnumerateFiles(Path.Combine(artifacts, "bin", "Stargz.Cli"), "stargz.dll", SearchOption.AllDirectories).FirstOrDefault()
                      ?? throw new FileNotFoundException($"stargz.dll not found under {artifacts}");
            return _dll = dll;
        }
        finally
        {
            BuildLock.Release();
        }
    }

    /// <summary>Runs `stargz ARGS...` and returns its exit code and output.</summary>
    public static async Task<ProcessResult> RunAsync(IEnumerable<string> args, TimeSpan? timeout = null)
    {
        var (file, all) = await CommandAsync();
        all.AddRange(args);
        return await ProcessRunner.RunAsync(file, all, timeout ?? TimeSpan.FromMinutes(5));
    }

    /// <summary>The program to start and its first arguments: the native `stargz`, else `dotnet stargz.dll`.</summary>
    public static async Task<(string File, List<string> Args)> CommandAsync()
    {
        if (NativeExecutables.Cli(null) is { } native) return (native, []);
        return (Dotnet(), [await DllAsync()]);
    }

    private static string Dotnet() =>
        Requires.Which("dotnet") ?? Path.Combine(Environment.GetEnvironmentVariable("DOTNET_ROOT") ?? "/usr/share/dotnet", "dotnet");
}
