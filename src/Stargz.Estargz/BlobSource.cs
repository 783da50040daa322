using Microsoft.Win32.SafeHandles;

namespace Stargz.Estargz;

/// <summary>Random access to a blob's compressed bytes (a file, memory, or ranged HTTP in the layer).</summary>
public interface IBlobSource
{
    long Size { get; }

    /// <summary>Fills <paramref name="destination"/> with the bytes at <paramref name="offset"/>, or throws
    /// (<see cref="EstargzFormatException"/> when the range lies beyond the blob).</summary>
    ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct);
}

/// <summary>A blob held in memory.</summary>
public sealed class ByteArrayBlobSource : IBlobSource
{
    private readonly ReadOnlyMemory<byte> _data;

    public ByteArrayBlobSource(ReadOnlyMemory<byte> data) => _data = data;

    public long Size => _data.Length;

    public ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct)
    {
        if (offset < 0 || offset > _data.Length || destination.Length > _data.Length - offset)
            return ValueTask.FromException(new EstargzFormatException($"read of {destination.Length} bytes at {offset} is beyond the blob end {_data.Length} (truncated blob?)"));
        _data.Span.Slice((int)offset, destination.Length).CopyTo(destination.Span);
        return ValueTask.CompletedTask;
    }
}

/// <summary>A blob in a local file, read with positional reads (thread-safe).</summary>
public sealed class FileBlobSource : IBlobSource, IDisposable
{
    private readonly SafeFileHandle _handle;

    public FileBlobSource(string path)
    {
        _handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.RandomAccess);
        Size = RandomAccess.GetLength(_handle);
    }

    public long Size { get; }

    public async ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct)
    {
        if (offset < 0 || destination.Length > Size - offset)
            throw new EstargzFormatException($"read of {destination.Length} bytes at {offset} is beyond the blob end {Size} (truncated blob?)");
        int done = 0;
        while (done < destination.Length)
        {
            int n = await RandomAccess.ReadAsync(_handle, destination[done..], offset + done, ct).ConfigureAwait(false);
            if (n == 0) throw new EstargzFormatException($"unexpected end of blob file at {offset + done}");
            done += n;
        }
    }

    public void Dispose() => _handle.Dispose();
}

/// <summary>A forward-only stream over a blob source range (used for whole-blob passes such as the diffID).</summary>
public sealed class BlobSourceStream : Stream
{
    private readonly IBlobSource _src;
    private readonly long _end;
    private long _pos;

    public BlobSourceStream(IBlobSource src, long start = 0, long? end = null)
    {
        _src = src;
        _pos = start;
        _end = end ?? src.Size;
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => _end;
    public override long Position { get => _pos; set => throw new NotSupportedException(); }
    public override void Flush() { }
    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        var tmp = System.Buffers.ArrayPool<byte>.Shared.Rent(Math.Min(buffer.Length, 1 << 20));
        try
        {
            int n = ReadAsync(tmp.AsMemory(0, Math.Min(buffer.Length, tmp.Length)), CancellationToken.None).AsTask().GetAwaiter().GetResult();
            tmp.AsSpan(0, n).CopyTo(buffer);
            return n;
        }
        finally { System.Buffers.ArrayPool<byte>.Shared.Return(tmp); }
    }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        int n = (int)Math.Min(buffer.Length, _end - _pos);
        if (n <= 0) return 0;
        await _src.ReadAtAsync(_pos, buffer[..n], cancellationToken).ConfigureAwait(false);
        _pos += n;
        return n;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}
