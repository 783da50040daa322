using System.Buffers;
using System.Runtime.InteropServices;

namespace Stargz.Registry;

/// <summary>
/// Anonymous private memory from <c>mmap</c>, unmapped on dispose: for big transient buffers (a fetched range of
/// megabytes) that should not live on the GC heap. Pooled there (<see cref="ArrayPool{T}.Shared"/> keeps an array per
/// thread and per core, rounded up to a power of two) they stay resident after use; unmapped, their pages go back to
/// the system at once, for the cost of a mapping and its page faults. Dispose only once nothing uses the memory.
/// </summary>
public sealed unsafe class MappedMemory : MemoryManager<byte>
{
    /// <summary>Buffers from this size on are worth mapping rather than pooling.</summary>
    public const int UseFrom = 1 << 20;

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
