namespace Stargz.Fuse;

/// <summary>One line of /proc/self/mountinfo.</summary>
internal sealed record MountInfo(string DeviceId, string MountPoint, string FsType, string Source)
{
    /// <summary>The topmost mount at exactly <paramref name="mountPoint"/>, or null.</summary>
    public static MountInfo? Find(string mountPoint)
    {
        MountInfo? found = null;
        foreach (var line in File.ReadLines("/proc/self/mountinfo"))
        {
            // id parent maj:min root mountpoint options [optional...] - fstype source superopts
            var parts = line.Split(' ');
            if (parts.Length < 10) continue;
            var mp = Unescape(parts[4]);
            if (mp != mountPoint) continue;
            int dash = Array.IndexOf(parts, "-", 6);
            if (dash < 0 || dash + 2 >= parts.Length) continue;
            found = new MountInfo(parts[2], mp, parts[dash + 1], Unescape(parts[dash + 2]));
        }
        return found;
    }

    /// <summary>True when the topmost mount at <paramref name="mountPoint"/> is a FUSE filesystem.</summary>
    public static bool IsFuseMount(string mountPoint) =>
        Find(mountPoint) is { } m && (m.FsType == "fuse" || m.FsType.StartsWith("fuse.", StringComparison.Ordinal));

    // mountinfo escapes space, tab, newline and backslash as \ooo.
    private static string Unescape(string s)
    {
        if (!s.Contains('\\')) return s;
        var sb = new System.Text.StringBuilder(s.Length);
        for (int i = 0; i < s.Length; i++)
        {
            if (s[i] == '\\' && i + 3 < s.Length && char.IsAsciiDigit(s[i + 1]))
            {
                sb.Append((char)Convert.ToInt32(s.Substring(i + 1, 3), 8));
                i += 3;
            }
            else sb.Append(s[i]);
        }
        return sb.ToString();
    }
}
