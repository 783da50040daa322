using System.Runtime.InteropServices;
using CtdMount = Containerd.Types.Mount;

namespace Stargz.Containerd;

/// <summary>
/// The mounts a snapshotter returned for a Prepare, mounted by us at one directory (mount(2), no helper binaries):
/// an <c>overlay</c> (or any filesystem type) with its options, or a <c>bind</c>. Dispose unmounts (lazily if busy).
/// </summary>
public sealed partial class RootfsMount : IDisposable
{
    private const ulong MS_RDONLY = 0x1, MS_BIND = 0x1000, MS_REC = 0x4000;
    private const int MNT_DETACH = 0x2;

    public string Target { get; }

    /// <summary>The layer directories, topmost first, when the mount is an overlay (its <c>lowerdir=</c>); else empty.</summary>
    public IReadOnlyList<string> LowerDirs { get; }

    private bool _mounted;

    private RootfsMount(string target, IReadOnlyList<string> lowerDirs)
    {
        Target = target;
        LowerDirs = lowerDirs;
        _mounted = true;
    }

    public static RootfsMount Mount(IReadOnlyList<CtdMount> mounts, string target)
    {
        if (mounts.Count != 1) throw new IOException($"want exactly one rootfs mount, the snapshotter returned {mounts.Count}");
        var m = mounts[0];
        var (flags, data, lower) = Translate(m.Type, m.Options);
        var type = m.Type is "bind" or "rbind" ? null : m.Type;
        if (mount(m.Source, target, type, flags, data) != 0)
            throw new IOException($"mount {m.Type} {m.Source} on {target}: {Marshal.GetLastPInvokeErrorMessage()} (errno {Marshal.GetLastPInvokeError()})");
        return new RootfsMount(target, lower);
    }

    /// <summary>containerd's mount options as mount(2) flags and data: bind/rbind/ro become flags, the rest is passed
    /// to the filesystem; an overlay's <c>lowerdir=</c> list is returned too (topmost first).</summary>
    internal static (ulong Flags, string? Data, IReadOnlyList<string> LowerDirs) Translate(string type, IEnumerable<string> options)
    {
        ulong flags = type is "bind" or "rbind" ? MS_BIND | (type == "rbind" ? MS_REC : 0) : 0;
        var data = new List<string>();
        IReadOnlyList<string> lower = [];
        foreach (var o in options)
        {
            switch (o)
            {
                case "bind": flags |= MS_BIND; break;
                case "rbind": flags |= MS_BIND | MS_REC; break;
                case "ro": flags |= MS_RDONLY; break;
                case "rw": break;
                default:
                    if (o.StartsWith("lowerdir=", StringComparison.Ordinal)) lower = o["lowerdir=".Length..].Split(':');
                    data.Add(o);
                    break;
            }
        }
        return (flags, (flags & MS_BIND) != 0 || data.Count == 0 ? null : string.Join(',', data), lower);
    }

    public void Dispose()
    {
        if (!_mounted) return;
        _mounted = false;
        // A process still holding a file in it (the shim tearing down) must not keep the mount forever: detach.
        if (umount2(Target, 0) != 0) umount2(Target, MNT_DETACH);
    }

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int mount(string source, string target, string? fstype, ulong flags, string? data);

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int umount2(string target, int flags);
}
