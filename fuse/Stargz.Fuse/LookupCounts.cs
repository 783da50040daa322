using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// The node table: how many references the kernel holds on each node id. LOOKUP and every READDIRPLUS entry take
/// one, FORGET and BATCH_FORGET drop them; when a node's count reaches zero the filesystem hears
/// <see cref="IFuseFileSystem.Forget"/> (never for the root, which the kernel holds for the life of the mount).
/// </summary>
internal sealed class LookupCounts(IFuseFileSystem fs)
{
    private const ulong RootId = 1;
    private readonly Lock _lock = new();
    private readonly Dictionary<ulong, ulong> _counts = [];

    public void Add(ulong ino)
    {
        lock (_lock)
            CollectionsMarshal.GetValueRefOrAddDefault(_counts, ino, out _)++;
    }

    /// <summary>One reference per entry of a READDIRPLUS reply, taken under one lock.</summary>
    public void Add(FuseDirWriter.PlusEntryNodes nodes)
    {
        lock (_lock)
            foreach (ulong ino in nodes)
                CollectionsMarshal.GetValueRefOrAddDefault(_counts, ino, out _)++;
    }

    public void Forget(ulong ino, ulong n)
    {
        bool gone = false;
        lock (_lock)
        {
            ref ulong c = ref CollectionsMarshal.GetValueRefOrNullRef(_counts, ino);
            if (Unsafe.IsNullRef(ref c)) return;
            if (c <= n) { _counts.Remove(ino); gone = true; }
            else c -= n;
        }
        if (gone && ino != RootId) fs.Forget(ino);
    }

    public ulong Count(ulong ino)
    {
        lock (_lock) return _counts.TryGetValue(ino, out var c) ? c : 0;
    }
}
