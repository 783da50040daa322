using System.Buffers;
using Stargz.Registry;

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
    private readonly byte[]? _array;
    private readonly MappedMemory? _mapped;

    private FetchBuffer(byte[]? array, MappedMemory? mapped, int length)
    {
        _array = array;
        _mapped = mapped;
        Length = length;
    }

    public int Length { get; }

    public static FetchBuffer Rent(int length) => length >= MappedMemory.UseFrom
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
