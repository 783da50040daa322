using System.Runtime.InteropServices;

namespace Stargz.Snapshotter;

/// <summary>
/// Crash tests' hook: when STARGZ_SNAPSHOTTER_CRASH_AT names a point, the process SIGKILLs itself there, so a test can
/// prove that a crash between two steps of an API call leaves a consistent store. Unset in production: a no-op.
/// Points: create:after-rename, commit:after-usage, remove:after-rename, remove:after-commit.
/// </summary>
public static class FaultInjection
{
    public const string Variable = "STARGZ_SNAPSHOTTER_CRASH_AT";
    private static readonly string? Point = Environment.GetEnvironmentVariable(Variable);

    public static void Hit(string point)
    {
        if (Point != null && Point == point)
        {
            Console.Error.WriteLine($"fault injection: SIGKILL at {point}");
            kill(getpid(), 9);
        }
    }

    [DllImport("libc")] private static extern int getpid();
    [DllImport("libc")] private static extern int kill(int pid, int sig);
}
