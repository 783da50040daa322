namespace Stargz.Estargz;

/// <summary>Builds and validates the entry tree of a TOC (paths, parents, chunks, hardlinks, blob ranges).</summary>
public sealed class TocTree
{
    private readonly Dictionary<string, TocNode> _byPath;
    private readonly Dictionary<string, TocNode>.AlternateLookup<ReadOnlySpan<char>> _lookup;

    public TocNode Root { get; }
    /// <summary>Every distinct node in TOC order (hardlink names excluded; see <see cref="Hardlinks"/>).</summary>
    public IReadOnlyList<TocNode> Nodes { get; }
    /// <summary>Hardlink names and the (cleaned) path of the node they resolve to, in TOC order.</summary>
    public IReadOnlyList<(string Path, string TargetPath)> Hardlinks { get; }

    private TocTree(TocNode root, Dictionary<string, TocNode> byPath, List<TocNode> nodes, List<(string, string)> links)
    {
        Root = root;
        _byPath = byPath;
        _lookup = byPath.GetAlternateLookup<ReadOnlySpan<char>>();
        Nodes = nodes;
        Hardlinks = links;
    }

    /// <summary>Cleans a TOC / tar name: strips "./" and "/" decorations, collapses "//" and "."; throws
    /// <see cref="TocValidationException"/> for absolute names (other than the root "/", which umoci writes),
    /// ".." components, NUL bytes.</summary>
    public static string CleanName(string name)
    {
        // Names as the writers make them ("usr/lib/x", "usr/lib/" for a directory) need no new string: one per entry
        // of every TOC, and the split and join below made a string per component besides.
        if (IsClean(name)) return name;
        if (name.Length > 1 && name[^1] == '/' && IsClean(name.AsSpan(0, name.Length - 1))) return name[..^1];
        if (name.Contains('\0')) throw new TocValidationException("name contains a NUL byte", name);
        if (name.StartsWith('/') && name.AsSpan().TrimStart('/').TrimStart('.').Length != 0)
            throw new TocValidationException("absolute name", name);
        var parts = name.Split('/', StringSplitOptions.RemoveEmptyEntries);
        int n = 0;
        for (int i = 0; i < parts.Length; i++)
        {
            if (parts[i] == ".") continue;
            if (parts[i] == "..") throw new TocValidationException("name has a \"..\" component", name);
            if (parts[i].Length > 255) throw new TocValidationException("name component longer than 255", name);
            parts[n++] = parts[i];
        }
        return string.Join('/', parts, 0, n);
    }

    /// <summary>Whether <paramref name="name"/> is already clean: components of 1 to 255 characters, none "." or "..",
    /// joined by single slashes, no NUL. Anything else takes the slow path, which cleans or refuses it.</summary>
    private static bool IsClean(ReadOnlySpan<char> name)
    {
        var start = 0;
        for (var i = 0; i <= name.Length; i++)
        {
            if (i < name.Length && name[i] != '/')
            {
                if (name[i] == '\0') return false;
                continue;
            }
            var part = name[start..i];
            if (part.Length == 0 || part.Length > 255 || part is "." or "..") return name.Length == 0;
            start = i + 1;
        }
        return true;
    }

    /// <summary>Looks a path up ("a/b", "/a/b", "./a/b"); null if absent. Follows no symlinks.</summary>
    public TocNode? Lookup(ReadOnlySpan<char> path)
    {
        while (path.Length > 0 && path[0] == '/') path = path[1..];
        if (path.StartsWith("./")) path = path[2..];
        while (path.Length > 0 && path[^1] == '/') path = path[..^1];
        if (path.Length == 0 || (path.Length == 1 && path[0] == '.')) return Root;
        return _lookup.TryGetValue(path, out var node) ? node : null;
    }

