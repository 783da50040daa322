namespace Stargz.Snapshotter;

/// <summary>Disk usage as containerd counts it: allocated bytes (st_blocks*512) and inodes, hard links counted once.</summary>
public static class DiskUsage
{
    public static (long Size, long Inodes) Of(string dir)
    {
        var seen = new HashSet<(ulong, ulong)>();
        long size = 0;
        var stack = new Stack<string>();
        stack.Push(dir);
        while (stack.Count > 0)
        {
            var d = stack.Pop();
            var st = Native.Lstat(d);
            if (st is { } s && seen.Add((s.Dev, s.Ino))) size += s.Bytes;
            IEnumerable<string> entries;
            try { entries = Directory.EnumerateFileSystemEntries(d).ToList(); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { continue; }
            foreach (var e in entries)
            {
                var info = new FileInfo(e);
                if (info.Attributes.HasFlag(FileAttributes.Directory) && info.LinkTarget == null)
                {
                    stack.Push(e);
                    continue;
                }
                var es = Native.Lstat(e);
                if (es is { } x && seen.Add((x.Dev, x.Ino))) size += x.Bytes;
            }
        }
        return (size, seen.Count);
    }
}
