using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// One mounted FUSE filesystem: the /dev/fuse connection, its reader threads and the bridge from kernel requests
/// to an <see cref="IFuseFileSystem"/>. Create with <see cref="Mount"/>; end with <see cref="Unmount"/> or Dispose.
/// </summary>
public sealed unsafe partial class FuseServer : IDisposable
{
    private const int OutHeaderSize = 16;
    private const int InHeaderSize = 40;
    private const ulong PassthroughHandleBit = 1UL << 63;
    private const ulong CachedOpenBit = 1UL << 62;
    private const ulong HandleBits = PassthroughHandleBit | CachedOpenBit;
    private const uint OurMinor = 40; // 7.40 adds backing_id and max_stack_depth (passthrough)

    private readonly IFuseFileSystem _fs;
    private readonly FuseMountOptions _opt;
    private readonly int _masterFd;
    private readonly List<int> _fds = [];
    private readonly List<Thread> _threads = [];
    private readonly int _requestBufSize;
    // Per-thread reply buffer for everything but large READs (entries, attrs, xattrs, readdir pages).
    private const int SmallReplySize = OutHeaderSize + 128 * 1024;
    private const int MaxWrite = 32 * 1024;
    private readonly ConcurrentDictionary<ulong, CancellationTokenSource> _inflight = new();
    private readonly ConcurrentDictionary<ulong, byte> _orphanInterrupts = new();
    private readonly Lock _lookupLock = new();
    private readonly Dictionary<ulong, ulong> _lookups = [];
    private readonly Lock _backingLock = new();
    private readonly Dictionary<ulong, (int Id, int Refs)> _backing = [];
    private readonly Dictionary<ulong, int> _cachedOpens = [];
    private readonly TaskCompletionSource _initDone = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly long[] _opCounts = new long[(int)Opcode.MaxKnown];
    private int _liveReaders;
    private int _unmounted;
    private int _fdsClosed;
    private volatile bool _passthroughUsable;
    // Cleared for good when /dev/fuse refuses a spliced reply in a way a pread reply would not meet.
    private volatile bool _spliceUsable = true;
    private int _maxRead;

    /// <summary>Absolute path of the mount point.</summary>
    public string MountPoint { get; }
    /// <summary>Negotiated protocol minor version (7.x).</summary>
    public uint ProtocolMinor { get; private set; }
    /// <summary>True when the kernel accepted passthrough in INIT.</summary>
    public bool PassthroughNegotiated { get; private set; }
    /// <summary>
    /// True while opens may still be answered with a backing file: passthrough was negotiated and the kernel has not
    /// refused a backing file for good (EPERM: no CAP_SYS_ADMIN; ENOTTY/EOPNOTSUPP; ELOOP: the backing file is on a
    /// stacked filesystem such as overlayfs, deeper than this mount's max_stack_depth of 1 allows — taken to hold for
    /// every backing file of the mount, which in practice come from one place, rather than retried and logged per open).
    /// </summary>
    public bool PassthroughUsable => _passthroughUsable;
    /// <summary>
    /// True when the kernel accepted FUSE_DIRECT_IO_ALLOW_MMAP in INIT: files opened with
    /// <see cref="FuseOpenResult.DirectIo"/> can also be mapped shared (otherwise mmap(MAP_SHARED) fails with ENODEV).
    /// </summary>
    public bool DirectIoAllowMmapNegotiated { get; private set; }
    /// <summary>Completes when the kernel connection ends (unmount, abort, or device closed).</summary>
    public Task Completion => _completion.Task;
    /// <summary>READ requests that reached user space (passthrough reads never do).</summary>
    public long ReadRequests => Interlocked.Read(ref _opCounts[(int)Opcode.Read]);
    /// <summary>Opens answered with a kernel backing file.</summary>
    public long PassthroughOpens => Interlocked.Read(ref _passthroughOpens);
    private long _passthroughOpens;
    /// <summary>Opens answered with FOPEN_DIRECT_IO (reads bypass the page cache).</summary>
    public long DirectIoOpens => Interlocked.Read(ref _directIoOpens);
    private long _directIoOpens;
    /// <summary>READs answered by splicing the bytes from a file (<see cref="IFuseFileSystem.TryReadFromFile"/>).</summary>
    public long SplicedReads => Interlocked.Read(ref _splicedReads);
    private long _splicedReads;
    /// <summary>READs of <see cref="IFuseFileSystem.TryReadFromFile"/> ranges that could not be spliced and were read with pread.</summary>
    public long FileReadFallbacks => Interlocked.Read(ref _fileReadFallbacks);
    private long _fileReadFallbacks;
    /// <summary>Requests of <paramref name="opcode"/> (FUSE opcode number) seen so far.</summary>
    public long RequestCount(int opcode) => opcode is > 0 and < (int)Opcode.MaxKnown ? Interlocked.Read(ref _opCounts[opcode]) : 0;

    private FuseServer(string mountPoint, IFuseFileSystem fs, FuseMountOptions opt, int fd)
    {
        MountPoint = mountPoint;
        _fs = fs;
        _opt = opt;
        _masterFd = fd;
        _maxRead = Math.Clamp(opt.MaxRead / 4096 * 4096, 4096, 256 * 4096);
        // One request must fit: header + write header + max_write, and never below the kernel's 8 KiB minimum.
        // Small on purpose: a snapshotter runs one mount per layer, and writes are refused anyway.
        _requestBufSize = MaxWrite + 8192;
    }

