using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Stargz.Fuse.Handover;

namespace Stargz.Fuse;

/// <summary>
/// One mounted FUSE filesystem: the /dev/fuse connection, its reader threads and its lifetime. Create with
/// <see cref="Mount"/>; end with <see cref="Unmount"/> or Dispose.
/// </summary>
/// <remarks>
/// Split as go-fuse splits its server: this class mounts, runs the readers and ends the connection; the
/// <see cref="RequestDispatcher"/> answers requests; <see cref="ReplyWriter"/> and <see cref="FileReplies"/> write
/// replies (write, writev, splice, pread); <see cref="FuseSession"/> holds what INIT agreed;
/// <see cref="PassthroughBackings"/> the backing ids and open modes; <see cref="LookupCounts"/> the kernel's node
/// references; <see cref="KernelMount"/> the mount syscalls and dead-mount helpers.
/// </remarks>
public sealed class FuseServer : IDisposable
{
    private readonly FuseMountOptions _opt;
    private readonly int _masterFd;
    private readonly List<int> _fds = [];
    private readonly FuseSession _session;
    private readonly PassthroughBackings _backings;
    private readonly LookupCounts _lookups;
    private readonly InflightReads _inflight = new();
    private readonly FileReplies _fileReplies;
    private readonly RequestDispatcher _dispatcher;
    private readonly ReplyWriter _replies;
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _liveReaders;
    private int _unmounted;
    private int _fdsClosed;

    /// <summary>Absolute path of the mount point (where it was mounted, or moved to: <see cref="MovedTo"/>).</summary>
    public string MountPoint { get; private set; }
    // The connection's name in the fd store when it is not the mount point's (a detached connection: StoreDetached).
    private string? _storeName;
    /// <summary>Negotiated protocol minor version (7.x).</summary>
    public uint ProtocolMinor => _session.ProtocolMinor;
    /// <summary>True when the kernel accepted passthrough in INIT.</summary>
    public bool PassthroughNegotiated => _session.Passthrough;
    /// <summary>
    /// True while opens may still be answered with a backing file: passthrough was negotiated and the kernel has not
    /// refused a backing file for good (EPERM: no CAP_SYS_ADMIN; ENOTTY/EOPNOTSUPP; ELOOP: the backing file is on a
    /// stacked filesystem such as overlayfs, deeper than this mount's max_stack_depth of 1 allows — taken to hold for
    /// every backing file of the mount, which in practice come from one place, rather than retried and logged per open).
    /// </summary>
    public bool PassthroughUsable => _backings.Usable;
    /// <summary>
    /// True when the kernel accepted FUSE_DIRECT_IO_ALLOW_MMAP in INIT: files opened with
    /// <see cref="FuseOpenResult.DirectIo"/> can also be mapped shared (otherwise mmap(MAP_SHARED) fails with ENODEV).
    /// </summary>
    public bool DirectIoAllowMmapNegotiated => _session.DirectIoAllowMmap;
    /// <summary>Completes when the kernel connection ends (unmount, abort, or device closed).</summary>
    public Task Completion => _completion.Task;
    /// <summary>READ requests that reached user space (passthrough reads never do).</summary>
    public long ReadRequests => _dispatcher.RequestCount((int)Opcode.Read);
    /// <summary>Opens answered with a kernel backing file.</summary>
    public long PassthroughOpens => _backings.Opens;
    /// <summary>Opens answered with FOPEN_DIRECT_IO (reads bypass the page cache).</summary>
    public long DirectIoOpens => _dispatcher.DirectIoOpens;
    /// <summary>READs answered by splicing the bytes from a file (<see cref="IFuseFileSystem.TryReadFromFile"/>).</summary>
    public long SplicedReads => _fileReplies.Spliced;
    /// <summary>READs of <see cref="IFuseFileSystem.TryReadFromFile"/> ranges that could not be spliced and were read with pread.</summary>
    public long FileReadFallbacks => _fileReplies.Fallbacks;
    /// <summary>
    /// READs whose <see cref="IFuseFileSystem.TryReadFromFile"/> range could not be read (EIO and the like) and were
    /// served through <see cref="IFuseFileSystem.ReadAsync"/> instead.
    /// </summary>
    public long FileReadErrors => _fileReplies.ReadErrors;
    /// <summary>Requests of <paramref name="opcode"/> (FUSE opcode number) seen so far.</summary>
    public long RequestCount(int opcode) => _dispatcher.RequestCount(opcode);
    /// <summary>The kernel's current reference count on <paramref name="ino"/> (0 when forgotten).</summary>
    public ulong LookupCount(ulong ino) => _lookups.Count(ino);

