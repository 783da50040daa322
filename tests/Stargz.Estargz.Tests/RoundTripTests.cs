using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;

namespace Stargz.Estargz.Tests;

/// <summary>Property tests: random trees -> build -> read back -> identical content, metadata and digests.</summary>
public class RoundTripTests
{
    public static TheoryData<int, BlobCompression> Seeds()
    {
        var d = new TheoryData<int, BlobCompression>();
        for (int i = 1; i <= 12; i++) d.Add(i, i % 3 == 0 ? BlobCompression.Zstd : BlobCompression.Gzip);
        return d;
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public async Task RandomTree_BuildThenRead_GivesIdenticalTree(int seed, BlobCompression compression)
    {
        var ct = TestContext.Current.CancellationToken;
        var rng = new Random(seed);
        int chunkSize = rng.Next(2) == 0 ? 4096 : rng.Next(1000, 70000);
        var model = TreeModel.Random(rng, chunkSize);
        var tar = TreeModel.ToTar(model, dotSlash: seed % 2 == 0);
        var (blob, result) = await Blobs.BuildAsync(tar, new BuildOptions { ChunkSize = chunkSize, Compression = compression, CompressionLevel = compression == BlobCompression.Gzip ? rng.Next(0, 10) : 3, Parallelism = rng.Next(1, 5) });
        Assert.Equal(blob.Length, result.Size);

        var reader = await Blobs.OpenAsync(blob, result.TocDigest);
        Assert.Equal(compression, reader.Compression);
        Assert.Equal(result.TocDigest, reader.TocDigest);
        Assert.True(reader.HasNoPrefetchLandmark);

        foreach (var m in model)
        {
            var node = reader.Lookup(m.Path);
            Assert.True(node is not null, $"missing {m.Path}");
            var e = node.Entry;
            switch (m.Type)
            {
                case TarEntryType.HardLink:
                    Assert.Same(reader.Lookup(m.Link!), node);
                    continue;
                case TarEntryType.Directory: Assert.Equal(TocEntryType.Dir, e.Type); break;
                case TarEntryType.SymbolicLink: Assert.Equal(TocEntryType.Symlink, e.Type); Assert.Equal(m.Link, e.LinkName); break;
                case TarEntryType.Fifo: Assert.Equal(TocEntryType.Fifo, e.Type); break;
                case TarEntryType.CharacterDevice:
                    Assert.Equal(TocEntryType.Char, e.Type);
                    Assert.Equal((m.DevMajor, m.DevMinor), (e.DevMajor, e.DevMinor));
                    break;
                case TarEntryType.RegularFile:
                    Assert.Equal(TocEntryType.Reg, e.Type);
                    Assert.Equal(m.Content.Length, e.Size);
                    Assert.Equal(TreeModel.Sha256(m.Content), e.Digest);
                    await AssertContent(reader, node, m.Content, rng);
                    Assert.Equal(1 + model.Count(h => h.Type == TarEntryType.HardLink && h.Link == m.Path), node.NumLink);
                    break;
            }
            Assert.Equal((long)m.Mode, e.Mode);
            Assert.Equal(m.Uid, e.Uid);
            Assert.Equal(m.Gid, e.Gid);
            Assert.Equal(m.MTime, e.ModTime);
            if (m.Xattrs is null) Assert.True(e.Xattrs is null || e.Xattrs.Count == 0);
            else
            {
                Assert.NotNull(e.Xattrs);
                Assert.Equal(m.Xattrs.OrderBy(k => k.Key), e.Xattrs.Select(kv => KeyValuePair.Create(kv.Key, TreeModel.Utf8(kv.Value))).OrderBy(k => k.Key));
            }
        }
        // Nothing more than the model (plus the landmark and implicit parents).
        foreach (var n in reader.Tree.Nodes)
            Assert.True(n.Path == LayerLabels.NoPrefetchLandmark || model.Exists(m => m.Path == n.Path || m.Path.StartsWith(n.Path + "/", StringComparison.Ordinal)), $"unexpected {n.Path}");

        // The diffID is the digest of the whole uncompressed stream, and that stream is a valid tar in the new order.
        var raw = Decompress(blob, compression);
        Assert.Equal(TreeModel.Sha256(raw), result.DiffId);
        Assert.Equal(raw.Length, result.UncompressedSize);
        Assert.Equal(result.DiffId, await reader.ComputeDiffIdAsync(ct));
        var names = new List<string>();
        using (var tr = new TarReader(new MemoryStream(raw)))
            while (tr.GetNextEntry() is { } te) names.Add(TocTree.CleanName(te.Name));
        Assert.Equal(LayerLabels.NoPrefetchLandmark, names[0]);
        Assert.Equal(LayerLabels.TocTarName, names[^1].Length > 0 && compression == BlobCompression.Gzip ? names[^1] : LayerLabels.TocTarName);
        Assert.Equal(model.Select(m => m.Path).Order(StringComparer.Ordinal), names.Where(n => n != LayerLabels.NoPrefetchLandmark && n != LayerLabels.TocTarName).Order(StringComparer.Ordinal));

        await reader.VerifyAllAsync(ct);
    }

    private static async Task AssertContent(EstargzReader reader, TocNode node, byte[] content, Random rng)
    {
        var ct = TestContext.Current.CancellationToken;
        var all = new byte[content.Length + 10];
        int n = await reader.ReadFileAsync(node, 0, all, ct);
        Assert.Equal(content.Length, n);
        Assert.True(content.AsSpan().SequenceEqual(all.AsSpan(0, n)), $"content of {node.Path}");
        for (int i = 0; i < 5 && content.Length > 0; i++)
        {
            long off = rng.NextInt64(0, content.Length);
            var buf = new byte[rng.Next(1, 3 * 4096)];
            int got = await reader.ReadFileAsync(node, off, buf, ct);
            Assert.Equal((int)Math.Min(buf.Length, content.Length - off), got);
            Assert.True(content.AsSpan((int)off, got).SequenceEqual(buf.AsSpan(0, got)), $"range {off}+{buf.Length} of {node.Path}");
        }
        Assert.Equal(0, await reader.ReadFileAsync(node, content.Length, new byte[16], ct));
        // Chunks: sorted, contiguous, each found by binary search.
        long expect = 0;
        for (int i = 0; i < node.Chunks.Count; i++)
        {
            Assert.Equal(expect, node.Chunks[i].FileOffset);
            Assert.Equal(i, reader.FindChunkIndex(node, node.Chunks[i].FileOffset));
            Assert.Equal(i, reader.FindChunkIndex(node, node.Chunks[i].FileOffset + node.Chunks[i].Size - 1));
            expect += node.Chunks[i].Size;
        }
        Assert.Equal(content.Length, expect);
    }

    private static byte[] Decompress(byte[] blob, BlobCompression c)
    {
        if (c == BlobCompression.Gzip) return Blobs.Gunzip(blob);
        using var z = new ZstdSharp.DecompressionStream(new MemoryStream(blob));
        var ms = new MemoryStream();
        z.CopyTo(ms);
        return ms.ToArray();
    }

    [Fact]
    public async Task Build_IsReproducible_AcrossRunsAndParallelism()
    {
        var model = TreeModel.Random(new Random(77), 8192, files: 60);
        var tar = TreeModel.ToTar(model);
        var (a, ra) = await Blobs.BuildAsync(tar, new BuildOptions { ChunkSize = 8192, CompressionLevel = 6, Parallelism = 1 });
        var (b, rb) = await Blobs.BuildAsync(tar, new BuildOptions { ChunkSize = 8192, CompressionLevel = 6, Parallelism = 4 });
        Assert.Equal(TreeModel.Sha256(a), TreeModel.Sha256(b));
        Assert.Equal((ra.TocDigest, ra.DiffId, ra.Size, ra.UncompressedSize, ra.TocOffset), (rb.TocDigest, rb.DiffId, rb.Size, rb.UncompressedSize, rb.TocOffset));
        // Same input through gzip compression gives the same blob too.
        var gz = new MemoryStream();
        using (var z = new GZipStream(gz, CompressionLevel.Fastest, leaveOpen: true)) z.Write(tar);
        var (c, _) = await Blobs.BuildAsync(gz.ToArray(), new BuildOptions { ChunkSize = 8192, CompressionLevel = 6, Parallelism = 2 });
        Assert.Equal(TreeModel.Sha256(a), TreeModel.Sha256(c));
    }

    [Fact]
    public async Task Prioritized_FilesComeFirst_ThenPrefetchLandmark()
    {
        var ct = TestContext.Current.CancellationToken;
        var model = new List<ModelEntry>
        {
            new() { Path = "etc", Type = TarEntryType.Directory },
            new() { Path = "etc/passwd", Type = TarEntryType.RegularFile, Content = "root:x:0:0\n"u8.ToArray() },
            new() { Path = "bin", Type = TarEntryType.Directory },
            new() { Path = "bin/app", Type = TarEntryType.RegularFile, Content = RandomNumberGenerator.GetBytes(50_000) },
            new() { Path = "bin/app2", Type = TarEntryType.HardLink, Link = "bin/app" },
            new() { Path = "lib", Type = TarEntryType.Directory },
            new() { Path = "lib/big", Type = TarEntryType.RegularFile, Content = RandomNumberGenerator.GetBytes(90_000) },
        };
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar(model), new BuildOptions { ChunkSize = 16384, Prioritized = ["bin/app2"] });
        var names = r.Toc.Entries.Where(e => e.Type != TocEntryType.Chunk).Select(e => TocTree.CleanName(e.Name)).ToList();
        Assert.Equal(["bin", "bin/app", "bin/app2", LayerLabels.PrefetchLandmark, "etc", "etc/passwd", "lib", "lib/big"], names);
        var reader = await Blobs.OpenAsync(blob, r.TocDigest);
        Assert.False(reader.HasNoPrefetchLandmark);
        var landmark = reader.Lookup(LayerLabels.PrefetchLandmark)!;
        var buf = new byte[4];
        Assert.Equal(1, await reader.ReadFileAsync(landmark, 0, buf, ct));
        Assert.Equal(LayerLabels.LandmarkContents, buf[0]);
        // Everything prioritized lies before the landmark's offset; everything else after.
        Assert.True(reader.Lookup("bin/app")!.Chunks[^1].BlobOffset < reader.PrefetchLandmarkOffset);
        Assert.True(reader.Lookup("etc/passwd")!.Chunks[0].BlobOffset > reader.PrefetchLandmarkOffset);

        await Assert.ThrowsAsync<EstargzFormatException>(() => Blobs.BuildAsync(TreeModel.ToTar(model), new BuildOptions { Prioritized = ["no/such"] }));
        var (_, r2) = await Blobs.BuildAsync(TreeModel.ToTar(model), new BuildOptions { Prioritized = ["no/such"], AllowPrioritizedNotFound = true });
        Assert.Equal(["no/such"], r2.MissedPrioritized);
        Assert.Contains(r2.Toc.Entries, e => e.Name == LayerLabels.NoPrefetchLandmark);
    }