    /// <summary>Mounts <paramref name="fs"/> at <paramref name="mountPoint"/> and starts serving; returns after INIT.</summary>
    public static FuseServer Mount(string mountPoint, IFuseFileSystem fs, FuseMountOptions? options = null)
    {
        var opt = options ?? new FuseMountOptions();
        mountPoint = Path.GetFullPath(mountPoint);
        // A server that crashed leaves "Transport endpoint is not connected" behind: clear it so a restart can remount.
        if (IsDeadMount(mountPoint)) CleanupDeadMount(mountPoint);
        if (!Directory.Exists(mountPoint)) throw new DirectoryNotFoundException(mountPoint);
        // Both end up inside a comma-separated option string.
        foreach (var v in new[] { opt.FsName, opt.Subtype ?? "" })
            if (v.AsSpan().IndexOfAny(", \t\n\\") >= 0) throw new ArgumentException($"'{v}' may not contain commas, blanks or backslashes");
        bool viaFusermount = opt.UseFusermount || Native.GetUid() != 0;
        int fd;
        if (viaFusermount)
        {
            fd = Fusermount.Mount(mountPoint, BuildFusermountOptions(opt));
        }
        else
        {
            fd = Native.Open("/dev/fuse", Native.O_RDWR | Native.O_CLOEXEC, 0);
            if (fd < 0) throw new IOException($"open /dev/fuse: errno {Native.LastErrno}");
            var data = $"fd={fd},rootmode=40000,user_id={Native.GetUid()},group_id={Native.GetGid()}" +
                       (opt.AllowOther ? ",allow_other" : "") + (opt.DefaultPermissions ? ",default_permissions" : "") +
                       $",max_read={Math.Clamp(opt.MaxRead / 4096 * 4096, 4096, 256 * 4096)}";
            ulong flags = Native.MS_NOSUID | Native.MS_NODEV | (opt.ReadOnly ? Native.MS_RDONLY : 0);
            var type = opt.Subtype is { Length: > 0 } st ? "fuse." + st : "fuse";
            if (Native.Mount(opt.FsName, mountPoint, type, flags, data) != 0)
            {
                int e = Native.LastErrno;
                Native.Close(fd);
                throw new IOException($"mount {mountPoint}: errno {e}");
            }
        }
        var server = new FuseServer(mountPoint, fs, opt, fd);
        try
        {
            server.Start();
            if (!server._initDone.Task.Wait(opt.InitTimeout))
                throw new TimeoutException($"FUSE INIT did not arrive within {opt.InitTimeout}");
            if (server._initDone.Task.IsFaulted) server._initDone.Task.GetAwaiter().GetResult();
            if (opt.ReadAheadKb is int ra) server.SetReadAhead(ra);
        }
        catch
        {
            server.Unmount();
            throw;
        }
        return server;
    }

    private static string BuildFusermountOptions(FuseMountOptions opt)
    {
        var s = $"rootmode=40000,user_id={Native.GetUid()},group_id={Native.GetGid()},fsname={opt.FsName},nosuid,nodev";
        if (opt.Subtype is { Length: > 0 }) s += ",subtype=" + opt.Subtype;
        if (opt.ReadOnly) s += ",ro";
        if (opt.AllowOther) s += ",allow_other";
        if (opt.DefaultPermissions) s += ",default_permissions";
        return s + $",max_read={Math.Clamp(opt.MaxRead / 4096 * 4096, 4096, 256 * 4096)}";
    }

    private void Start()
    {
        _fds.Add(_masterFd);
        int n = Math.Clamp(_opt.ReaderThreads, 1, 64);
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
        _liveReaders = _fds.Count;
        for (int i = 0; i < _fds.Count; i++)
        {
            var t = new Thread(ReaderLoop) { IsBackground = true, Name = $"fuse-reader-{i}" };
            _threads.Add(t);
            t.Start(_fds[i]);
        }
    }

    /// <summary>Per-thread state: buffers reused for every request served on that thread.</summary>
    private sealed class ReaderContext
    {
        public int Fd;
        public byte[] Reply = [];
        public CancellationTokenSource Cts = new();
        public readonly FuseDirWriter Dir = new();
        // The thread's pipe for splice replies (-1 until the first one) and how many pages it holds.
        public int PipeRead = -1, PipeWrite = -1, PipePages;
    }

