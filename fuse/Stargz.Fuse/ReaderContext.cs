namespace Stargz.Fuse;

/// <summary>One reader thread's state: its /dev/fuse fd and the buffers reused for every request it serves.</summary>
internal sealed class ReaderContext(int fd) : IDisposable
{
    /// <summary>Per-thread reply buffer for everything but large READs (entries, attrs, xattrs, readdir pages).</summary>
    public const int SmallReplySize = ReplyWriter.OutHeaderSize + 128 * 1024;

    /// <summary>Replies go back on the fd the request was read from.</summary>
    public readonly int Fd = fd;
    public byte[] Reply = NewReplyBuffer();
    public CancellationTokenSource Cts = new();
    public readonly FuseDirWriter Dir = new();
    /// <summary>The thread's pipe for spliced replies (-1 until the first one) and how many pages it holds.</summary>
    public int PipeRead = -1, PipeWrite = -1, PipePages;

    public static byte[] NewReplyBuffer() => GC.AllocateUninitializedArray<byte>(SmallReplySize, pinned: true);

    /// <summary>Small replies use the thread's buffer; big ones a pooled 1 MiB buffer shared by all mounts.</summary>
    public byte[] ReplyBufferFor(int payload, out bool pooled)
    {
        pooled = payload > SmallReplySize - ReplyWriter.OutHeaderSize;
        return pooled ? DataBuffers.Rent() : Reply;
    }

    public void ClosePipe()
    {
        if (PipeRead >= 0) Native.Close(PipeRead);
        if (PipeWrite >= 0) Native.Close(PipeWrite);
        PipeRead = PipeWrite = -1;
        PipePages = 0;
    }

    public void Dispose()
    {
        ClosePipe();
        Cts.Dispose();
    }
}