    /// <summary>
    /// The largest READ reply that <see cref="IFuseFileSystem.TryReadFromFile"/> can splice in this process (any
    /// alignment): 1 MiB with CAP_SYS_RESOURCE, else what fs.pipe-max-size leaves (1016 KiB by default). Keep
    /// <see cref="FuseMountOptions.MaxRead"/> at or below it where file replies matter; larger replies are copied.
    /// </summary>
    public static int LargestSplicedRead => FileReplies.LargestSplicedRead;

    private FuseServer(string mountPoint, IFuseFileSystem fs, FuseMountOptions opt, int fd, FuseAgreement? adopted = null)
    {
        MountPoint = mountPoint;
        _opt = opt;
        _masterFd = fd;
        _session = new FuseSession(opt);
        if (adopted is { } a) _session.Restore(a);
        var replies = _replies = new ReplyWriter(opt.Log);
        _fileReplies = new FileReplies(replies, _session.MaxRead, opt.Log);
        _backings = new PassthroughBackings(fd, opt.Log, opt.Connections?.ModesPath(mountPoint));
        _lookups = new LookupCounts(fs);
        _dispatcher = new RequestDispatcher(fs, opt, _session, replies, _fileReplies, _backings, _lookups, _inflight);
    }

    /// <summary>True when this server took over a connection an earlier process left in the fd store.</summary>
    public bool Adopted { get; private set; }
    /// <summary>
    /// Requests of an adopted connection that waited for this server: queued while no process served it, or read by
    /// the earlier process and sent again (FUSE_NOTIFY_RESEND).
    /// </summary>
    public long WaitedRequests => Interlocked.Read(ref _waited) + _dispatcher.ResentRequests;
    private long _waited;

    /// <summary>
    /// Mounts <paramref name="fs"/> at <paramref name="mountPoint"/> and starts serving; returns after INIT. When
    /// <see cref="FuseMountOptions.Connections"/> holds a live connection for the mount point (left by an earlier
    /// process), it is adopted instead: no mount(2), no INIT, the kernel's queued requests are answered by
    /// <paramref name="fs"/>, which must number its nodes as the earlier server did.
    /// </summary>
    public static FuseServer Mount(string mountPoint, IFuseFileSystem fs, FuseMountOptions? options = null)
    {
        var opt = options ?? new FuseMountOptions();
        mountPoint = Path.GetFullPath(mountPoint);
        if (opt.Connections?.Take(mountPoint) is { } adopted) return Adopt(adopted, fs, opt);
        int fd = KernelMount.Mount(mountPoint, opt);
        var server = new FuseServer(mountPoint, fs, opt, fd);
        try
        {
            server.StartReaders();
            var agreed = server._session.Agreed;
            if (!agreed.Wait(opt.InitTimeout))
                throw new TimeoutException($"FUSE INIT did not arrive within {opt.InitTimeout}");
            if (agreed.IsFaulted) agreed.GetAwaiter().GetResult();
            if (opt.ReadAheadKb is int ra) KernelMount.SetReadAhead(mountPoint, ra, opt.Log);
            // Stored only once INIT is answered: a process that adopts it never waits for an INIT the kernel will not resend.
            opt.Connections?.Keep(mountPoint, server._fds, server._session.Agreement);
        }
        catch
        {
            server.Unmount();
            throw;
        }
        return server;
    }

    private static unsafe FuseServer Adopt(AdoptedConnection c, IFuseFileSystem fs, FuseMountOptions opt)
    {
        var server = new FuseServer(c.MountPoint, fs, opt, c.Fds[0], c.Agreement) { Adopted = true, _storeName = c.StoreName };
        if (c.DetachedTag != null) server._unmounted = 1; // no mount point to unmount: it ends with what was made over it
        server._backings.Start(c.Agreement.Passthrough, adopted: true);
        server._fds.AddRange(c.Fds);
        // Requests the earlier process had read but not answered sit on its (stored) fds' processing lists: the kernel
        // queues them again, marked as resent, and they are answered like any other (Linux 6.9+; older kernels ignore
        // the notification and those requests wait until the mount ends).
        if (!server._replies.Notify(server._masterFd, NotifyResend))
            opt.Log?.Invoke($"FUSE_NOTIFY_RESEND on {c.MountPoint}: errno {Native.LastErrno}; requests read by the previous process are not sent again");
        server.DrainQueued();
        server.StartReaderThreads();
        return server;
    }

    /// <summary>FUSE_NOTIFY_RESEND: move every request read but not answered back to the pending queue.</summary>
    private const int NotifyResend = 7;

