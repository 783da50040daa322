using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// Decodes each kernel request and answers it from the <see cref="IFuseFileSystem"/>: INIT, the metadata calls,
/// opens and releases, READ's three paths (bytes in memory, a file range, an async read) and the refusals of a
/// read-only tree. Runs on the reader threads; owns nothing of the connection's lifetime.
/// </summary>
internal sealed class RequestDispatcher(
    IFuseFileSystem fs, FuseMountOptions opt, FuseSession session, ReplyWriter replies, FileReplies fileReplies,
    PassthroughBackings backings, LookupCounts lookups, InflightReads inflight)
{
    public const int InHeaderSize = 40;

    private readonly long[] _opCounts = new long[(int)Opcode.MaxKnown];
    private long _directIoOpens;
    private long _resent;

    /// <summary>FUSE_UNIQUE_RESEND: the kernel marks requests it queued again after FUSE_NOTIFY_RESEND.</summary>
    private const ulong ResendBit = 1UL << 63;
    /// <summary>Requests the kernel sent a second time (read by an earlier process that ended before answering).</summary>
    public long ResentRequests => Interlocked.Read(ref _resent);

    /// <summary>Requests of <paramref name="opcode"/> (FUSE opcode number) seen so far.</summary>
    public long RequestCount(int opcode) => opcode is > 0 and < (int)Opcode.MaxKnown ? Interlocked.Read(ref _opCounts[opcode]) : 0;
    /// <summary>Opens answered with FOPEN_DIRECT_IO.</summary>
    public long DirectIoOpens => Interlocked.Read(ref _directIoOpens);

    public void Dispatch(ReaderContext ctx, ReadOnlySpan<byte> req)
    {
        var h = MemoryMarshal.Read<InHeader>(req);
        var args = req[InHeaderSize..];
        var op = (Opcode)h.Opcode;
        if (h.Opcode < (uint)Opcode.MaxKnown) Interlocked.Increment(ref _opCounts[h.Opcode]);
        if ((h.Unique & ResendBit) != 0) Interlocked.Increment(ref _resent);
        switch (op)
        {
            case Opcode.Init: HandleInit(ctx, h, args); break;
            case Opcode.Lookup: HandleLookup(ctx, h, args); break;
            case Opcode.Forget: lookups.Forget(h.NodeId, MemoryMarshal.Read<ForgetIn>(args).NLookup); break;
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
                fs.ReleaseDir(h.NodeId, MemoryMarshal.Read<ReleaseIn>(args).Fh);
                replies.Error(ctx.Fd, h.Unique, 0);
                break;
            case Opcode.StatFs: HandleStatFs(ctx, h); break;
            case Opcode.GetXattr: HandleGetXattr(ctx, h, args); break;
            case Opcode.ListXattr: HandleListXattr(ctx, h, args); break;
            case Opcode.Access:
                // Read-only: refuse write access, allow the rest (default_permissions already checked mode bits).
                replies.Error(ctx.Fd, h.Unique, (MemoryMarshal.Read<AccessIn>(args).Mask & 2) != 0 ? Errno.EROFS : 0);
                break;
            case Opcode.Flush: case Opcode.FSync: case Opcode.FSyncDir: case Opcode.SyncFs:
                replies.Error(ctx.Fd, h.Unique, 0);
                break;
            case Opcode.Interrupt: inflight.Interrupt(MemoryMarshal.Read<InterruptIn>(args).Unique); break;
            case Opcode.LSeek: HandleLSeek(ctx, h, args); break;
            case Opcode.Destroy:
                replies.Error(ctx.Fd, h.Unique, 0);
                break;
            case Opcode.NotifyReply: break; // we never send notifications that expect a reply
            case Opcode.SetAttr: case Opcode.Symlink: case Opcode.MkNod: case Opcode.MkDir: case Opcode.Unlink:
            case Opcode.RmDir: case Opcode.Rename: case Opcode.Link: case Opcode.Write: case Opcode.SetXattr:
            case Opcode.RemoveXattr: case Opcode.Create: case Opcode.Rename2: case Opcode.FAllocate:
            case Opcode.CopyFileRange: case Opcode.TmpFile:
                replies.Error(ctx.Fd, h.Unique, Errno.EROFS);
                break;
            default:
                replies.Error(ctx.Fd, h.Unique, Errno.ENOSYS);
                break;
        }
    }

    /// <summary>Answers a request whose handler threw: EIO, unless the request expects no answer.</summary>
    public void Failed(ReaderContext ctx, ReadOnlySpan<byte> req)
    {
        var h = MemoryMarshal.Read<InHeader>(req);
        if (h.Opcode is not ((uint)Opcode.Forget or (uint)Opcode.BatchForget or (uint)Opcode.Interrupt))
            replies.Error(ctx.Fd, h.Unique, Errno.EIO);
    }

    private void HandleInit(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var init = MemoryMarshal.Read<InitIn>(args);
        switch (session.Negotiate(init, out var reply))
        {
            case FuseSession.Outcome.AskAgain:
                replies.Struct(ctx, h.Unique, reply, 8);
                break;
            case FuseSession.Outcome.Refused:
                replies.Error(ctx.Fd, h.Unique, Native.EPROTO);
                session.Refuse(init);
                break;
            default:
                backings.Start(session.Passthrough);
                replies.Struct(ctx, h.Unique, reply, Marshal.SizeOf<InitOut>());
                session.Answered();
                break;
        }
    }

    private void HandleLookup(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var name = CString(args);
        int rc = fs.Lookup(h.NodeId, name, out var entry);
        if (rc == Errno.ENOENT && opt.NegativeTimeout > TimeSpan.Zero)
        {
            // A zero node id with a timeout lets the kernel cache "does not exist".
            var neg = EntryOut.From(new FuseEntry { EntryTimeout = opt.NegativeTimeout }, opt);
            neg.NodeId = 0;
            replies.Struct(ctx, h.Unique, neg, Marshal.SizeOf<EntryOut>());
            return;
        }
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        var eo = EntryOut.From(entry, opt);
        lookups.Add(entry.Ino);
        replies.Struct(ctx, h.Unique, eo, Marshal.SizeOf<EntryOut>());
    }

    private void HandleBatchForget(ReadOnlySpan<byte> args)
    {
        var bf = MemoryMarshal.Read<BatchForgetIn>(args);
        var items = MemoryMarshal.Cast<byte, ForgetOne>(args[8..]);
        int n = (int)Math.Min(bf.Count, (uint)items.Length);
        for (int i = 0; i < n; i++) lookups.Forget(items[i].NodeId, items[i].NLookup);
    }

    private void HandleGetAttr(ReaderContext ctx, in InHeader h)
    {
        int rc = fs.GetAttr(h.NodeId, out var attr);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        if (attr.Ino == 0) attr.Ino = h.NodeId;
        if (attr.BlkSize == 0) attr.BlkSize = 4096;
        var at = opt.AttrTimeout;
        var ao = new AttrOut
        {
            AttrValid = (ulong)(at.Ticks / TimeSpan.TicksPerSecond),
            AttrValidNsec = (uint)(at.Ticks % TimeSpan.TicksPerSecond * 100),
            Attr = attr,
        };
        replies.Struct(ctx, h.Unique, ao, Marshal.SizeOf<AttrOut>());
    }

    private void HandleReadLink(ReaderContext ctx, in InHeader h)
    {
        int rc = fs.ReadLink(h.NodeId, out var target);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        replies.Bytes(ctx, h.Unique, target.Span);
    }

    private void HandleOpen(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var oi = MemoryMarshal.Read<OpenIn>(args);
        // O_WRONLY/O_RDWR or O_TRUNC would modify a read-only tree.
        if ((oi.Flags & 3) != 0 || (oi.Flags & 0x200) != 0) { replies.Error(ctx.Fd, h.Unique, Errno.EROFS); return; }
        int rc = fs.Open(h.NodeId, (int)oi.Flags, out var r);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        var oo = new OpenOut { Fh = PassthroughBackings.FilesystemHandle(r.Handle) };
        if (r.KeepCache) oo.OpenFlags |= OpenFlags.KeepCache;
        if (r.DirectIo) oo.OpenFlags |= OpenFlags.DirectIo;
        backings.Decide(h.NodeId, r, ref oo);
        if ((oo.OpenFlags & OpenFlags.DirectIo) != 0) Interlocked.Increment(ref _directIoOpens);
        replies.Struct(ctx, h.Unique, oo, Marshal.SizeOf<OpenOut>());
    }

    private void HandleRelease(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var ri = MemoryMarshal.Read<ReleaseIn>(args);
        backings.Release(h.NodeId, ri.Fh);
        fs.Release(h.NodeId, PassthroughBackings.FilesystemHandle(ri.Fh));
        replies.Error(ctx.Fd, h.Unique, 0);
    }

    // ---------------------------------------------------------------- READ (the hot path: no allocation per request)

    private void HandleRead(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var ri = MemoryMarshal.Read<ReadIn>(args);
        int size = (int)Math.Min(ri.Size, (uint)session.MaxRead);
        ulong unique = h.Unique;
        ulong handle = PassthroughBackings.FilesystemHandle(ri.Fh);
        bool direct;
        ReadOnlyMemory<byte> data;
        try { direct = fs.TryReadDirect(h.NodeId, handle, (long)ri.Offset, size, out data); }
        catch (Exception ex)
        {
            replies.Error(ctx.Fd, unique, ErrnoOf(ex));
            return;
        }
        if (direct)
        {
            replies.Gather(ctx.Fd, unique, data.Length <= size ? data : data[..size]);
            return;
        }
        FuseFileRange range;
        bool fromFile;
        try { fromFile = fs.TryReadFromFile(h.NodeId, handle, (long)ri.Offset, size, out range); }
        catch (Exception ex)
        {
            replies.Error(ctx.Fd, unique, ErrnoOf(ex));
            return;
        }
        if (fromFile)
        {
            int failed = fileReplies.Send(ctx, unique, range, size);
            if (failed == 0) return;
            // The local file could not give the bytes (a failing cache disk): tell the filesystem, which may drop the
            // file and note the error, then serve the READ the normal way (memory, the chunk cache, the registry).
            try { fs.FileReadFailed(h.NodeId, handle, (long)ri.Offset, size, failed); }
            catch (Exception ex) { opt.Log?.Invoke($"FileReadFailed of inode {h.NodeId}: {ex.Message}"); }
        }
        var buf = ctx.ReplyBufferFor(size, out bool pooled);
        ValueTask<int> vt;
        try
        {
            vt = fs.ReadAsync(h.NodeId, handle, (long)ri.Offset,
                new Memory<byte>(buf, ReplyWriter.OutHeaderSize, size), ctx.Cts.Token);
        }
        catch (Exception ex)
        {
            if (pooled) DataBuffers.Return(buf);
            replies.Error(ctx.Fd, unique, ErrnoOf(ex));
            return;
        }
        if (vt.IsCompleted)
        {
            int r;
            try { r = vt.GetAwaiter().GetResult(); }
            catch (Exception ex) { r = -ErrnoOf(ex); }
            replies.ReadResult(ctx.Fd, buf, unique, r, size);
            if (pooled) DataBuffers.Return(buf);
            return;
        }
        // Slow path: the buffer and token now belong to this read; the thread takes fresh ones.
        var cts = ctx.Cts;
        ctx.Cts = new CancellationTokenSource();
        if (!pooled) ctx.Reply = ReaderContext.NewReplyBuffer();
        inflight.Add(unique, cts);
        _ = CompleteReadAsync(ctx.Fd, buf, unique, size, vt, cts);
    }

    private async Task CompleteReadAsync(int fd, byte[] buf, ulong unique, int size, ValueTask<int> vt, CancellationTokenSource cts)
    {
        int r;
        try { r = await vt.ConfigureAwait(false); }
        catch (Exception ex) { r = -ErrnoOf(ex); }
        // Reply before leaving the in-flight table: fds are closed only once that table is empty.
        replies.ReadResult(fd, buf, unique, r, size);
        inflight.Remove(unique);
        DataBuffers.Return(buf); // small per-thread buffers are not pooled: Return ignores them
        cts.Dispose();
    }

    private static int ErrnoOf(Exception ex) => ex switch
    {
        FuseException fe => fe.Errno,
        OperationCanceledException => Errno.EINTR,
        TimeoutException => Errno.ETIMEDOUT,
        _ => Errno.EIO,
    };

    // ---------------------------------------------------------------- directories, xattrs, statfs, lseek

    private void HandleOpenDir(ReaderContext ctx, in InHeader h)
    {
        int rc = fs.OpenDir(h.NodeId, out ulong handle);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        // Directories of a read-only tree never change: let the kernel cache their listings.
        var oo = new OpenOut { Fh = handle, OpenFlags = OpenFlags.KeepCache | OpenFlags.CacheDir };
        replies.Struct(ctx, h.Unique, oo, Marshal.SizeOf<OpenOut>());
    }

    private void HandleReadDir(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args, bool plus)
    {
        var ri = MemoryMarshal.Read<ReadIn>(args);
        int size = (int)Math.Min(ri.Size, (uint)(ctx.Reply.Length - ReplyWriter.OutHeaderSize));
        ctx.Dir.Reset(opt, ctx.Reply, ReplyWriter.OutHeaderSize, size, plus);
        int rc;
        try { rc = fs.ReadDir(h.NodeId, ri.Fh, (long)ri.Offset, ctx.Dir); }
        catch (Exception ex) { rc = ErrnoOf(ex); }
        if (rc != 0 && ctx.Dir.Count == 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        // The kernel takes a reference on every READDIRPLUS entry it receives: count them before it can forget them.
        if (plus) lookups.Add(ctx.Dir.LookedUpNodes);
        replies.Send(ctx.Fd, ctx.Reply, h.Unique, 0, ctx.Dir.Length);
    }

    private void HandleStatFs(ReaderContext ctx, in InHeader h)
    {
        int rc = fs.StatFs(h.NodeId, out var s);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        var k = new KStatFs
        {
            Blocks = s.Blocks, BFree = s.BlocksFree, BAvail = s.BlocksAvailable, Files = s.Files, FFree = s.FilesFree,
            BSize = s.BlockSize == 0 ? 4096 : s.BlockSize, NameLen = s.NameLen == 0 ? 255 : s.NameLen,
            FrSize = s.FragmentSize == 0 ? (s.BlockSize == 0 ? 4096 : s.BlockSize) : s.FragmentSize,
        };
        replies.Struct(ctx, h.Unique, k, Marshal.SizeOf<KStatFs>());
    }

    private void HandleGetXattr(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var gi = MemoryMarshal.Read<GetXattrIn>(args);
        var name = CString(args[8..]);
        int rc = fs.GetXattr(h.NodeId, name, out var value);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        ReplySized(ctx, h.Unique, gi.Size, value.Span);
    }

    private void HandleListXattr(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var gi = MemoryMarshal.Read<GetXattrIn>(args);
        int rc = fs.ListXattr(h.NodeId, out var names);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        ReplySized(ctx, h.Unique, gi.Size, names.Span);
    }

    /// <summary>xattr protocol: size 0 asks for the length; a too-small buffer is ERANGE.</summary>
    private void ReplySized(ReaderContext ctx, ulong unique, uint size, ReadOnlySpan<byte> value)
    {
        if (size == 0)
        {
            replies.Struct(ctx, unique, new GetXattrOut { Size = (uint)value.Length }, 8);
            return;
        }
        if (value.Length > size) { replies.Error(ctx.Fd, unique, Errno.ERANGE); return; }
        replies.Bytes(ctx, unique, value);
    }

    private void HandleLSeek(ReaderContext ctx, in InHeader h, ReadOnlySpan<byte> args)
    {
        var li = MemoryMarshal.Read<LSeekIn>(args);
        int rc = fs.GetAttr(h.NodeId, out var attr);
        if (rc != 0) { replies.Error(ctx.Fd, h.Unique, rc); return; }
        // Files here have no holes: data runs from 0 to size, the only hole is at the end.
        const uint SeekData = 3, SeekHole = 4;
        if (li.Whence is not (SeekData or SeekHole)) { replies.Error(ctx.Fd, h.Unique, Errno.EINVAL); return; }
        if (li.Offset >= attr.Size) { replies.Error(ctx.Fd, h.Unique, Errno.ENXIO); return; }
        ulong off = li.Whence == SeekData ? li.Offset : attr.Size;
        replies.Struct(ctx, h.Unique, new LSeekOut { Offset = off }, 8);
    }

    private static ReadOnlySpan<byte> CString(ReadOnlySpan<byte> s)
    {
        int z = s.IndexOf((byte)0);
        return z >= 0 ? s[..z] : s;
    }
}
