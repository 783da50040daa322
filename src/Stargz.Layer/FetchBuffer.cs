using System.Buffers;
using System.Runtime.InteropServices;

namespace Stargz.Layer;

/// <summary>
/// A fetch's scratch buffer (a compressed range, the background fetch's decode buffer): a pooled array when small,
/// else anonymous memory mapped for this fetch and unmapped when it is returned. The big ones (4 MiB and more: a
/// background batch, a chunk) do not come from the GC heap: pooled there, they sat in the large-object heap, one set
/// per thread that had returned one (<see cref="ArrayPool{T}.Shared"/> keeps an array per thread and per core, and
/// a fetch ends on whichever pool thread), rounded up to the next power of two, and the daemon's resident memory kept
/// them all. Unmapped, their pages go back to the system at once; a batch costs a mapping and its page faults.
/// </summary>
internal readonly struct FetchBuffer
{
    /// <summary>From this size on, mapped rather than pooled.</summary>
    internal const int MapFrom = 1 << 20;

    private readonly byte[]? _array;
    private readonly MappedMemory? _mapped;

    private FetchBuffer(byte[]? array, MappedMemory? mapped, int length)
    {
        _array = array;
        _mapped = mapped;
        Length = length;
    }

    public int Length { get; }

    public static FetchBuffer Rent(int length) => length >= MapFrom
        ? new FetchBuffer(null, new MappedMemory(length), length)
        : new FetchBuffer(ArrayPool<byte>.Shared.Rent(length), null, length);

    public Memory<byte> Memory => _mapped != null ? _mapped.Memory : _array.AsMemory(0, Length);

    public Span<byte> Span => _mapped != null ? _mapped.GetSpan() : _array.AsSpan(0, Length);

    /// <summary>Only once nothing writes into it any more (the fetch ended or failed).</summary>
    public void Return()
    {
        if (_mapped != null) ((IDisposable)_mapped).Dispose();
        else if (_array != null) ArrayPool<byte>.Shared.Return(_array);
    }
}

/// <summary>Anonymous private memory from <c>mmap</c>, unmapped on dispose.</summary>
internal sealed unsafe class MappedMemory : MemoryManager<byte>
{
    private nint _address;
    private readonly int _length;

    public MappedMemory(int length)
    {
        _length = length;
        var p = mmap(0, (nuint)length, 0x1 | 0x2 /* PROT_READ|PROT_WRITE */, 0x02 | 0x20 /* MAP_PRIVATE|MAP_ANONYMOUS */, -1, 0);
        if (p == -1) throw new OutOfMemoryException($"mmap of {length} bytes failed: errno {Marshal.GetLastPInvokeError()}");
        _address = p;
    }

    public override Span<byte> GetSpan()
    {
        var p = _address;
        ObjectDisposedException.ThrowIf(p == 0, this);
        return new Span<byte>((void*)p, _length);
    }

    public override MemoryHandle Pin(int elementIndex = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(elementIndex);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(elementIndex, _length);
        return new MemoryHandle((byte*)_address + elementIndex);
    }

    public override void Unpin() { }

    protected override void Dispose(bool disposing)
    {
        var p = Interlocked.Exchange(ref _address, 0);
        if (p != 0) munmap(p, (nuint)_length);
    }

    [DllImport("libc", SetLastError = true)]
    private static extern nint mmap(nint addr, nuint length, int prot, int flags, int fd, nint offset);

    [DllImport("libc", SetLastError = true)]
    private static extern int munmap(nint addr, nuint length);
}
