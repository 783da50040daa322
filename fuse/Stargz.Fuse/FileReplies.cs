namespace Stargz.Fuse;

/// <summary>
/// READ replies whose bytes sit in a local file (<see cref="IFuseFileSystem.TryReadFromFile"/>): spliced through the
/// reader thread's pipe when the range fits it, else read with pread into a reply buffer and written. A range the
/// file cannot give (EIO on a failing cache disk and the like) is not answered here: the dispatcher then serves the
/// READ through <see cref="IFuseFileSystem.ReadAsync"/>, which can get the bytes elsewhere.
/// </summary>
internal sealed unsafe class FileReplies(ReplyWriter replies, int maxRead, Action<string>? log)
{
    // Cleared for good when /dev/fuse refuses a spliced reply in a way a pread reply would not meet.
    private volatile bool _spliceUsable = true;
    private long _spliced, _fallbacks, _readErrors;

    /// <summary>See <see cref="FuseServer.SplicedReads"/>.</summary>
    public long Spliced => Interlocked.Read(ref _spliced);
    /// <summary>See <see cref="FuseServer.FileReadFallbacks"/>.</summary>
    public long Fallbacks => Interlocked.Read(ref _fallbacks);
    /// <summary>See <see cref="FuseServer.FileReadErrors"/>.</summary>
    public long ReadErrors => Interlocked.Read(ref _readErrors);

    /// <summary>
    /// Replies with the range's bytes and returns 0; or, when the file cannot be read, sends nothing and returns the
    /// errno (the READ is still waiting for an answer). Returns the lent reference either way.
    /// </summary>
    public int Send(ReaderContext ctx, ulong unique, in FuseFileRange range, int size)
    {
        if (range.File is not { } file) return Errno.EIO; // not made by TryLend: let the filesystem read it
        try
        {
            // The lend holds a reference: the descriptor stays open until Return, whoever disposes the handle.
            int fileFd = (int)file.DangerousGetHandle();
            int len = Math.Clamp(range.Length, 0, size);
            if (len > 0 && _spliceUsable && TrySplice(ctx, unique, fileFd, range.Offset, len)) return 0;
            if (len > 0) Interlocked.Increment(ref _fallbacks);
            int e = PreadReply(ctx, unique, fileFd, range.Offset, len);
            if (e != 0) Interlocked.Increment(ref _readErrors);
            return e;
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
        var oh = new OutHeader { Len = (uint)(ReplyWriter.OutHeaderSize + len), Error = 0, Unique = unique };
        if (Native.Write(ctx.PipeWrite, (byte*)&oh, ReplyWriter.OutHeaderSize) != ReplyWriter.OutHeaderSize)
        {
            ctx.ClosePipe();
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
            ctx.ClosePipe();
            return false;
        }
        while (true)
        {
            nint w = Native.Splice(ctx.PipeRead, null, ctx.Fd, null, (nuint)(ReplyWriter.OutHeaderSize + len), 0);
            if (w >= 0)
            {
                Interlocked.Increment(ref _spliced);
                return true;
            }
            int e = Native.LastErrno;
            if (e == Native.EINTR) continue;
            // ENOENT: the request was interrupted and is gone; ENODEV: the connection ended. Either way done.
            if (e is Native.ENOENT or Native.ENODEV)
            {
                ctx.ClosePipe(); // the kernel may have left part of the message in the pipe
                return true;
            }
            // Anything else: /dev/fuse did not take the message (the request is still waiting). Reply without splice
            // from now on rather than fail every read the same way.
            log?.Invoke($"splice to /dev/fuse: errno {e}; replying with copies from now on");
            _spliceUsable = false;
            ctx.ClosePipe();
            return false;
        }
    }

    private bool OpenPipe(ReaderContext ctx)
    {
        int pages = OpenSizedPipe(maxRead + 2 * 4096, out int r, out int w);
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

    /// <summary>See <see cref="FuseServer.LargestSplicedRead"/>.</summary>
    public static int LargestSplicedRead => SpliceLimit.Value;

    /// <summary>
    /// The copying answer for a file range: pread into a reply buffer, then one write. A failed pread sends nothing
    /// and returns its errno; 0 once replied.
    /// </summary>
    private int PreadReply(ReaderContext ctx, ulong unique, int fileFd, long offset, int len)
    {
        var buf = ctx.ReplyBufferFor(len, out bool pooled);
        try
        {
            int got = 0;
            fixed (byte* p = buf)
            {
                while (got < len)
                {
                    nint n = Native.Pread(fileFd, p + ReplyWriter.OutHeaderSize + got, len - got, offset + got);
                    if (n > 0) { got += (int)n; continue; }
                    if (n == 0) break; // end of file: a short reply means EOF to the kernel
                    int e = Native.LastErrno;
                    if (e == Native.EINTR) continue;
                    return e;
                }
            }
            replies.Send(ctx.Fd, buf, unique, 0, got);
            return 0;
        }
        finally
        {
            if (pooled) DataBuffers.Return(buf);
        }
    }
}
