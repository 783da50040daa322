namespace Stargz.Estargz;

/// <summary>Entry types of the TOC, serialized as dir|reg|symlink|hardlink|char|block|fifo|chunk.</summary>
public enum TocEntryType { Dir, Reg, Symlink, Hardlink, Char, Block, Fifo, Chunk }

/// <summary>One entry of the TOC JSON. Field names (JSON) follow the reference: name, type, size, modtime, ...</summary>
public sealed class TocEntry
{
    /// <summary>The tar entry's full path as stored (may carry "./" or a trailing "/"; see <see cref="TocTree.CleanName"/>).</summary>
    public string Name { get; set; } = "";
    public TocEntryType Type { get; set; }
    /// <summary>Regular files: the logical size of the whole file.</summary>
    public long Size { get; set; }
    /// <summary>Modification time, whole seconds UTC (null = zero/unknown, omitted in JSON).</summary>
    public DateTimeOffset? ModTime { get; set; }
    public string? LinkName { get; set; }
    /// <summary>Permission and mode bits (07777), as in the tar header.</summary>
    public long Mode { get; set; }
    public int Uid { get; set; }
    public int Gid { get; set; }
    public string? UserName { get; set; }
    public string? GroupName { get; set; }
    public int DevMajor { get; set; }
    public int DevMinor { get; set; }
    public IReadOnlyDictionary<string, byte[]>? Xattrs { get; set; }
    /// <summary>sha256 of a regular file's whole payload ("sha256:hex").</summary>
    public string? Digest { get; set; }
    /// <summary>Offset in the blob of the compressed member / frame holding this chunk.</summary>
    public long Offset { get; set; }
    /// <summary>Offset of this chunk inside the decompressed member / frame.</summary>
    public long InnerOffset { get; set; }
    /// <summary>Offset of this chunk within the file.</summary>
    public long ChunkOffset { get; set; }
    /// <summary>Size of this chunk (0 in JSON = up to the end of the file).</summary>
    public long ChunkSize { get; set; }
    public string? ChunkDigest { get; set; }

    public static string TypeToString(TocEntryType t) => t switch
    {
        TocEntryType.Dir => "dir",
        TocEntryType.Reg => "reg",
        TocEntryType.Symlink => "symlink",
        TocEntryType.Hardlink => "hardlink",
        TocEntryType.Char => "char",
        TocEntryType.Block => "block",
        TocEntryType.Fifo => "fifo",
        TocEntryType.Chunk => "chunk",
        _ => throw new ArgumentOutOfRangeException(nameof(t)),
    };

    public static bool TryParseType(ReadOnlySpan<byte> utf8, out TocEntryType t)
    {
        if (utf8.SequenceEqual("dir"u8)) { t = TocEntryType.Dir; return true; }
        if (utf8.SequenceEqual("reg"u8)) { t = TocEntryType.Reg; return true; }
        if (utf8.SequenceEqual("symlink"u8)) { t = TocEntryType.Symlink; return true; }
        if (utf8.SequenceEqual("hardlink"u8)) { t = TocEntryType.Hardlink; return true; }
        if (utf8.SequenceEqual("char"u8)) { t = TocEntryType.Char; return true; }
        if (utf8.SequenceEqual("block"u8)) { t = TocEntryType.Block; return true; }
        if (utf8.SequenceEqual("fifo"u8)) { t = TocEntryType.Fifo; return true; }
        if (utf8.SequenceEqual("chunk"u8)) { t = TocEntryType.Chunk; return true; }
        t = default;
        return false;
    }

    public override string ToString() => $"{TypeToString(Type)} {Name}";
}
