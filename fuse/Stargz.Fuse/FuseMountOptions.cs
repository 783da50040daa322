namespace Stargz.Fuse;

/// <summary>How to mount and serve. Defaults suit a read-only layer mounted by root.</summary>
public sealed class FuseMountOptions
{
    /// <summary>Let users other than the mounter see the mount (needed for containers).</summary>
    public bool AllowOther { get; init; }
    /// <summary>The kernel checks permissions from the mode bits; the filesystem does not.</summary>
    public bool DefaultPermissions { get; init; } = true;
    public bool ReadOnly { get; init; } = true;
    /// <summary>The source shown in /proc/mounts.</summary>
    public string FsName { get; init; } = "stargz";
    /// <summary>Type shown as fuse.SUBTYPE; null for plain "fuse".</summary>
    public string? Subtype { get; init; } = "stargz";
    /// <summary>
    /// Largest READ the kernel sends (bytes, multiple of 4096, at most 1 MiB). Replies spliced from a file
    /// (<see cref="IFuseFileSystem.TryReadFromFile"/>) go without a copy up to <see cref="FuseServer.LargestSplicedRead"/>.
    /// </summary>
    public int MaxRead { get; init; } = 1 << 20;
    /// <summary><see cref="MaxRead"/> as the kernel is told it: whole pages, 4 KiB to 1 MiB.</summary>
    internal int MaxReadBytes => Math.Clamp(MaxRead / 4096 * 4096, 4096, 256 * 4096);
    public TimeSpan AttrTimeout { get; init; } = TimeSpan.FromSeconds(1);
    public TimeSpan EntryTimeout { get; init; } = TimeSpan.FromSeconds(1);
    /// <summary>How long the kernel may remember that a name does not exist (0 = not at all).</summary>
    public TimeSpan NegativeTimeout { get; init; } = TimeSpan.Zero;
    /// <summary>Threads reading requests, each on its own cloned /dev/fuse fd.</summary>
    public int ReaderThreads { get; init; } = 4;
    /// <summary>Ask the kernel for FUSE passthrough (6.9+, needs CAP_SYS_ADMIN); reads fall back to user space if refused.</summary>
    public bool Passthrough { get; init; }
    /// <summary>
    /// Ask the kernel (7.39+, Linux 6.6+) to allow shared mmap of files opened with
    /// <see cref="FuseOpenResult.DirectIo"/>; without it such an mmap(MAP_SHARED) fails with ENODEV. Private
    /// mappings (exec, MAP_PRIVATE) work either way. What the kernel agreed: <see cref="FuseServer.DirectIoAllowMmapNegotiated"/>.
    /// </summary>
    public bool DirectIoAllowMmap { get; init; } = true;
    /// <summary>If set, written to the mount's /sys/class/bdi/*/read_ahead_kb after mounting.</summary>
    public int? ReadAheadKb { get; init; }
    /// <summary>Longest wait for the kernel's INIT after mount(2).</summary>
    public TimeSpan InitTimeout { get; init; } = TimeSpan.FromSeconds(10);
    /// <summary>Mount through fusermount3 even as root (non-root always does).</summary>
    public bool UseFusermount { get; init; }
    /// <summary>
    /// Where connections are kept across restarts of this process (the service manager's fd store), or null: a mount
    /// in the store is adopted instead of mounted again, and a new mount is stored once INIT is answered.
    /// </summary>
    public Handover.FuseConnectionStore? Connections { get; init; }
    /// <summary>Diagnostics sink (passthrough refusals, unexpected errors); null = silent.</summary>
    public Action<string>? Log { get; init; }
}
