namespace Stargz.Estargz;

/// <summary>One chunk of a regular file: where its bytes are in the file and in the blob.</summary>
/// <param name="FileOffset">offset of the chunk within the file.</param>
/// <param name="Size">uncompressed size of the chunk.</param>
/// <param name="BlobOffset">offset of the compressed gzip member / zstd frame holding the chunk.</param>
/// <param name="BlobLength">compressed bytes to fetch: up to the next distinct member offset or the TOC.</param>
/// <param name="InnerOffset">offset of the chunk within the decompressed member / frame.</param>
/// <param name="Digest">"sha256:..." of the chunk's bytes (or of the whole file for single-chunk legacy blobs), null if absent.</param>
public readonly record struct ChunkInfo(long FileOffset, long Size, long BlobOffset, long BlobLength, long InnerOffset, string? Digest);

/// <summary>A node of the entry tree built from the TOC. Hardlinks are resolved away: every name of a hardlinked
/// file points at the same node (whose <see cref="NumLink"/> counts the names).</summary>
public sealed class TocNode
{
    internal Dictionary<string, TocNode>? ChildMap;
    internal ChunkInfo[] ChunkArray = Array.Empty<ChunkInfo>();
    internal bool Replaced;

    internal TocNode(TocEntry entry, string path, TocNode? parent)
    {
        Entry = entry;
        Path = path;
        int slash = path.LastIndexOf('/');
        Name = slash < 0 ? path : path[(slash + 1)..];
        Parent = parent;
        if (entry.Type == TocEntryType.Dir) ChildMap = new Dictionary<string, TocNode>(StringComparer.Ordinal);
    }

    /// <summary>The TOC entry (for regular files: the first chunk's "reg" entry).</summary>
    public TocEntry Entry { get; internal set; }
    /// <summary>Base name ("" for the root).</summary>
    public string Name { get; }
    /// <summary>Cleaned full path without leading "/" ("" for the root).</summary>
    public string Path { get; }
    public TocNode? Parent { get; internal set; }
    /// <summary>Children of a directory by base name (ordinal), null for non-directories.</summary>
    public IReadOnlyDictionary<string, TocNode>? Children => ChildMap;
    /// <summary>Number of names referencing this node (files) or 2 + subdirectories (directories).</summary>
    public int NumLink { get; internal set; }
    /// <summary>Chunks of a regular file, sorted by <see cref="ChunkInfo.FileOffset"/>, contiguous, covering Size.</summary>
    public IReadOnlyList<ChunkInfo> Chunks => ChunkArray;

    public TocEntryType Type => Entry.Type;
    public long Size => Entry.Type == TocEntryType.Reg ? Entry.Size : 0;
    public bool IsDirectory => Entry.Type == TocEntryType.Dir;
    public bool IsRegular => Entry.Type == TocEntryType.Reg;
    /// <summary>An overlay whiteout as stored in the layer: a ".wh.NAME" entry (not the opaque marker).</summary>
    public bool IsWhiteout => Name.StartsWith(".wh.", StringComparison.Ordinal) && !IsOpaqueMarker;
    /// <summary>The ".wh..wh..opq" marker that makes its directory opaque.</summary>
    public bool IsOpaqueMarker => Name == ".wh..wh..opq";
    /// <summary>For a whiteout, the name it hides.</summary>
    public string? WhiteoutTarget => IsWhiteout ? Name[4..] : null;

    public override string ToString() => $"{Entry.Type} /{Path}";
}
