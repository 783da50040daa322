using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// The passthrough backing-id table and each open's mode. An open is either passthrough (the kernel reads a backing
/// file itself) or cached (page cache or direct I/O through the server); the mode is marked in the top bits of the
/// handle the kernel keeps, so RELEASE undoes exactly what OPEN did. One backing id per inode, shared by its opens
/// (the kernel refuses two different backing files on one inode) and closed on the last release.
/// </summary>
/// <remarks>
/// With <paramref name="modesPath"/> (a connection kept over restarts), the modes live in a file mapped shared
/// (<see cref="OpenModes"/>): a process that adopts the connection releases the earlier one's opens right and shares
/// its backing ids instead of registering a second backing file on an inode (which the kernel refuses).
/// </remarks>
internal sealed unsafe class PassthroughBackings(int masterFd, Action<string>? log, string? modesPath = null) : IDisposable
{
    private const ulong PassthroughHandleBit = 1UL << 63;
    private const ulong CachedOpenBit = 1UL << 62;
    private const ulong HandleBits = PassthroughHandleBit | CachedOpenBit;

    private readonly Lock _lock = new();
    private readonly OpenModes _modes = new();
    private volatile bool _usable;
    private long _opens;

    /// <summary>See <see cref="FuseServer.PassthroughUsable"/>.</summary>
    public bool Usable => _usable;

    /// <summary>Opens answered with a backing file.</summary>
    public long Opens => Interlocked.Read(ref _opens);

    /// <summary>
    /// Set once INIT has agreed (or not) on passthrough, or when an adopted connection's agreement is restored
    /// (<paramref name="adopted"/>: the kept modes are taken over).
    /// </summary>
    public void Start(bool negotiated, bool adopted = false)
    {
        if (negotiated && modesPath != null)
        {
            try
            {
                lock (_lock) _modes.Persist(modesPath, adopted);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Without the kept modes an adopting process could not tell passthrough inodes from cached ones.
                log?.Invoke($"passthrough off: cannot keep open modes in {modesPath}: {e.Message}");
                _usable = false;
                return;
            }
        }
        _usable = negotiated;
    }

    public void Dispose()
    {
        lock (_lock) _modes.Dispose();
    }

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
            if (_modes.TryShareBacking(ino, out id)) return true;
            id = 0;
            if (_modes.HasCachedOpens(ino) || (r.BackingPath == null && r.BackingFile == null) || !TryRegister(r, out id))
            {
                _modes.AddCachedOpen(ino);
                return false;
            }
            _modes.SetBacking(ino, id);
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
            int id = _modes.ReleaseBacking(ino);
            if (id > 0) Native.Ioctl(masterFd, Native.FUSE_DEV_IOC_BACKING_CLOSE, &id);
        }
    }

    private void ReleaseCachedOpen(ulong ino)
    {
        lock (_lock) _modes.ReleaseCachedOpen(ino);
    }
}
