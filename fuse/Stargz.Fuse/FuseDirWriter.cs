using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Stargz.Fuse;

/// <summary>
/// Fills one READDIR/READDIRPLUS reply. The filesystem calls <see cref="Add(ReadOnlySpan{byte}, in FuseEntry, long)"/>
/// for entries starting at the requested offset until it returns false (reply full). <c>nextOffset</c> is the
/// offset the kernel passes back to continue after this entry (any stable non-zero cookie; an index + 1 is typical).
/// Emit "." and ".." yourself if you want them listed.
/// </summary>
/// <remarks>
/// Only encodes: it knows the mount's options (for the entries' cache timeouts) and the reply buffer, nothing of the
/// server. The dispatcher counts the kernel's lookups on what was written (<see cref="LookedUpNodes"/>) before it
/// sends the reply.
/// </remarks>
public sealed class FuseDirWriter
{
    private const int DirentHeaderSize = 24;
    private static int EntryOutSize => Unsafe.SizeOf<EntryOut>();

    private byte[] _buf = [];
    private int _start, _pos, _end;
    private FuseMountOptions _opt = new();

    /// <summary>True for READDIRPLUS: the entry's attributes are sent and count as a lookup.</summary>
    public bool IsPlus { get; private set; }
    /// <summary>Number of entries added so far in this reply.</summary>
    public int Count { get; private set; }

    internal void Reset(FuseMountOptions opt, byte[] buf, int start, int size, bool plus)
    {
        _opt = opt; _buf = buf; _start = start; _pos = start; _end = start + size; IsPlus = plus; Count = 0;
    }

    internal int Length => _pos - _start;

    public bool Add(string name, in FuseEntry entry, long nextOffset)
    {
        Span<byte> tmp = stackalloc byte[1024];
        int n = Encoding.UTF8.GetBytes(name, tmp);
        return Add(tmp[..n], entry, nextOffset);
    }

    public bool Add(ReadOnlySpan<byte> name, in FuseEntry entry, long nextOffset)
    {
        int direntLen = (DirentHeaderSize + name.Length + 7) & ~7;
        int need = IsPlus ? direntLen + EntryOutSize : direntLen;
        if (_pos + need > _end) return false;
        var span = _buf.AsSpan(_pos, need);
        span.Clear();
        int p = 0;
        if (IsPlus)
        {
            var eo = EntryOut.From(entry, _opt);
            MemoryMarshal.Write(span, in eo);
            p = EntryOutSize;
        }
        var d = new DirentHeader
        {
            Ino = entry.Attr.Ino != 0 ? entry.Attr.Ino : entry.Ino,
            Off = (ulong)nextOffset,
            NameLen = (uint)name.Length,
            Type = (entry.Attr.Mode & UnixMode.S_IFMT) >> 12,
        };
        MemoryMarshal.Write(span[p..], in d);
        name.CopyTo(span[(p + DirentHeaderSize)..]);
        _pos += need;
        Count++;
        return true;
    }

    /// <summary>
    /// The node ids of this READDIRPLUS reply's entries that the kernel takes a reference on: every entry but "." and
    /// "..", and none with node id 0. Read back from the reply itself, so exactly what is sent is counted.
    /// </summary>
    internal PlusEntryNodes LookedUpNodes => new(IsPlus ? _buf.AsSpan(_start, Length) : default);

    /// <summary>Walks READDIRPLUS entries (entry_out, dirent header, name padded to 8 bytes) without allocating.</summary>
    internal ref struct PlusEntryNodes(ReadOnlySpan<byte> entries)
    {
        private ReadOnlySpan<byte> _rest = entries;

        public ulong Current { get; private set; }

        public readonly PlusEntryNodes GetEnumerator() => this;

        public bool MoveNext()
        {
            while (_rest.Length >= EntryOutSize + DirentHeaderSize)
            {
                ulong node = MemoryMarshal.Read<EntryOut>(_rest).NodeId;
                var d = MemoryMarshal.Read<DirentHeader>(_rest[EntryOutSize..]);
                var name = _rest.Slice(EntryOutSize + DirentHeaderSize, (int)d.NameLen);
                _rest = _rest[(EntryOutSize + ((DirentHeaderSize + name.Length + 7) & ~7))..];
                bool dot = name is [(byte)'.'] or [(byte)'.', (byte)'.'];
                if (dot || node == 0) continue;
                Current = node;
                return true;
            }
            return false;
        }
    }
}
