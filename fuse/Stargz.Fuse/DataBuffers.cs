using System.Collections.Concurrent;

namespace Stargz.Fuse;

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