    private void ReaderLoop(object? state)
    {
        var ctx = new ReaderContext { Fd = (int)state!, Reply = GC.AllocateUninitializedArray<byte>(SmallReplySize, pinned: true) };
        var req = GC.AllocateUninitializedArray<byte>(_requestBufSize, pinned: true);
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
                if (n < InHeaderSize) continue;
                try
                {
                    Dispatch(ctx, new ReadOnlySpan<byte>(reqPtr, (int)n));
                }
                catch (Exception ex)
                {
                    _opt.Log?.Invoke($"FUSE handler failed: {ex}");
                    var h = MemoryMarshal.Read<InHeader>(new ReadOnlySpan<byte>(reqPtr, InHeaderSize));
                    if (h.Opcode is not ((uint)Opcode.Forget or (uint)Opcode.BatchForget or (uint)Opcode.Interrupt))
                        ReplyError(ctx.Fd, h.Unique, Errno.EIO);
                }
            }
        }
        finally
        {
            ClosePipe(ctx);
            ctx.Cts.Dispose();
            if (Interlocked.Decrement(ref _liveReaders) == 0) OnAllReadersDone();
        }
    }

    private void OnAllReadersDone()
    {
        _initDone.TrySetException(new IOException("FUSE connection ended before INIT"));
        foreach (var cts in _inflight.Values)
        {
            try { cts.Cancel(); } catch (ObjectDisposedException) { }
        }
        // Async reads still finishing would write to our fds; closing them first could let a reused fd number
        // receive a stray reply. Wait (bounded) for them, and rather leak the fds than risk that.
        _ = Task.Run(DrainThenCloseAsync);
    }

    private void CloseFds()
    {
        if (Interlocked.Exchange(ref _fdsClosed, 1) == 1) return;
        var seen = new HashSet<int>();
        foreach (var fd in _fds)
            if (seen.Add(fd)) Native.Close(fd);
    }

    // ---------------------------------------------------------------- dispatch

    private void Dispatch(ReaderContext ctx, ReadOnlySpan<byte> req)
    {
        var h = MemoryMarshal.Read<InHeader>(req);
        var args = req[InHeaderSize..];
        var op = (Opcode)h.Opcode;
        if (h.Opcode < (uint)Opcode.MaxKnown) Interlocked.Increment(ref _opCounts[h.Opcode]);
        switch (op)
        {
            case Opcode.Init: HandleInit(ctx, h, args); break;
            case Opcode.Lookup: HandleLookup(ctx, h, args); break;
            case Opcode.Forget: ForgetInode(h.NodeId, MemoryMarshal.Read<ForgetIn>(args).NLookup); break;
            case Opcode.BatchForget: HandleBatchForget(args); break;
            case Opcode.GetAttr: HandleGetAttr(ctx, h); break;
            case Opcode.ReadLink: HandleReadLink(ctx, h); break;
            case Opcode.Open: HandleOpen(ctx, h, args); break;
            case Opcode.Read: HandleRead(ctx, h, args); break;
            case Opcode.Release: HandleRelease(ctx, h, args); break;
            case Opcode.OpenDir: HandleOpenDir(ctx, h); break;
            case Opcode.ReadDir: HandleReadDir(ctx, h, args, plus: false); break;
            case Opcode.ReadDirPlus: HandleReadDir(ctx, h, args, plus: true); break;
            case Opcode.ReleaseDir:
                _fs.ReleaseDir(h.NodeId, MemoryMarshal.Read<ReleaseIn>(args).Fh);
                ReplyError(ctx.Fd, h.Unique, 0);
                break;
            case Opcode.StatFs: HandleStatFs(ctx, h); break;
            case Opcode.GetXattr: HandleGetXattr(ctx, h, args); break;
            case Opcode.ListXattr: HandleListXattr(ctx, h, args); break;
            case Opcode.Access:
                // Read-only: refuse write access, allow the rest (default_permissions already checked mode bits).
                ReplyError(ctx.Fd, h.Unique, (MemoryMarshal.Read<AccessIn>(args).Mask & 2) != 0 ? Errno.EROFS : 0);
                break;
            case Opcode.Flush: case Opcode.FSync: case Opcode.FSyncDir: case Opcode.SyncFs:
                ReplyError(ctx.Fd, h.Unique, 0);
                break;
            case Opcode.Interrupt: HandleInterrupt(MemoryMarshal.Read<InterruptIn>(args).Unique); break;
            case Opcode.LSeek: HandleLSeek(ctx, h, args); break;
            case Opcode.Destroy:
                ReplyError(ctx.Fd, h.Unique, 0);
                break;
            case Opcode.NotifyReply: break; // we never send notifications that expect a reply
            case Opcode.SetAttr: case Opcode.Symlink: case Opcode.MkNod: case Opcode.MkDir: case Opcode.Unlink:
            case Opcode.RmDir: case Opcode.Rename: case Opcode.Link: case Opcode.Write: case Opcode.SetXattr:
            case Opcode.RemoveXattr: case Opcode.Create: case Opcode.Rename2: case Opcode.FAllocate:
            case Opcode.CopyFileRange: case Opcode.TmpFile:
                ReplyError(ctx.Fd, h.Unique, Errno.EROFS);
                break;
            default:
                ReplyError(ctx.Fd, h.Unique, Errno.ENOSYS);
                break;
        }
    }

    private void HandleInit(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var init = MemoryMarshal.Read<InitIn>(args);
        if (init.Major != 7 || init.Minor < 31)
        {
            // Newer majors re-send INIT after our answer; older minors lack what we rely on.
            if (init.Major > 7)
            {
                var o = new InitOut { Major = 7, Minor = OurMinor };
                ReplyStruct(ctx, h.Unique, o, 8);
                return;
            }
            ReplyError(ctx.Fd, h.Unique, Native.EPROTO);
            _initDone.TrySetException(new IOException($"kernel FUSE protocol {init.Major}.{init.Minor} is too old (need 7.31)"));
            return;
        }
        ulong kernelFlags = init.Flags;
        if ((kernelFlags & InitFlags.InitExt) != 0) kernelFlags |= (ulong)init.Flags2 << 32;
        // Readdirplus always (not "auto"): listings of a layer are almost always followed by stats of every entry.
        ulong want = InitFlags.AsyncRead | InitFlags.BigWrites | InitFlags.DoReaddirplus |
                     InitFlags.ParallelDirops | InitFlags.MaxPages | InitFlags.CacheSymlinks | InitFlags.AsyncDio |
                     InitFlags.InitExt | InitFlags.NoExportSupport;
        uint minor = Math.Min(init.Minor, OurMinor);
        if (_opt.Passthrough && minor >= 40) want |= InitFlags.Passthrough;
        if (_opt.DirectIoAllowMmap && minor >= 39) want |= InitFlags.DirectIoAllowMmap;
        ulong flags = kernelFlags & want;
        var o2 = new InitOut
        {
            Major = 7,
            Minor = minor,
            MaxReadahead = init.MaxReadahead,
            Flags = (uint)flags,
            Flags2 = (uint)(flags >> 32),
            MaxBackground = 64,
            CongestionThreshold = 48,
            MaxWrite = MaxWrite,
            TimeGran = 1,
            MaxPages = (ushort)(_maxRead / 4096),
            // Backing files live on ordinary filesystems (depth 0); depth 1 leaves room for overlayfs on top of us.
            MaxStackDepth = (flags & InitFlags.Passthrough) != 0 ? 1u : 0u,
        };
        ProtocolMinor = minor;
        PassthroughNegotiated = (flags & InitFlags.Passthrough) != 0;
        _passthroughUsable = PassthroughNegotiated;
        DirectIoAllowMmapNegotiated = (flags & InitFlags.DirectIoAllowMmap) != 0;
        if (_opt.Passthrough && !PassthroughNegotiated)
            _opt.Log?.Invoke($"kernel did not accept FUSE passthrough (protocol 7.{init.Minor}); reads go through user space");
        if (_opt.DirectIoAllowMmap && !DirectIoAllowMmapNegotiated)
            _opt.Log?.Invoke($"kernel did not accept FUSE_DIRECT_IO_ALLOW_MMAP (protocol 7.{init.Minor}); shared mmap of direct-I/O files fails with ENODEV");
        ReplyStruct(ctx, h.Unique, o2, Marshal.SizeOf<InitOut>());
        _initDone.TrySetResult();
    }

    internal EntryOut MakeEntryOut(in FuseEntry e)
    {
        var et = e.EntryTimeout ?? _opt.EntryTimeout;
        var at = e.AttrTimeout ?? _opt.AttrTimeout;
        var eo = new EntryOut
        {
            NodeId = e.Ino,
            Generation = e.Generation,
            EntryValid = (ulong)(et.Ticks / TimeSpan.TicksPerSecond),
            EntryValidNsec = (uint)(et.Ticks % TimeSpan.TicksPerSecond * 100),
            AttrValid = (ulong)(at.Ticks / TimeSpan.TicksPerSecond),
            AttrValidNsec = (uint)(at.Ticks % TimeSpan.TicksPerSecond * 100),
            Attr = e.Attr,
        };
        if (eo.Attr.Ino == 0) eo.Attr.Ino = e.Ino;
        if (eo.Attr.BlkSize == 0) eo.Attr.BlkSize = 4096;
        return eo;
    }

    private void HandleLookup(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var name = CString(args);
        int rc = _fs.Lookup(h.NodeId, name, out var entry);
        if (rc == Errno.ENOENT && _opt.NegativeTimeout > TimeSpan.Zero)
        {
            // A zero node id with a timeout lets the kernel cache "does not exist".
            var neg = MakeEntryOut(new FuseEntry { EntryTimeout = _opt.NegativeTimeout });
            neg.NodeId = 0;
            ReplyStruct(ctx, h.Unique, neg, Marshal.SizeOf<EntryOut>());
            return;
        }
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        var eo = MakeEntryOut(entry);
        AddLookup(entry.Ino);
        ReplyStruct(ctx, h.Unique, eo, Marshal.SizeOf<EntryOut>());
    }

    private void HandleBatchForget(ReadOnlySpan<byte> args)
    {
        var bf = MemoryMarshal.Read<BatchForgetIn>(args);
        var items = MemoryMarshal.Cast<byte, ForgetOne>(args[8..]);
        int n = (int)Math.Min(bf.Count, (uint)items.Length);
        for (int i = 0; i < n; i++) ForgetInode(items[i].NodeId, items[i].NLookup);
    }

    internal void AddLookup(ulong ino)
    {
        lock (_lookupLock)
            CollectionsMarshal.GetValueRefOrAddDefault(_lookups, ino, out _)++;
    }

    private void ForgetInode(ulong ino, ulong n)
    {
        bool gone = false;
        lock (_lookupLock)
        {
            ref ulong c = ref CollectionsMarshal.GetValueRefOrNullRef(_lookups, ino);
            if (Unsafe.IsNullRef(ref c)) return;
            if (c <= n) { _lookups.Remove(ino); gone = true; }
            else c -= n;
        }
        if (gone && ino != 1) _fs.Forget(ino);
    }

    /// <summary>The kernel's current reference count on <paramref name="ino"/> (0 when forgotten).</summary>
    public ulong LookupCount(ulong ino)
    {
        lock (_lookupLock) return _lookups.TryGetValue(ino, out var c) ? c : 0;
    }

    private void HandleGetAttr(ReaderContext ctx, in InHeader h)
    {
        int rc = _fs.GetAttr(h.NodeId, out var attr);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        if (attr.Ino == 0) attr.Ino = h.NodeId;
        if (attr.BlkSize == 0) attr.BlkSize = 4096;
        var at = _opt.AttrTimeout;
        var ao = new AttrOut
        {
            AttrValid = (ulong)(at.Ticks / TimeSpan.TicksPerSecond),
            AttrValidNsec = (uint)(at.Ticks % TimeSpan.TicksPerSecond * 100),
            Attr = attr,
        };
        ReplyStruct(ctx, h.Unique, ao, Marshal.SizeOf<AttrOut>());
    }

    private void HandleReadLink(ReaderContext ctx, in InHeader h)
    {
        int rc = _fs.ReadLink(h.NodeId, out var target);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        ReplyBytes(ctx, h.Unique, target.Span);
    }

    private void HandleOpen(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var oi = MemoryMarshal.Read<OpenIn>(args);
        // O_WRONLY/O_RDWR or O_TRUNC would modify a read-only tree.
        if ((oi.Flags & 3) != 0 || (oi.Flags & 0x200) != 0) { ReplyError(ctx.Fd, h.Unique, Errno.EROFS); return; }
        int rc = _fs.Open(h.NodeId, (int)oi.Flags, out var r);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        var oo = new OpenOut { Fh = r.Handle & ~HandleBits };
        if (r.KeepCache) oo.OpenFlags |= OpenFlags.KeepCache;
        if (r.DirectIo) oo.OpenFlags |= OpenFlags.DirectIo;
        if (_passthroughUsable)
        {
            // The kernel fails an open (EIO) that mixes passthrough and page-cache I/O on one inode, so an inode
            // stays in the mode of its first open until all its opens are released.
            if (ChoosePassthrough(h.NodeId, r, out int id))
            {
                oo.OpenFlags = OpenFlags.Passthrough;
                oo.BackingId = id;
                oo.Fh |= PassthroughHandleBit;
                Interlocked.Increment(ref _passthroughOpens);
            }
            // A direct-I/O open counts as cached too: a shared mmap of it moves the inode into page-cache mode.
            else oo.Fh |= CachedOpenBit;
        }
        if ((oo.OpenFlags & OpenFlags.DirectIo) != 0) Interlocked.Increment(ref _directIoOpens);
        ReplyStruct(ctx, h.Unique, oo, Marshal.SizeOf<OpenOut>());
    }

    /// <summary>
    /// One backing id per inode, shared by its opens: the kernel refuses two different backing files on one inode.
    /// </summary>
    private bool ChoosePassthrough(ulong ino, in FuseOpenResult r, out int id)
    {
        lock (_backingLock)
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
            if (cachedOpen || (r.BackingPath == null && r.BackingFile == null) || !TryRegisterBacking(r, out id))
            {
                CollectionsMarshal.GetValueRefOrAddDefault(_cachedOpens, ino, out _)++;
                return false;
            }
            _backing[ino] = (id, 1);
            return true;
        }
    }

    /// <summary>Registers the backing file with the kernel (caller holds the backing lock).</summary>
    private bool TryRegisterBacking(in FuseOpenResult r, out int id)
    {
        int fd;
        bool own = false;
        if (r.BackingFile != null) fd = (int)r.BackingFile.DangerousGetHandle();
        else
        {
            fd = Native.Open(r.BackingPath!, Native.O_RDONLY | Native.O_CLOEXEC, 0);
            if (fd < 0)
            {
                _opt.Log?.Invoke($"passthrough: open {r.BackingPath}: errno {Native.LastErrno}; serving reads in user space");
                id = 0;
                return false;
            }
            own = true;
        }
        var map = new BackingMap { Fd = fd };
        id = Native.Ioctl(_masterFd, Native.FUSE_DEV_IOC_BACKING_OPEN, &map);
        int e = id < 0 ? Native.LastErrno : 0;
        // The kernel holds its own reference to the file once registered.
        if (own) Native.Close(fd);
        if (id < 0)
        {
            _opt.Log?.Invoke(e == Native.ELOOP
                ? "passthrough refused (errno 40, ELOOP): the backing file is on a stacked filesystem (overlayfs?) deeper than max_stack_depth 1 allows; passthrough off for this mount, reads served in user space"
                : $"passthrough refused (errno {e}); serving reads in user space");
            if (e is Native.EPERM or Native.ENOTTY or Native.EOPNOTSUPP or Native.ELOOP) _passthroughUsable = false;
            id = 0;
            return false;
        }
        return true;
    }

    private void ReleaseBacking(ulong ino)
    {
        lock (_backingLock)
        {
            ref var slot = ref CollectionsMarshal.GetValueRefOrNullRef(_backing, ino);
            if (Unsafe.IsNullRef(ref slot)) return;
            if (--slot.Refs > 0) return;
            int id = slot.Id;
            _backing.Remove(ino);
            Native.Ioctl(_masterFd, Native.FUSE_DEV_IOC_BACKING_CLOSE, &id);
        }
    }

    private void ReleaseCachedOpen(ulong ino)
    {
        lock (_backingLock)
        {
            ref int c = ref CollectionsMarshal.GetValueRefOrNullRef(_cachedOpens, ino);
            if (!Unsafe.IsNullRef(ref c) && --c <= 0) _cachedOpens.Remove(ino);
        }
    }

    private void HandleRelease(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var ri = MemoryMarshal.Read<ReleaseIn>(args);
        if ((ri.Fh & PassthroughHandleBit) != 0) ReleaseBacking(h.NodeId);
        else if ((ri.Fh & CachedOpenBit) != 0) ReleaseCachedOpen(h.NodeId);
        _fs.Release(h.NodeId, ri.Fh & ~HandleBits);
        ReplyError(ctx.Fd, h.Unique, 0);
    }

    private void HandleRead(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var ri = MemoryMarshal.Read<ReadIn>(args);
        int size = (int)Math.Min(ri.Size, (uint)_maxRead);
        ulong unique = h.Unique;
        bool direct;
        ReadOnlyMemory<byte> data;
        try { direct = _fs.TryReadDirect(h.NodeId, ri.Fh & ~HandleBits, (long)ri.Offset, size, out data); }
        catch (Exception ex)
        {
            ReplyError(ctx.Fd, unique, ErrnoOf(ex));
            return;
        }
        if (direct)
        {
            SendGather(ctx.Fd, unique, data.Length <= size ? data : data[..size]);
            return;
        }
        FuseFileRange range;
        bool fromFile;
        try { fromFile = _fs.TryReadFromFile(h.NodeId, ri.Fh & ~HandleBits, (long)ri.Offset, size, out range); }
        catch (Exception ex)
        {
            ReplyError(ctx.Fd, unique, ErrnoOf(ex));
            return;
        }
        if (fromFile)
        {
            SendFromFile(ctx, unique, range, size);
            return;
        }
        var buf = ReplyBufferFor(ctx, size, out bool pooled);
        ValueTask<int> vt;
        try
        {
            vt = _fs.ReadAsync(h.NodeId, ri.Fh & ~HandleBits, (long)ri.Offset,
                new Memory<byte>(buf, OutHeaderSize, size), ctx.Cts.Token);
        }
        catch (Exception ex)
        {
            if (pooled) DataBuffers.Return(buf);
            ReplyError(ctx.Fd, unique, ErrnoOf(ex));
            return;
        }
        if (vt.IsCompleted)
        {
            int r;
            try { r = vt.GetAwaiter().GetResult(); }
            catch (Exception ex) { r = -ErrnoOf(ex); }
            FinishRead(ctx.Fd, buf, unique, r, size);
            if (pooled) DataBuffers.Return(buf);
            return;
        }
        // Slow path: the buffer and token now belong to this read; the thread takes fresh ones.
        var cts = ctx.Cts;
        ctx.Cts = new CancellationTokenSource();
        if (!pooled) ctx.Reply = GC.AllocateUninitializedArray<byte>(SmallReplySize, pinned: true);
        _inflight[unique] = cts;
        if (!_orphanInterrupts.IsEmpty && _orphanInterrupts.TryRemove(unique, out _)) cts.Cancel();
        _ = CompleteReadAsync(ctx.Fd, buf, unique, size, vt, cts);
    }

    /// <summary>Small replies use the thread's buffer; big ones a pooled 1 MiB buffer shared by all mounts.</summary>
    private static byte[] ReplyBufferFor(ReaderContext ctx, int payload, out bool pooled)
    {
        pooled = payload > SmallReplySize - OutHeaderSize;
        return pooled ? DataBuffers.Rent() : ctx.Reply;
    }

    private void SendFromFile(ReaderContext ctx, ulong unique, in FuseFileRange range, int size)
    {
        if (range.File is not { } file)
        {
            ReplyError(ctx.Fd, unique, Errno.EIO); // not made by TryLend
            return;
        }
        try
        {
            // The lend holds a reference: the descriptor stays open until Return, whoever disposes the handle.
            int fileFd = (int)file.DangerousGetHandle();
            int len = Math.Clamp(range.Length, 0, size);
            if (len > 0 && _spliceUsable && TrySplice(ctx, unique, fileFd, range.Offset, len)) return;
            if (len > 0) Interlocked.Increment(ref _fileReadFallbacks);
            PreadReply(ctx, unique, fileFd, range.Offset, len);
        }
        finally
        {
            range.Return();
        }
    }

    /// <summary>
    /// Header into the thread's pipe, then the file's pages (splice takes references to them, no copy), then the
    /// whole pipe into /dev/fuse in one splice: the kernel copies the pages straight into the reader's buffer or page
    /// cache. False (and nothing sent) when this range cannot go that way; the caller then replies with pread.
    /// </summary>
    private bool TrySplice(ReaderContext ctx, ulong unique, int fileFd, long offset, int len)
    {
        if (ctx.PipeWrite < 0 && !OpenPipe(ctx)) return false;
        // One pipe slot per page the range touches, plus one for the header: a full pipe would block the splice.
        long pages = (offset + len + 4095) / 4096 - offset / 4096;
        if (pages + 1 > ctx.PipePages) return false;
        var oh = new OutHeader { Len = (uint)(OutHeaderSize + len), Error = 0, Unique = unique };
        if (Native.Write(ctx.PipeWrite, (byte*)&oh, OutHeaderSize) != OutHeaderSize)
        {
            ClosePipe(ctx);
            return false;
        }
        long off = offset;
        int moved = 0;
        while (moved < len)
        {
            nint n = Native.Splice(fileFd, &off, ctx.PipeWrite, null, (nuint)(len - moved), Native.SPLICE_F_NONBLOCK);
            if (n > 0) { moved += (int)n; continue; }
            if (n < 0 && Native.LastErrno == Native.EINTR) continue;
            // 0: the file is shorter than promised; EINVAL: this file cannot be spliced; EAGAIN: pipe full. The pipe
            // holds a header that no longer fits: drop the pipe (closing it discards its content) and let pread answer.
            ClosePipe(ctx);
            return false;
        }
        while (true)
        {
            nint w = Native.Splice(ctx.PipeRead, null, ctx.Fd, null, (nuint)(OutHeaderSize + len), 0);
            if (w >= 0)
            {
                Interlocked.Increment(ref _splicedReads);
                return true;
            }
            int e = Native.LastErrno;
            if (e == Native.EINTR) continue;
            // ENOENT: the request was interrupted and is gone; ENODEV: the connection ended. Either way done.
            if (e is Native.ENOENT or Native.ENODEV)
            {
                ClosePipe(ctx); // the kernel may have left part of the message in the pipe
                return true;
            }
            // Anything else: /dev/fuse did not take the message (the request is still waiting). Reply without splice
            // from now on rather than fail every read the same way.
            _opt.Log?.Invoke($"splice to /dev/fuse: errno {e}; replying with copies from now on");
            _spliceUsable = false;
            ClosePipe(ctx);
            return false;
        }
    }

    private bool OpenPipe(ReaderContext ctx)
    {
        int pages = OpenSizedPipe(_maxRead + 2 * 4096, out int r, out int w);
        if (pages <= 0) return false;
        ctx.PipeRead = r;
        ctx.PipeWrite = w;
        ctx.PipePages = pages;
        return true;
    }

    /// <summary>
    /// A pipe grown towards <paramref name="wantBytes"/>; returns the pages it holds (0 on failure). Beyond
    /// fs.pipe-max-size (1 MiB by default) only CAP_SYS_RESOURCE may grow a pipe: without it the pipe stays at that
    /// size, and replies that do not fit go by pread.
    /// </summary>
    private static int OpenSizedPipe(int wantBytes, out int readFd, out int writeFd)
    {
        int* fds = stackalloc int[2];
        readFd = writeFd = -1;
        if (Native.Pipe2(fds, Native.O_CLOEXEC) != 0) return 0;
        if (Native.Fcntl(fds[1], Native.F_SETPIPE_SZ, wantBytes) < 0) Native.Fcntl(fds[1], Native.F_SETPIPE_SZ, 1 << 20);
        int bytes = Native.Fcntl(fds[1], Native.F_GETPIPE_SZ, 0);
        if (bytes <= 0)
        {
            Native.Close(fds[0]);
            Native.Close(fds[1]);
            return 0;
        }
        readFd = fds[0];
        writeFd = fds[1];
        return bytes / 4096;
    }

    private static readonly Lazy<int> SpliceLimit = new(() =>
    {
        int pages = OpenSizedPipe(256 * 4096 + 2 * 4096, out int r, out int w);
        if (pages <= 0) return 0;
        Native.Close(r);
        Native.Close(w);
        // The header takes one slot, a range not starting on a page boundary one more.
        return Math.Min(256, pages - 2) * 4096;
    });

    /// <summary>
    /// The largest READ reply that <see cref="IFuseFileSystem.TryReadFromFile"/> can splice in this process (any
    /// alignment): 1 MiB with CAP_SYS_RESOURCE, else what fs.pipe-max-size leaves (1016 KiB by default). Keep
    /// <see cref="FuseMountOptions.MaxRead"/> at or below it where file replies matter; larger replies are copied.
    /// </summary>
    public static int LargestSplicedRead => SpliceLimit.Value;

    private static void ClosePipe(ReaderContext ctx)
    {
        if (ctx.PipeRead >= 0) Native.Close(ctx.PipeRead);
        if (ctx.PipeWrite >= 0) Native.Close(ctx.PipeWrite);
        ctx.PipeRead = ctx.PipeWrite = -1;
        ctx.PipePages = 0;
    }

    /// <summary>The copying answer for a file range: pread into a reply buffer, then one write.</summary>
    private void PreadReply(ReaderContext ctx, ulong unique, int fileFd, long offset, int len)
    {
        var buf = ReplyBufferFor(ctx, len, out bool pooled);
        try
        {
            int got = 0;
            fixed (byte* p = buf)
            {
                while (got < len)
                {
                    nint n = Native.Pread(fileFd, p + OutHeaderSize + got, len - got, offset + got);
                    if (n > 0) { got += (int)n; continue; }
                    if (n == 0) break; // end of file: a short reply means EOF to the kernel
                    int e = Native.LastErrno;
                    if (e == Native.EINTR) continue;
                    ReplyError(ctx.Fd, unique, e);
                    return;
                }
            }
            Send(ctx.Fd, buf, unique, 0, got);
        }
        finally
        {
            if (pooled) DataBuffers.Return(buf);
        }
    }

    private void FinishRead(int fd, byte[] buf, ulong unique, int r, int size)
    {
        if (r < 0) { ReplyError(fd, unique, -r); return; }
        Send(fd, buf, unique, 0, Math.Min(r, size));
    }

    private static int ErrnoOf(Exception ex) => ex switch
    {
        FuseException fe => fe.Errno,
        OperationCanceledException => Errno.EINTR,
        TimeoutException => Errno.ETIMEDOUT,
        _ => Errno.EIO,
    };

    private void HandleInterrupt(ulong target)
    {
        if (_inflight.TryGetValue(target, out var cts))
        {
            try { cts.Cancel(); } catch (ObjectDisposedException) { }
            return;
        }
        // Either still running synchronously (finishes on its own) or about to go async: remember briefly.
        if (_orphanInterrupts.Count > 1024) _orphanInterrupts.Clear();
        _orphanInterrupts[target] = 0;
    }

    private void HandleOpenDir(ReaderContext ctx, in InHeader h)
    {
        int rc = _fs.OpenDir(h.NodeId, out ulong handle);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        // Directories of a read-only tree never change: let the kernel cache their listings.
        var oo = new OpenOut { Fh = handle, OpenFlags = OpenFlags.KeepCache | OpenFlags.CacheDir };
        ReplyStruct(ctx, h.Unique, oo, Marshal.SizeOf<OpenOut>());
    }

    private void HandleReadDir(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args, bool plus)
    {
        var ri = MemoryMarshal.Read<ReadIn>(args);
        int size = (int)Math.Min(ri.Size, (uint)(ctx.Reply.Length - OutHeaderSize));
        ctx.Dir.Reset(this, ctx.Reply, OutHeaderSize, size, plus);
        int rc;
        try { rc = _fs.ReadDir(h.NodeId, ri.Fh, (long)ri.Offset, ctx.Dir); }
        catch (Exception ex) { rc = ErrnoOf(ex); }
        if (rc != 0 && ctx.Dir.Count == 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        Send(ctx.Fd, ctx.Reply, h.Unique, 0, ctx.Dir.Length);
    }

    private void HandleStatFs(ReaderContext ctx, in InHeader h)
    {
        int rc = _fs.StatFs(h.NodeId, out var s);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        var k = new KStatFs
        {
            Blocks = s.Blocks, BFree = s.BlocksFree, BAvail = s.BlocksAvailable, Files = s.Files, FFree = s.FilesFree,
            BSize = s.BlockSize == 0 ? 4096 : s.BlockSize, NameLen = s.NameLen == 0 ? 255 : s.NameLen,
            FrSize = s.FragmentSize == 0 ? (s.BlockSize == 0 ? 4096 : s.BlockSize) : s.FragmentSize,
        };
        ReplyStruct(ctx, h.Unique, k, Marshal.SizeOf<KStatFs>());
    }

    private void HandleGetXattr(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var gi = MemoryMarshal.Read<GetXattrIn>(args);
        var name = CString(args[8..]);
        int rc = _fs.GetXattr(h.NodeId, name, out var value);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        ReplySized(ctx, h.Unique, gi.Size, value.Span);
    }

    private void HandleListXattr(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var gi = MemoryMarshal.Read<GetXattrIn>(args);
        int rc = _fs.ListXattr(h.NodeId, out var names);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        ReplySized(ctx, h.Unique, gi.Size, names.Span);
    }

    /// <summary>xattr protocol: size 0 asks for the length; a too-small buffer is ERANGE.</summary>
    private void ReplySized(ReaderContext ctx, ulong unique, uint size, ReadOnlySpan<byte> value)
    {
        if (size == 0)
        {
            ReplyStruct(ctx, unique, new GetXattrOut { Size = (uint)value.Length }, 8);
            return;
        }
        if (value.Length > size) { ReplyError(ctx.Fd, unique, Errno.ERANGE); return; }
        ReplyBytes(ctx, unique, value);
    }

    private void HandleLSeek(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var li = MemoryMarshal.Read<LSeekIn>(args);
        int rc = _fs.GetAttr(h.NodeId, out var attr);
        if (rc != 0) { ReplyError(ctx.Fd, h.Unique, rc); return; }
        // Files here have no holes: data runs from 0 to size, the only hole is at the end.
        const uint SeekData = 3, SeekHole = 4;
        if (li.Whence is not (SeekData or SeekHole)) { ReplyError(ctx.Fd, h.Unique, Errno.EINVAL); return; }
        if (li.Offset >= attr.Size) { ReplyError(ctx.Fd, h.Unique, Errno.ENXIO); return; }
        ulong off = li.Whence == SeekData ? li.Offset : attr.Size;
        ReplyStruct(ctx, h.Unique, new LSeekOut { Offset = off }, 8);
    }

    // ---------------------------------------------------------------- replies

    private static ReadOnlySpan<byte> CString(ReadOnlySpan<byte> s)
    {
        int z = s.IndexOf((byte)0);
        return z >= 0 ? s[..z] : s;
    }

    private void ReplyStruct<T>(ReaderContext ctx, ulong unique, in T value, int size) where T : unmanaged
    {
        var span = ctx.Reply.AsSpan(OutHeaderSize, size);
        span.Clear();
        MemoryMarshal.Write(span, in value);
        Send(ctx.Fd, ctx.Reply, unique, 0, Math.Min(size, sizeof(T)));
    }

    private void ReplyBytes(ReaderContext ctx, ulong unique, ReadOnlySpan<byte> payload)
    {
        payload.CopyTo(ctx.Reply.AsSpan(OutHeaderSize));
        Send(ctx.Fd, ctx.Reply, unique, 0, payload.Length);
    }

    private void ReplyError(int fd, ulong unique, int errno)
    {
        OutHeader oh = new() { Len = OutHeaderSize, Error = -errno, Unique = unique };
        WriteReply(fd, (byte*)&oh, OutHeaderSize);
    }

    /// <summary>Writes header + <paramref name="payloadLen"/> bytes already placed after it in <paramref name="buf"/>.</summary>
    private void Send(int fd, byte[] buf, ulong unique, int errno, int payloadLen)
    {
        var oh = new OutHeader { Len = (uint)(OutHeaderSize + payloadLen), Error = -errno, Unique = unique };
        MemoryMarshal.Write(buf, in oh);
        fixed (byte* p = buf) WriteReply(fd, p, OutHeaderSize + payloadLen);
    }

    /// <summary>Header from the stack, payload from the caller's memory: one writev, no copy in user space.</summary>
    private void SendGather(int fd, ulong unique, ReadOnlyMemory<byte> payload)
    {
        var oh = new OutHeader { Len = (uint)(OutHeaderSize + payload.Length), Error = 0, Unique = unique };
        using var pin = payload.Pin();
        Native.IoVec* iov = stackalloc Native.IoVec[2];
        iov[0] = new Native.IoVec { Base = &oh, Len = OutHeaderSize };
        iov[1] = new Native.IoVec { Base = pin.Pointer, Len = (nuint)payload.Length };
        while (true)
        {
            // /dev/fuse takes a reply in one write; it never writes partially.
            nint w = Native.Writev(fd, iov, payload.Length == 0 ? 1 : 2);
            if (w >= 0) return;
            int e = Native.LastErrno;
            if (e == Native.EINTR) continue;
            if (e is not (Native.ENOENT or Native.ENODEV)) _opt.Log?.Invoke($"writev /dev/fuse: errno {e}");
            return;
        }
    }

    private void WriteReply(int fd, byte* p, int len)
    {
        while (true)
        {
            nint w = Native.Write(fd, p, len);
            if (w >= 0) return;
            int e = Native.LastErrno;
            if (e == Native.EINTR) continue;
            // ENOENT: the request was interrupted and is gone; ENODEV: connection ended. Both are normal.
            if (e is not (Native.ENOENT or Native.ENODEV)) _opt.Log?.Invoke($"write /dev/fuse: errno {e}");
            return;
        }
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
        bool viaFusermount = _opt.UseFusermount || Native.GetUid() != 0;
        if (viaFusermount)
        {
            Fusermount.Unmount(MountPoint, lazy);
        }
        else if (lazy)
        {
            Native.Umount2(MountPoint, Native.MNT_DETACH);
            return;
        }
        else if (Native.Umount2(MountPoint, 0) != 0 && Native.LastErrno == Native.EBUSY)
        {
            // fuse's umount_begin aborts the connection, which wakes every reader and every waiting caller.
            if (Native.Umount2(MountPoint, Native.MNT_FORCE) != 0)
                Native.Umount2(MountPoint, Native.MNT_DETACH);
        }
        if (lazy) return;
        if (!WaitReaders(TimeSpan.FromSeconds(10)))
            _opt.Log?.Invoke($"FUSE readers of {MountPoint} did not stop within 10 s");
    }

    private bool WaitReaders(TimeSpan timeout) => _completion.Task.Wait(timeout);

    private void SetReadAhead(int kb)
    {
        var dev = MountInfo.Find(MountPoint)?.DeviceId;
        if (dev == null) return;
        try { File.WriteAllText($"/sys/class/bdi/{dev}/read_ahead_kb", kb.ToString()); }
        catch (IOException e) { _opt.Log?.Invoke($"read_ahead_kb: {e.Message}"); }
        catch (UnauthorizedAccessException e) { _opt.Log?.Invoke($"read_ahead_kb: {e.Message}"); }
    }

    public void Dispose() => Unmount();

    // ---------------------------------------------------------------- static helpers

    /// <summary>
    /// True if <paramref name="path"/> is a FUSE mount whose server is gone ("Transport endpoint is not connected").
    /// With <paramref name="timeout"/>, a server that does not answer a forced stat in time counts as gone too
    /// (the probing thread stays blocked until the mount is aborted or the server answers).
    /// </summary>
    public static bool IsDeadMount(string path, TimeSpan? timeout = null)
    {
        if (timeout is not TimeSpan t) return Native.StatErrno(path) is Native.ENOTCONN or Native.ECONNABORTED;
        var probe = Task.Factory.StartNew(() => Native.StatErrno(path), CancellationToken.None,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
        if (!probe.Wait(t)) return true;
        return probe.Result is Native.ENOTCONN or Native.ECONNABORTED;
    }

    /// <summary>True if <paramref name="path"/> is a mount point (per /proc/self/mountinfo).</summary>
    public static bool IsMountPoint(string path) => MountInfo.Find(Path.GetFullPath(path)) != null;

    /// <summary>
    /// If <paramref name="path"/> is a dead (or, with <paramref name="timeout"/>, unresponsive) FUSE mount, aborts
    /// its connection (MNT_FORCE: anything still waiting on it gets ENOTCONN) and unmounts it, detaching if busy.
    /// Returns true when such a mount was removed.
    /// </summary>
    public static bool CleanupDeadMount(string path, TimeSpan? timeout = null)
    {
        path = Path.GetFullPath(path);
        if (!IsDeadMount(path, timeout)) return false;
        if (Native.Umount2(path, Native.MNT_FORCE) == 0) return true;
        int e = Native.LastErrno;
        if (e == Native.EINVAL) return false; // not a mount point
        if (Native.Umount2(path, Native.MNT_DETACH) != 0)
            throw new IOException($"umount2 {path} (detach): errno {Native.LastErrno}");
        return true;
    }
}

/// <summary>
/// 1 MiB reply buffers for large READs, pinned and shared by every mount in the process: a snapshotter has one
/// mount per layer, and per-mount buffers would multiply idle memory by the number of layers.
/// </summary>
internal static class DataBuffers
{
    public const int Size = 16 + 256 * 4096;
    private const int MaxRetained = 64;
    private static readonly ConcurrentQueue<byte[]> Pool = new();

    public static byte[] Rent() => Pool.TryDequeue(out var b) ? b : GC.AllocateUninitializedArray<byte>(Size, pinned: true);

    public static void Return(byte[] b)
    {
        if (b.Length == Size && Pool.Count < MaxRetained) Pool.Enqueue(b);
    }
}
