using System.Globalization;
using Stargz.TestSupport;

namespace Stargz.Daemon.Tests;

/// <summary>
/// The native daemon is built with the methods of src/Stargz.Daemon/hot-methods.order placed first, together: that is
/// what keeps most of its code out of memory (the kernel maps an executable's code in folios of 64 KiB and more).
/// </summary>
public class HotMethodOrderTests
{
    [Fact]
    public async Task The_native_daemon_has_the_recorded_methods_first_and_the_record_names_the_daemons_methods()
    {
        var exe = NativeExecutables.Daemon(LocalDaemon.DllPath());
        if (exe is null) Assert.Skip("skipped on this machine: no native daemon published (the JIT build has no method order)");
        var dbg = exe + ".dbg";
        Assert.True(File.Exists(dbg), $"{dbg}: the publish leaves the executable's symbols there (StripSymbols)");
        var listed = new HashSet<string>(StringComparer.Ordinal);
        foreach (var line in File.ReadLines(Path.Combine(StargzCli.RepoRoot(), "src", "Stargz.Daemon", "hot-methods.order")))
            if (line.Length > 0 && line[0] != '#') listed.Add(line);

        var (start, size) = await ManagedCodeSection(exe);
        var nm = await ProcessRunner.RunAsync(Requires.Command("nm"), ["-n", dbg]);
        nm.EnsureSuccess($"nm -n {dbg}");
        // Per address in the managed code, whether a recorded method is there (folded bodies share an address).
        var hotAt = new SortedDictionary<ulong, bool>();
        var found = new HashSet<string>(StringComparer.Ordinal);
        foreach (var line in nm.StdOut.Split('\n'))
        {
            var p = line.Split(' ');
            if (p.Length != 3 || p[1] is not ("t" or "T")) continue;
            var addr = ulong.Parse(p[0], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            if (addr < start || addr >= start + size) continue;
            var hot = listed.Contains(p[2]);
            if (hot) found.Add(p[2]);
            hotAt[addr] = hotAt.GetValueOrDefault(addr) || hot;
        }

        // A record that no longer names the daemon's methods orders nothing: run integration/bench/hot-methods/record.sh.
        Assert.True(found.Count >= listed.Count * 9 / 10,
            $"{found.Count} of the {listed.Count} recorded methods are in {exe}: the record is stale (integration/bench/hot-methods/record.sh)");
        // The build applied it: the recorded methods come first. A few runtime helpers have fixed places of their own.
        var hotAfterCold = 0;
        var seenCold = false;
        foreach (var hot in hotAt.Values)
        {
            if (!hot) seenCold = true;
            else if (seenCold) hotAfterCold++;
        }
        Assert.True(hotAfterCold <= found.Count / 100,
            $"{hotAfterCold} of {found.Count} recorded methods lie after the first method not recorded: the build did not order them");
    }

    /// <summary>Address and size of the executable's <c>__managedcode</c> section.</summary>
    private static async Task<(ulong Start, ulong Size)> ManagedCodeSection(string exe)
    {
        var r = await ProcessRunner.RunAsync(Requires.Command("readelf"), ["-SW", exe]);
        r.EnsureSuccess($"readelf -SW {exe}");
        foreach (var line in r.StdOut.Split('\n'))
        {
            var p = line.Replace("[ ", "[", StringComparison.Ordinal).Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (p.Length > 5 && p[1] == "__managedcode")
                return (ulong.Parse(p[3], NumberStyles.HexNumber, CultureInfo.InvariantCulture), ulong.Parse(p[5], NumberStyles.HexNumber, CultureInfo.InvariantCulture));
        }
        throw new InvalidOperationException($"{exe}: no __managedcode section\n{r.StdOut}");
    }
}