    /// <summary>Answers what queued while no process served the connection, counting it, before the readers start.</summary>
    private unsafe void DrainQueued()
    {
        const int F_GETFL = 3, F_SETFL = 4, O_NONBLOCK = 0x800;
        int flags = Native.Fcntl(_masterFd, F_GETFL, 0);
        if (flags < 0 || Native.Fcntl(_masterFd, F_SETFL, flags | O_NONBLOCK) != 0) return;
        var ctx = new ReaderContext(_masterFd);
        var req = GC.AllocateUninitializedArray<byte>(FuseSession.RequestBufferSize, pinned: true);
        byte* reqPtr = (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(req));
        try
        {
            while (true)
            {
                nint n = Native.Read(_masterFd, reqPtr, req.Length);
                if (n < 0)
                {
                    int e = Native.LastErrno;
                    if (e is Native.EINTR or Native.ENOENT) continue;
                    break; // EAGAIN: the queue is empty
                }
                if (n < RequestDispatcher.InHeaderSize) continue;
                Interlocked.Increment(ref _waited);
                var request = new ReadOnlySpan<byte>(reqPtr, (int)n);
                try { _dispatcher.Dispatch(ctx, request); }
                catch (Exception ex)
                {
                    _opt.Log?.Invoke($"FUSE handler failed: {ex}");
                    _dispatcher.Failed(ctx, request);
                }
            }
        }
        finally
        {
            Native.Fcntl(_masterFd, F_SETFL, flags);
            ctx.Dispose();
        }
    }

    // ---------------------------------------------------------------- readers

    private unsafe void StartReaders()
    {
        _fds.Add(_masterFd);
        int n = Math.Clamp(_opt.ReaderThreads, 1, 64);
        // With a store, every reader fd is kept in it: a clone closed by a dying process would fail (ECONNABORTED) the
        // requests it had read, where a stored one keeps them for the next process to answer.
        for (int i = 1; i < n; i++)
        {
            // A cloned fd shares the connection's input queue but has its own processing list, so readers do not
            // serialise on one file; replies must go back on the fd the request was read from.
            int c = Native.Open("/dev/fuse", Native.O_RDWR | Native.O_CLOEXEC, 0);
            if (c < 0) break;
            uint master = (uint)_masterFd;
            if (Native.Ioctl(c, Native.FUSE_DEV_IOC_CLONE, &master) != 0)
            {
                _opt.Log?.Invoke($"FUSE_DEV_IOC_CLONE failed: errno {Native.LastErrno}; sharing one fd");
                Native.Close(c);
                c = _masterFd;
            }
            _fds.Add(c);
        }
        StartReaderThreads();
    }

    private void StartReaderThreads()
    {
        _liveReaders = _fds.Count;
        for (int i = 0; i < _fds.Count; i++)
            new Thread(ReaderLoop) { IsBackground = true, Name = $"fuse-reader-{i}" }.Start(_fds[i]);
    }

    private unsafe void ReaderLoop(object? state)
    {
        var ctx = new ReaderContext((int)state!);
        var req = GC.AllocateUninitializedArray<byte>(FuseSession.RequestBufferSize, pinned: true);
        byte* reqPtr = (byte*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(req));
        try
        {
            while (true)
            {
                nint n = Native.Read(ctx.Fd, reqPtr, req.Length);
                if (n < 0)
                {
                    int e = Native.LastErrno;
                    // ENOENT: the request was interrupted before we got it; EINTR/EAGAIN: retry.
                    if (e is Native.EINTR or Native.EAGAIN or Native.ENOENT) continue;
                    if (e != Native.ENODEV) _opt.Log?.Invoke($"read /dev/fuse: errno {e}");
                    break;
                }
                if (n < RequestDispatcher.InHeaderSize) continue;
                var request = new ReadOnlySpan<byte>(reqPtr, (int)n);
                try
                {
                    _dispatcher.Dispatch(ctx, request);
                }
                catch (Exception ex)
                {
                    _opt.Log?.Invoke($"FUSE handler failed: {ex}");
                    _dispatcher.Failed(ctx, request);
                }
            }
        }
        finally
        {
            ctx.Dispose();
            if (Interlocked.Decrement(ref _liveReaders) == 0) OnAllReadersDone();
        }
    }

    private void OnAllReadersDone()
    {
        _session.Ended();
        _inflight.CancelAll();
        // Async reads still finishing would write to our fds; closing them first could let a reused fd number
        // receive a stray reply. Wait (bounded) for them, and rather leak the fds than risk that.
        _ = Task.Run(DrainThenCloseAsync);
    }

