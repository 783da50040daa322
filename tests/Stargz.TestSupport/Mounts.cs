namespace Stargz.TestSupport;

/// <summary>Reads /proc/self/mountinfo so tests can clean up and assert on what is mounted.</summary>
public static class Mounts
{
    public sealed record MountInfo(string MountPoint, string FsType, string Source, string Options);

    public static List<MountInfo> List()
    {
        var list = new List<MountInfo>();
        foreach (var line in File.ReadAllLines("/proc/self/mountinfo"))
        {
            // id parent maj:min root mountpoint options [optional...] - fstype source superoptions
            var dash = line.IndexOf(" - ", StringComparison.Ordinal);
            if (dash < 0) continue;
            var left = line[..dash].Split(' ');
            var right = line[(dash + 3)..].Split(' ');
            if (left.Length < 5 || right.Length < 3) continue;
            list.Add(new MountInfo(Unescape(left[4]), right[0], Unescape(right[1]), right[2]));
        }
        return list;
    }

    public static List<MountInfo> Under(string dir)
    {
        var prefix = dir.TrimEnd('/') + "/";
        return List().Where(m => m.MountPoint.StartsWith(prefix, StringComparison.Ordinal) || m.MountPoint == dir).ToList();
    }

    /// <summary>Lazily unmounts everything mounted at or below <paramref name="dir"/>, deepest first.</summary>
    public static void UnmountAllUnder(string dir)
    {
        foreach (var m in Under(dir).OrderByDescending(m => m.MountPoint.Length))
            umount2(m.MountPoint, 2 /* MNT_DETACH */);
    }

    /// <summary>Mounts a tmpfs of <paramref name="bytes"/> at <paramref name="dir"/> (a small disk that fills up). Root only.</summary>
    public static void MountTmpfs(string dir, long bytes)
    {
        Directory.CreateDirectory(dir);
        if (mount("tmpfs", dir, "tmpfs", 0, $"size={bytes},mode=0755") != 0)
            throw new IOException($"mount tmpfs at {dir}: errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
    }

    /// <summary>Gives the tmpfs at <paramref name="dir"/> a new size (space returns to a full disk).</summary>
    public static void ResizeTmpfs(string dir, long bytes)
    {
        if (mount("tmpfs", dir, "tmpfs", 32 /* MS_REMOUNT */, $"size={bytes}") != 0)
            throw new IOException($"remount tmpfs at {dir}: errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int mount(string source, string target, string fstype, ulong flags, string data);

    private static string Unescape(string s) =>
        s.Replace("\\040", " ").Replace("\\011", "\t").Replace("\\012", "\n").Replace("\\134", "\\");

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int umount2(string target, int flags);
}
