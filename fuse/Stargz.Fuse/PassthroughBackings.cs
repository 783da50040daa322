using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// The passthrough backing-id table and each open's mode. An open is either passthrough (the kernel reads a backing
/// file itself) or cached (page cache or direct I/O through the server); the mode is marked in the top bits of the
/// handle the kernel keeps, so RELEASE undoes exactly what OPEN did. One backing id per inode, shared by its opens
/// (the kernel refuses two different backing files on one inode) and closed on the last release.
/// </summary>
internal sealed unsafe class PassthroughBackings(int masterFd, Action<string>? log)
{
    private const ulong PassthroughHandleBit = 1UL << 63;
    private const ulong CachedOpenBit = 1UL << 62;
    private const ulong HandleBits = PassthroughHandleBit | CachedOpenBit;

    private readonly Lock _lock = new();
    private readonly Dictionary<ulong, (int Id, int Refs)> _backing = [];
    private readonly Dictionary<ulong, int> _cachedOpens = [];
    private volatile bool _usable;
    private long _opens;

    /// <summary>See <see cref="FuseServer.PassthroughUsable"/>.</summary>
    public bool Usable => _usable;

    /// <summary>Opens answered with a backing file.</summary>
    public long Opens => Interlocked.Read(ref _opens);

    /// <summary>Set once INIT has agreed (or not) on passthrough.</summary>
    public void Start(bool negotiated) => _usable = negotiated;

    /// <summary>The filesystem's own handle inside the one the kernel holds.</summary>
    public static ulong FilesystemHandle(ulong fh) => fh & ~HandleBits;

    /// <summary>
    /// Decides the mode of an open of <paramref name="ino"/> while passthrough is usable and writes it into
    /// <paramref name="reply"/>: passthrough flags and backing id, or the cached-open mark.
    /// </summary>
    public void Decide(ulong ino, in FuseOpenResult r, ref OpenOut reply)
    {
        if (!_usable) return;
        // The kernel fails an open (EIO) that mixes passthrough and page-cache I/O on one inode, so an inode
        // stays in the mode of its first open until all its opens are released.
        if (TryShare(ino, r, out int id))
        {
            reply.OpenFlags = OpenFlags.Passthrough;
            reply.BackingId = id;
            reply.Fh |= PassthroughHandleBit;
            Interlocked.Increment(ref _opens);
        }
        // A direct-I/O open counts as cached too: a shared mmap of it moves the inode into page-cache mode.
        else reply.Fh |= CachedOpenBit;
    }

    /// <summary>Undoes what <see cref="Decide"/> marked in <paramref name="fh"/>.</summary>
    public void Release(ulong ino, ulong fh)
    {
        if ((fh & PassthroughHandleBit) != 0) ReleaseBacking(ino);
        else if ((fh & CachedOpenBit) != 0) ReleaseCachedOpen(ino);
    }

    private bool TryShare(ulong ino, in FuseOpenResult r, out int id)
    {
        lock (_lock)
        {
            ref var slot = ref CollectionsMarshal.GetValueRefOrNullRef(_backing, ino);
            if (!Unsafe.IsNullRef(ref slot))
            {
                slot.Refs++;
                id = slot.Id;
                return true;
            }
            id = 0;
            bool cachedOpen = _cachedOpens.ContainsKey(ino);
            if (cachedOpen || (r.BackingPath == null && r.BackingFile == null) || !TryRegister(r, out id))
            {
                CollectionsMarshal.GetValueRefOrAddDefault(_cachedOpens, ino, out _)++;
                return false;
            }
            _backing[ino] = (id, 1);
            return true;
        }
    }

    /// <summary>Registers the backing file with the kernel (caller holds the lock).</summary>
    private bool TryRegister(in FuseOpenResult r, out int id)
    {
        int fd;
        bool own = false;
        if (r.BackingFile != null) fd = (int)r.BackingFile.DangerousGetHandle();
        else
        {
            fd = Native.Open(r.BackingPath!, Native.O_RDONLY | Native.O_CLOEXEC, 0);
            if (fd < 0)
            {
                log?.Invoke($"passthrough: open {r.BackingPath}: errno {Native.LastErrno}; serving reads in user space");
                id = 0;
                return false;
            }
            own = true;
        }
        var map = new BackingMap { Fd = fd };
        id = Native.Ioctl(masterFd, Native.FUSE_DEV_IOC_BACKING_OPEN, &map);
        int e = id < 0 ? Native.LastErrno : 0;
        // The kernel holds its own reference to the file once registered.
        if (own) Native.Close(fd);
        if (id < 0)
        {
            log?.Invoke(e == Native.ELOOP
                ? "passthrough refused (errno 40, ELOOP): the backing file is on a stacked filesystem (overlayfs?) deeper than max_stack_depth 1 allows; passthrough off for this mount, reads served in user space"
                : $"passthrough refused (errno {e}); serving reads in user space");
            if (e is Native.EPERM or Native.ENOTTY or Native.EOPNOTSUPP or Native.ELOOP) _usable = false;
            id = 0;
            return false;
        }
        return true;
    }

    private void ReleaseBacking(ulong ino)
    {
        lock (_lock)
        {
            ref var slot = ref CollectionsMarshal.GetValueRefOrNullRef(_backing, ino);
            if (Unsafe.IsNullRef(ref slot)) return;
            if (--slot.Refs > 0) return;
            int id = slot.Id;
            _backing.Remove(ino);
            Native.Ioctl(masterFd, Native.FUSE_DEV_IOC_BACKING_CLOSE, &id);
        }
    }

    private void ReleaseCachedOpen(ulong ino)
    {
        lock (_lock)
        {
            ref int c = ref CollectionsMarshal.GetValueRefOrNullRef(_cachedOpens, ino);
            if (!Unsafe.IsNullRef(ref c) && --c <= 0) _cachedOpens.Remove(ino);
        }
    }
}