    private async Task DrainThenCloseAsync()
    {
        // The connection is over (unmounted or aborted): the store lets go of it too.
        if (_storeName is { } name) _opt.Connections?.DropName(name);
        else _opt.Connections?.Drop(MountPoint);
        if (await _inflight.DrainAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false)) CloseFds();
        else _opt.Log?.Invoke($"{_inflight.Count} FUSE reads did not finish after the connection ended; leaving fds open");
        _backings.Dispose();
        _completion.TrySetResult();
    }

    private void CloseFds()
    {
        if (Interlocked.Exchange(ref _fdsClosed, 1) == 1) return;
        var seen = new HashSet<int>();
        foreach (var fd in _fds)
            if (seen.Add(fd)) Native.Close(fd);
    }

    // ---------------------------------------------------------------- lifetime

    /// <summary>
    /// Unmounts and waits (bounded) for the readers to end. <paramref name="lazy"/> = false: a clean umount2, and if
    /// the mount is busy the connection is aborted (MNT_FORCE: open files then fail with ENOTCONN) and the mount
    /// detached. <paramref name="lazy"/> = true: detach now and keep serving already open files until they close;
    /// <see cref="Completion"/> finishes then. Safe to call more than once.
    /// </summary>
    public void Unmount(bool lazy = false)
    {
        if (Interlocked.Exchange(ref _unmounted, 1) == 1) { if (!lazy) WaitReaders(TimeSpan.FromSeconds(5)); return; }
        KernelMount.Unmount(MountPoint, _opt, lazy);
        if (lazy) return;
        if (!WaitReaders(TimeSpan.FromSeconds(10)))
            _opt.Log?.Invoke($"FUSE readers of {MountPoint} did not stop within 10 s");
    }

    private bool WaitReaders(TimeSpan timeout) => _completion.Task.Wait(timeout);

    /// <summary>
    /// The mount was moved (a clone put at <paramref name="mountPoint"/>, the original detached): later unmounts go
    /// there, and the fd store keeps the connection under its new mount point.
    /// </summary>
    public void MovedTo(string mountPoint)
    {
        var old = _storeName;
        var oldMountPoint = MountPoint;
        MountPoint = Path.GetFullPath(mountPoint);
        _storeName = null;
        if (_opt.Connections is not { } store || Volatile.Read(ref _fdsClosed) != 0) return;
        store.Keep(MountPoint, _fds, _session.Agreement);
        if (old != null) store.DropName(old);
        else store.Drop(oldMountPoint);
    }

    /// <summary>
    /// Detaches the mount (lazily: open files and the overlays made over it keep the connection) and keeps the connection
    /// in the fd store under a name of its own, tagged with <paramref name="tag"/> (what its next server needs to know,
    /// e.g. the layer), so that a mount made at the same point later is stored apart and a new process can adopt this one
    /// (<see cref="FuseConnectionStore.TakeDetached"/>).
    /// </summary>
    public void DetachKeepingConnection(string tag)
    {
        Unmount(lazy: true);
        if (_opt.Connections is not { } store || Volatile.Read(ref _fdsClosed) != 0) return;
        var name = FuseConnectionStore.DetachedNameOf(MountPoint, tag);
        if (name == _storeName) return;
        store.Keep(MountPoint, _fds, _session.Agreement, name, tag);
        if (_storeName is { } old) store.DropName(old);
        else store.Drop(MountPoint);
        _storeName = name;
    }

    /// <summary>Serves a detached connection a store passed back at start (<see cref="FuseConnectionStore.TakeDetached"/>).</summary>
    public static FuseServer AdoptDetached(AdoptedConnection c, IFuseFileSystem fs, FuseMountOptions opt)
    {
        if (c.DetachedTag == null) throw new ArgumentException($"the connection of {c.MountPoint} is not a detached one", nameof(c));
        return Adopt(c, fs, opt);
    }

    public void Dispose() => Unmount();

    // ---------------------------------------------------------------- static helpers

    /// <summary>
    /// True if <paramref name="path"/> is a FUSE mount whose server is gone ("Transport endpoint is not connected").
    /// With <paramref name="timeout"/>, a server that does not answer a forced stat in time counts as gone too
    /// (the probing thread stays blocked until the mount is aborted or the server answers).
    /// </summary>
    public static bool IsDeadMount(string path, TimeSpan? timeout = null) => KernelMount.IsDeadMount(path, timeout);

    /// <summary>True if <paramref name="path"/> is a mount point (per /proc/self/mountinfo).</summary>
    public static bool IsMountPoint(string path) => MountInfo.Find(Path.GetFullPath(path)) != null;

    /// <summary>
    /// If <paramref name="path"/> is a dead (or, with <paramref name="timeout"/>, unresponsive) FUSE mount, aborts
    /// its connection (MNT_FORCE: anything still waiting on it gets ENOTCONN) and unmounts it, detaching if busy.
    /// Returns true when such a mount was removed.
    /// </summary>
    public static bool CleanupDeadMount(string path, TimeSpan? timeout = null) => KernelMount.CleanupDeadMount(path, timeout);
}
