using System.IO.MemoryMappedFiles;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>
/// Which inodes the kernel holds open in which mode: passthrough (with the backing id and how many opens share it) or
/// cached (how many opens). In memory; or, for a connection kept over restarts, in a file mapped shared, so the process
/// that adopts the connection knows the modes and backing ids the earlier one gave the kernel (a second backing file
/// on an inode, or a cached open on a passthrough one, fails the open) and releases them right. Writes to the mapping
/// are plain stores: nothing is lost when the process is killed. Callers hold one lock.
/// </summary>
internal sealed unsafe class OpenModes : IDisposable
{
    [StructLayout(LayoutKind.Sequential)]
    private struct Slot { public int BackingId; public int PassthroughOpens; public int CachedOpens; public int Reserved; }

    /// <summary>Inodes kept in the file (16 MiB, sparse: only touched pages take space); larger ones stay in memory.</summary>
    public const int Capacity = 1 << 20;

    private readonly Dictionary<ulong, (int Id, int Refs)> _backing = [];
    private readonly Dictionary<ulong, int> _cached = [];
    private MemoryMappedFile? _file;
    private MemoryMappedViewAccessor? _view;
    private Slot* _slots;

    /// <summary>Keeps the modes in <paramref name="path"/>: its contents are taken over when <paramref name="adopt"/>, else cleared.</summary>
    public void Persist(string path, bool adopt)
    {
        if (!adopt || !File.Exists(path))
        {
            File.Delete(path);
            using (var f = new FileStream(path, FileMode.CreateNew, FileAccess.ReadWrite)) f.SetLength((long)Capacity * sizeof(Slot));
        }
        _file = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.ReadWrite);
        _view = _file.CreateViewAccessor(0, (long)Capacity * sizeof(Slot), MemoryMappedFileAccess.ReadWrite);
        byte* p = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
        // Carry over what was kept in memory before (opens answered before the mapping existed).
        var slots = (Slot*)(p + _view.PointerOffset);
        foreach (var (ino, b) in _backing)
            if (ino < Capacity) { slots[ino].BackingId = b.Id; slots[ino].PassthroughOpens = b.Refs; }
        foreach (var (ino, c) in _cached)
            if (ino < Capacity) slots[ino].CachedOpens = c;
        _slots = slots;
    }

    private ref Slot At(ulong ino) => ref _slots != null && ino < Capacity ? ref _slots[ino] : ref Unsafe.NullRef<Slot>();

    /// <summary>The inode's backing id, taking one more reference on it; false when it is not in passthrough mode.</summary>
    public bool TryShareBacking(ulong ino, out int id)
    {
        ref var s = ref At(ino);
        if (!Unsafe.IsNullRef(ref s))
        {
            id = s.BackingId;
            if (s.PassthroughOpens <= 0 || id <= 0) return false;
            s.PassthroughOpens++;
            return true;
        }
        ref var slot = ref CollectionsMarshal.GetValueRefOrNullRef(_backing, ino);
        if (Unsafe.IsNullRef(ref slot)) { id = 0; return false; }
        slot.Refs++;
        id = slot.Id;
        return true;
    }

    public bool HasCachedOpens(ulong ino)
    {
        ref var s = ref At(ino);
        return !Unsafe.IsNullRef(ref s) ? s.CachedOpens > 0 : _cached.ContainsKey(ino);
    }

    public void AddCachedOpen(ulong ino)
    {
        ref var s = ref At(ino);
        if (!Unsafe.IsNullRef(ref s)) s.CachedOpens++;
        else CollectionsMarshal.GetValueRefOrAddDefault(_cached, ino, out _)++;
    }

    public void SetBacking(ulong ino, int id)
    {
        ref var s = ref At(ino);
        if (!Unsafe.IsNullRef(ref s))
        {
            // The id first: a process killed between the two stores leaves a count of 0, which reads as "no backing".
            s.BackingId = id;
            s.PassthroughOpens = 1;
        }
        else _backing[ino] = (id, 1);
    }

    /// <summary>Drops one passthrough open; returns the backing id to close when it was the last, else 0.</summary>
    public int ReleaseBacking(ulong ino)
    {
        ref var s = ref At(ino);
        if (!Unsafe.IsNullRef(ref s))
        {
            if (s.PassthroughOpens <= 0) return 0;
            if (--s.PassthroughOpens > 0) return 0;
            int id = s.BackingId;
            s.BackingId = 0;
            return id;
        }
        ref var slot = ref CollectionsMarshal.GetValueRefOrNullRef(_backing, ino);
        if (Unsafe.IsNullRef(ref slot) || --slot.Refs > 0) return 0;
        int closed = slot.Id;
        _backing.Remove(ino);
        return closed;
    }

    public void ReleaseCachedOpen(ulong ino)
    {
        ref var s = ref At(ino);
        if (!Unsafe.IsNullRef(ref s))
        {
            if (s.CachedOpens > 0) s.CachedOpens--;
            return;
        }
        ref int c = ref CollectionsMarshal.GetValueRefOrNullRef(_cached, ino);
        if (!Unsafe.IsNullRef(ref c) && --c <= 0) _cached.Remove(ino);
    }

    public void Dispose()
    {
        if (_view != null)
        {
            _slots = null;
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _view.Dispose();
            _file?.Dispose();
            _view = null;
        }
    }
}