    /// <param name="payloadEnd">where chunk data ends (TOC member start, or the TOC skippable frame for zstd).</param>
    public static TocTree Build(Toc toc, long payloadEnd, TocLimits? limits = null)
    {
        limits ??= TocLimits.Default;
        var entries = toc.Entries;
        if (entries.Count > limits.MaxEntries) throw new TocValidationException($"TOC has more than {limits.MaxEntries} entries");
        var rootEntry = new TocEntry { Name = "", Type = TocEntryType.Dir, Mode = 0x1ed /*0755*/ };
        var root = new TocNode(rootEntry, "", null);
        var byPath = new Dictionary<string, TocNode>(StringComparer.Ordinal);
        var order = new List<TocNode>();
        var links = new List<(string, string)>();
        var hardlinkNodes = new List<TocNode>();
        var chunkLists = new Dictionary<TocNode, List<TocEntry>>();
        TocNode? lastReg = null;

        foreach (var e in entries)
        {
            if (e.Type == TocEntryType.Chunk)
            {
                if (lastReg is null) throw new TocValidationException("chunk entry without a preceding regular file", e.Name);
                if (!string.IsNullOrEmpty(e.Name) && CleanName(e.Name) != lastReg.Path)
                    throw new TocValidationException($"chunk entry does not follow its file ({lastReg.Path})", e.Name);
                chunkLists[lastReg].Add(e);
                continue;
            }
            lastReg = null;
            var path = CleanName(e.Name);
            if (System.Text.Encoding.UTF8.GetByteCount(path) > limits.MaxNameLength)
                throw new TocValidationException($"name longer than {limits.MaxNameLength}", e.Name);
            if (path.Length == 0)
            {
                if (e.Type != TocEntryType.Dir) throw new TocValidationException("the root must be a directory", e.Name);
                root.Entry = e;
                continue;
            }
            if (e.Mode < 0 || e.Mode > 0xFFFFFFFFL) throw new TocValidationException($"mode {e.Mode} out of range", e.Name);
            if (e.Type == TocEntryType.Reg && (e.Size < 0 || e.Size > limits.MaxFileSize))
                throw new TocValidationException($"size {e.Size} out of range", e.Name);
            if (byPath.TryGetValue(path, out var old))
            {
                // A later entry of the same name replaces the earlier one, as when extracting a tar.
                if (old.IsDirectory && e.Type == TocEntryType.Dir)
                {
                    old.Entry = e;
                    continue;
                }
                old.Replaced = true;
                chunkLists.Remove(old);
            }
            var node = new TocNode(e, path, null);
            byPath[path] = node;
            order.Add(node);
            if (e.Type == TocEntryType.Reg) { lastReg = node; chunkLists[node] = new List<TocEntry> { e }; }
            else if (e.Type == TocEntryType.Hardlink) hardlinkNodes.Add(node);
            else if (e.Type is TocEntryType.Symlink && string.IsNullOrEmpty(e.LinkName))
                throw new TocValidationException("symlink without a target", e.Name);
        }

        // Chunks, then blob ranges.
        var offsets = new List<long>();
        foreach (var (node, list) in chunkLists)
        {
            node.ChunkArray = BuildChunks(node, list, payloadEnd, limits);
            foreach (var c in node.ChunkArray) offsets.Add(c.BlobOffset);
        }
        offsets.Add(payloadEnd);
        offsets.Sort();
        foreach (var node in chunkLists.Keys)
        {
            var arr = node.ChunkArray;
            for (int i = 0; i < arr.Length; i++)
            {
                int idx = offsets.BinarySearch(arr[i].BlobOffset);
                while (idx < offsets.Count && offsets[idx] <= arr[i].BlobOffset) idx++;
                arr[i] = arr[i] with { BlobLength = offsets[idx] - arr[i].BlobOffset };
            }
        }

        // Parents (implicit directories get mode 0755 like the reference).
        var withImplicit = new List<TocNode>(order.Count);
        foreach (var node in order)
        {
            if (node.Replaced || node.Type == TocEntryType.Hardlink) continue;
            AttachToParent(node, root, byPath, withImplicit);
            withImplicit.Add(node);
        }

        // Hardlinks: resolve chains, reject cycles, missing targets and directories.
        foreach (var h in hardlinkNodes)
        {
            if (h.Replaced) continue;
            var target = ResolveHardlink(h, byPath, hardlinkNodes.Count);
            var parent = EnsureDir(ParentPath(h.Path), root, byPath, withImplicit, h.Path);
            parent.ChildMap![h.Name] = target;
            byPath[h.Path] = target;
            target.NumLink++;
            links.Add((h.Path, target.Path));
        }

        // Link counts: a file counts each name; a directory counts "." + its entry in the parent + subdirs.
        root.NumLink = 2;
        foreach (var n in withImplicit)
        {
            if (n.IsDirectory) { n.NumLink += 2; n.Parent!.NumLink++; }
            else n.NumLink++;
        }
        return new TocTree(root, byPath, withImplicit, links);
    }