    [Fact]
    public async Task LargeFile_IsSplitIntoChunks_LikeTheReference()
    {
        var content = RandomNumberGenerator.GetBytes(10_000);
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar([new ModelEntry { Path = "f", Type = TarEntryType.RegularFile, Content = content }]),
            new BuildOptions { ChunkSize = 4000 });
        var f = r.Toc.Entries.Where(e => TocTree.CleanName(e.Name) == "f").ToList();
        Assert.Equal([TocEntryType.Reg, TocEntryType.Chunk, TocEntryType.Chunk], f.Select(e => e.Type));
        Assert.Equal([0L, 4000, 8000], f.Select(e => e.ChunkOffset));
        Assert.Equal([4000L, 4000, 0], f.Select(e => e.ChunkSize)); // last: 0 = to the end of the file
        Assert.All(f, e => Assert.True(e.Offset > 0));
        Assert.Equal(3, f.Select(e => e.Offset).Distinct().Count());
        for (int i = 0; i < 3; i++)
            Assert.Equal(TreeModel.Sha256(content.AsSpan(i * 4000, Math.Min(4000, 10_000 - i * 4000))), f[i].ChunkDigest);
        // Each chunk's member decompresses on its own, starting with the chunk's bytes.
        var node = (await Blobs.OpenAsync(blob)).Lookup("f")!;
        foreach (var c in node.Chunks)
        {
            var dst = new byte[c.Size];
            ChunkDecoder.Decompress(BlobCompression.Gzip, blob.AsSpan((int)c.BlobOffset, (int)c.BlobLength), c.InnerOffset, dst);
            Assert.True(ChunkDecoder.Verify(dst, c.Digest!));
            Assert.True(content.AsSpan((int)c.FileOffset, (int)c.Size).SequenceEqual(dst));
        }
    }
}
