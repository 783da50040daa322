using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// Writes replies to /dev/fuse: an error, a struct or bytes from the thread's reply buffer (one write), or a header
/// with the caller's memory behind it (one writev, no copy). A reply goes in one write; the kernel never takes part
/// of one. ENOENT (the request was interrupted and is gone) and ENODEV (the connection ended) are normal answers.
/// </summary>
internal sealed unsafe class ReplyWriter(Action<string>? log)
{
    public const int OutHeaderSize = 16;

    public void Error(int fd, ulong unique, int errno)
    {
        OutHeader oh = new() { Len = OutHeaderSize, Error = -errno, Unique = unique };
        Write(fd, (byte*)&oh, OutHeaderSize);
    }

    /// <summary>A notification without payload (unique 0, the code in the error field), e.g. FUSE_NOTIFY_RESEND.</summary>
    public bool Notify(int fd, int code)
    {
        OutHeader oh = new() { Len = OutHeaderSize, Error = code, Unique = 0 };
        return Native.Write(fd, (byte*)&oh, OutHeaderSize) == OutHeaderSize;
    }

    /// <summary><paramref name="value"/> (its first <paramref name="size"/> bytes, zero-padded) from the thread's buffer.</summary>
    public void Struct<T>(ReaderContext ctx, ulong unique, in T value, int size) where T : unmanaged
    {
        var span = ctx.Reply.AsSpan(OutHeaderSize, size);
        span.Clear();
        MemoryMarshal.Write(span, in value);
        Send(ctx.Fd, ctx.Reply, unique, 0, Math.Min(size, sizeof(T)));
    }

    public void Bytes(ReaderContext ctx, ulong unique, ReadOnlySpan<byte> payload)
    {
        payload.CopyTo(ctx.Reply.AsSpan(OutHeaderSize));
        Send(ctx.Fd, ctx.Reply, unique, 0, payload.Length);
    }

    /// <summary>A read's result: <paramref name="r"/> bytes (at most <paramref name="size"/>) already in <paramref name="buf"/>, or -errno.</summary>
    public void ReadResult(int fd, byte[] buf, ulong unique, int r, int size)
    {
        if (r < 0) { Error(fd, unique, -r); return; }
        Send(fd, buf, unique, 0, Math.Min(r, size));
    }

    /// <summary>Writes header + <paramref name="payloadLen"/> bytes already placed after it in <paramref name="buf"/>.</summary>
    public void Send(int fd, byte[] buf, ulong unique, int errno, int payloadLen)
    {
        var oh = new OutHeader { Len = (uint)(OutHeaderSize + payloadLen), Error = -errno, Unique = unique };
        MemoryMarshal.Write(buf, in oh);
        fixed (byte* p = buf) Write(fd, p, OutHeaderSize + payloadLen);
    }

    /// <summary>Header from the stack, payload from the caller's memory: one writev, no copy in user space.</summary>
    public void Gather(int fd, ulong unique, ReadOnlyMemory<byte> payload)
    {
        var oh = new OutHeader { Len = (uint)(OutHeaderSize + payload.Length), Error = 0, Unique = unique };
        using var pin = payload.Pin();
        Native.IoVec* iov = stackalloc Native.IoVec[2];
        iov[0] = new Native.IoVec { Base = &oh, Len = OutHeaderSize };
        iov[1] = new Native.IoVec { Base = pin.Pointer, Len = (nuint)payload.Length };
        while (true)
        {
            nint w = Native.Writev(fd, iov, payload.Length == 0 ? 1 : 2);
            if (w >= 0) return;
            int e = Native.LastErrno;
            if (e == Native.EINTR) continue;
            if (e is not (Native.ENOENT or Native.ENODEV)) log?.Invoke($"writev /dev/fuse: errno {e}");
            return;
        }
    }

    private void Write(int fd, byte* p, int len)
    {
        while (true)
        {
            nint w = Native.Write(fd, p, len);
            if (w >= 0) return;
            int e = Native.LastErrno;
            if (e == Native.EINTR) continue;
            if (e is not (Native.ENOENT or Native.ENODEV)) log?.Invoke($"write /dev/fuse: errno {e}");
            return;
        }
    }
}