    private static ChunkInfo[] BuildChunks(TocNode node, List<TocEntry> list, long payloadEnd, TocLimits limits)
    {
        var reg = node.Entry;
        long size = reg.Size;
        if (size == 0)
        {
            if (list.Count > 1) throw new TocValidationException("empty file has chunks", reg.Name);
            return Array.Empty<ChunkInfo>();
        }
        var arr = new ChunkInfo[list.Count];
        long expect = 0;
        for (int i = 0; i < list.Count; i++)
        {
            var c = list[i];
            long cs = c.ChunkSize == 0 ? size - c.ChunkOffset : c.ChunkSize;
            if (c.ChunkOffset != expect)
                throw new TocValidationException(c.ChunkOffset < expect
                    ? $"chunk at file offset {c.ChunkOffset} overlaps the previous chunk (ends at {expect})"
                    : $"gap before chunk at file offset {c.ChunkOffset} (previous ends at {expect})", reg.Name);
            if (cs <= 0 || cs > size - c.ChunkOffset) throw new TocValidationException($"chunk size {cs} at {c.ChunkOffset} out of range for file size {size}", reg.Name);
            if (cs > limits.MaxChunkSize) throw new TocValidationException($"chunk size {cs} exceeds the limit {limits.MaxChunkSize}", reg.Name);
            if (c.Offset < 0 || c.Offset >= payloadEnd) throw new TocValidationException($"chunk blob offset {c.Offset} outside the payload [0,{payloadEnd})", reg.Name);
            if (c.InnerOffset < 0 || c.InnerOffset > limits.MaxFileSize) throw new TocValidationException($"innerOffset {c.InnerOffset} out of range", reg.Name);
            var digest = c.ChunkDigest;
            if (digest is null && list.Count == 1) digest = reg.Digest;
            arr[i] = new ChunkInfo(c.ChunkOffset, cs, c.Offset, 0, c.InnerOffset, digest);
            expect = c.ChunkOffset + cs;
        }
        if (expect != size) throw new TocValidationException($"chunks cover {expect} bytes of a {size}-byte file", reg.Name);
        return arr;
    }

    private static string ParentPath(string path)
    {
        int slash = path.LastIndexOf('/');
        return slash < 0 ? "" : path[..slash];
    }

    private static void AttachToParent(TocNode node, TocNode root, Dictionary<string, TocNode> byPath, List<TocNode> created)
    {
        var parent = EnsureDir(ParentPath(node.Path), root, byPath, created, node.Path);
        node.Parent = parent;
        parent.ChildMap![node.Name] = node;
    }

    private static TocNode EnsureDir(string dir, TocNode root, Dictionary<string, TocNode> byPath, List<TocNode> created, string forName)
    {
        if (dir.Length == 0) return root;
        if (byPath.TryGetValue(dir, out var existing))
        {
            if (!existing.IsDirectory) throw new TocValidationException($"parent \"{dir}\" is not a directory", forName);
            if (existing.Parent is null) AttachToParent(existing, root, byPath, created);
            return existing;
        }
        // Create missing ancestors iteratively, outermost first.
        var missing = new Stack<string>();
        var d = dir;
        while (d.Length > 0 && !byPath.ContainsKey(d)) { missing.Push(d); d = ParentPath(d); }
        TocNode parent = d.Length == 0 ? root : byPath[d];
        if (!parent.IsDirectory) throw new TocValidationException($"parent \"{d}\" is not a directory", forName);
        if (parent != root && parent.Parent is null) AttachToParent(parent, root, byPath, created);
        while (missing.Count > 0)
        {
            var p = missing.Pop();
            var n = new TocNode(new TocEntry { Name = p, Type = TocEntryType.Dir, Mode = 0x1ed }, p, parent);
            byPath[p] = n;
            parent.ChildMap![n.Name] = n;
            created.Add(n);
            parent = n;
        }
        return parent;
    }

    private static TocNode ResolveHardlink(TocNode h, Dictionary<string, TocNode> byPath, int maxSteps)
    {
        var cur = h;
        for (int steps = 0; steps <= maxSteps; steps++)
        {
            if (string.IsNullOrEmpty(cur.Entry.LinkName)) throw new TocValidationException("hardlink without a target", h.Entry.Name);
            var tp = CleanName(cur.Entry.LinkName);
            if (!byPath.TryGetValue(tp, out var t))
                throw new TocValidationException($"hardlink target \"{cur.Entry.LinkName}\" not found", h.Entry.Name);
            if (t.Type != TocEntryType.Hardlink)
            {
                if (t.IsDirectory) throw new TocValidationException("hardlink to a directory", h.Entry.Name);
                return t;
            }
            cur = t;
        }
        throw new TocValidationException("cycle of hardlinks", h.Entry.Name);
    }
}
