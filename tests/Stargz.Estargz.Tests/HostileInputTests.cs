using System.Formats.Tar;
using System.IO.Compression;
using System.Text;

namespace Stargz.Estargz.Tests;

/// <summary>Truncated blobs, wrong footers and hostile TOCs get a clear exception, never a crash, a huge allocation or
/// a path outside the layer.</summary>
public class HostileInputTests
{
    private static async Task<(byte[] Blob, BuildResult R)> SampleAsync()
    {
        var model = new List<ModelEntry>
        {
            new() { Path = "a", Type = TarEntryType.Directory },
            new() { Path = "a/f", Type = TarEntryType.RegularFile, Content = Encoding.ASCII.GetBytes(new string('x', 20000)) },
            new() { Path = "a/g", Type = TarEntryType.RegularFile, Content = "hello"u8.ToArray() },
        };
        return await Blobs.BuildAsync(TreeModel.ToTar(model), new BuildOptions { ChunkSize = 8000 });
    }

    private static byte[] Json(string s) => Encoding.UTF8.GetBytes(s);

    private static async Task<T> OpenFails<T>(byte[] blob, EstargzReaderOptions? o = null) where T : Exception
        => await Assert.ThrowsAnyAsync<T>(() => Blobs.OpenAsync(blob, null, o));

    [Fact]
    public async Task TruncatedBlob_AtEveryTailLength_IsAFormatError()
    {
        var (blob, _) = await SampleAsync();
        for (int cut = 1; cut < 200; cut++)
            await OpenFails<EstargzFormatException>(blob[..^cut]);
        await OpenFails<EstargzFormatException>(blob[..10]);
        await OpenFails<EstargzFormatException>([]);
    }

    [Fact]
    public async Task WrongFooter_IsAFormatError()
    {
        var (blob, _) = await SampleAsync();
        foreach (int pos in new[] { 0, 3, 12, 13, 16, 30, 33, 37, 50 })
        {
            var b = (byte[])blob.Clone();
            b[b.Length - Footer.Size + pos] ^= 0x5a;
            var e = await OpenFails<EstargzFormatException>(b);
            Assert.False(string.IsNullOrEmpty(e.Message));
        }
        // A footer pointing past the blob, or into the middle of a chunk.
        var far = (byte[])blob.Clone();
        Footer.BuildGzip(blob.Length * 4L).CopyTo(far.AsSpan(far.Length - Footer.Size));
        await OpenFails<EstargzFormatException>(far);
        var mid = (byte[])blob.Clone();
        Footer.BuildGzip(100).CopyTo(mid.AsSpan(mid.Length - Footer.Size));
        await OpenFails<EstargzFormatException>(mid);
        // Not eStargz at all: a plain tar.gz.
        var plain = new MemoryStream();
        using (var gz = new GZipStream(plain, CompressionLevel.Fastest, true)) gz.Write(new byte[4096]);
        var ex = await OpenFails<EstargzFormatException>(plain.ToArray());
        Assert.Contains("footer", ex.Message);
    }

    [Fact]
    public async Task WrongTocDigest_IsADigestMismatch()
    {
        var (blob, r) = await SampleAsync();
        var e = await Assert.ThrowsAsync<DigestMismatchException>(() => Blobs.OpenAsync(blob, "sha256:" + new string('0', 64)));
        Assert.Contains(r.TocDigest, e.Message);
    }

    [Theory]
    [InlineData("not json")]
    [InlineData("{\"version\":1,\"entries\":[{\"name\":\"a\"")]
    [InlineData("{\"version\":1,\"entries\":{}}")]
    [InlineData("{\"version\":\"x\"}")]
    [InlineData("{\"version\":1,\"entries\":[{\"name\":\"a\",\"type\":\"weird\"}]}")]
    [InlineData("{\"version\":1,\"entries\":[{\"name\":\"a\",\"type\":\"reg\",\"size\":1.5}]}")]
    [InlineData("{\"version\":1,\"entries\":[{\"name\":\"a\",\"type\":\"reg\",\"size\":99999999999999999999999}]}")]
    [InlineData("{\"version\":1,\"entries\":[{\"name\":\"a\",\"type\":\"dir\",\"xattrs\":{\"user.x\":\"!!notbase64\"}}]}")]
    [InlineData("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[")]
    public async Task MalformedTocJson_IsAFormatError(string json)
    {
        await OpenFails<EstargzFormatException>(Blobs.WithToc(new byte[100], Json(json)));
        Assert.ThrowsAny<EstargzFormatException>(() => Toc.Parse(Json(json)));
    }

    [Fact]
    public async Task TocInAWronglyNamedTarEntry_IsRejected()
    {
        var e = await OpenFails<EstargzFormatException>(Blobs.WithToc(new byte[10], Json("{\"version\":1,\"entries\":[]}"), "evil.json"));
        Assert.Contains("stargz.index.json", e.Message);
    }

    public static TheoryData<string, string> HostileTocs() => new()
    {
        { "huge size", """{"version":1,"entries":[{"name":"f","type":"reg","size":9223372036854775807,"offset":10}]}""" },
        { "negative size", """{"version":1,"entries":[{"name":"f","type":"reg","size":-5,"offset":10}]}""" },
        { "negative offset", """{"version":1,"entries":[{"name":"f","type":"reg","size":5,"offset":-10}]}""" },
        { "offset past payload", """{"version":1,"entries":[{"name":"f","type":"reg","size":5,"offset":999999}]}""" },
        { "overlapping chunks", """{"version":1,"entries":[{"name":"f","type":"reg","size":10,"offset":10,"chunkSize":6},{"name":"f","type":"chunk","offset":20,"chunkOffset":4,"chunkSize":6}]}""" },
        { "gap between chunks", """{"version":1,"entries":[{"name":"f","type":"reg","size":10,"offset":10,"chunkSize":3},{"name":"f","type":"chunk","offset":20,"chunkOffset":5}]}""" },
        { "chunk past the file end", """{"version":1,"entries":[{"name":"f","type":"reg","size":10,"offset":10,"chunkSize":4},{"name":"f","type":"chunk","offset":20,"chunkOffset":4,"chunkSize":100}]}""" },
        { "huge chunk", """{"version":1,"entries":[{"name":"f","type":"reg","size":68719476736,"offset":10}]}""" },
        { "orphan chunk", """{"version":1,"entries":[{"name":"f","type":"chunk","offset":10,"chunkOffset":0,"chunkSize":4}]}""" },
        { "dot-dot name", """{"version":1,"entries":[{"name":"a/../../etc/passwd","type":"reg"}]}""" },
        { "dot-dot only", """{"version":1,"entries":[{"name":"..","type":"dir"}]}""" },
        { "absolute name", """{"version":1,"entries":[{"name":"/etc/passwd","type":"reg"}]}""" },
        { "NUL in name", """{"version":1,"entries":[{"name":"a\u0000b","type":"reg"}]}""" },
        { "hardlink cycle", """{"version":1,"entries":[{"name":"a","type":"hardlink","linkName":"b"},{"name":"b","type":"hardlink","linkName":"a"}]}""" },
        { "hardlink self", """{"version":1,"entries":[{"name":"a","type":"hardlink","linkName":"a"}]}""" },
        { "hardlink to nothing", """{"version":1,"entries":[{"name":"a","type":"hardlink","linkName":"zzz"}]}""" },
        { "hardlink to dir", """{"version":1,"entries":[{"name":"d","type":"dir"},{"name":"a","type":"hardlink","linkName":"d"}]}""" },
        { "file used as dir", """{"version":1,"entries":[{"name":"a","type":"symlink","linkName":"/etc"},{"name":"a/passwd","type":"reg"}]}""" },
        { "root is a file", """{"version":1,"entries":[{"name":"./","type":"reg"}]}""" },
        { "entry without type", """{"version":1,"entries":[{"name":"a"}]}""" },
        { "long name", "{\"version\":1,\"entries\":[{\"name\":\"" + string.Join("/", Enumerable.Repeat(new string('n', 200), 30)) + "\",\"type\":\"dir\"}]}" },
        { "long component", "{\"version\":1,\"entries\":[{\"name\":\"" + new string('n', 300) + "\",\"type\":\"dir\"}]}" },
    };

    [Fact]
    public void ACleanNameIsKeptAsItIsAndADecoratedOneIsCleanedOrRefused()
    {
        var clean = "usr/lib/python3.11/json/__init__.py";
        Assert.Same(clean, TocTree.CleanName(clean));
        Assert.Equal("usr/lib", TocTree.CleanName("usr/lib/"));
        Assert.Equal("a/b", TocTree.CleanName("./a//b/"));
        Assert.Equal("a/b", TocTree.CleanName("a/./b"));
        Assert.Equal("a.b/..c/.d", TocTree.CleanName("a.b/..c/.d"));
        Assert.Equal("", TocTree.CleanName("./"));
        Assert.Equal("", TocTree.CleanName("/"));
        Assert.Equal("", TocTree.CleanName(""));
        Assert.Throws<TocValidationException>(() => TocTree.CleanName("a/../b"));
        Assert.Throws<TocValidationException>(() => TocTree.CleanName("a/../"));
        Assert.Throws<TocValidationException>(() => TocTree.CleanName("a/b\0"));
        Assert.Throws<TocValidationException>(() => TocTree.CleanName(new string('n', 256)));
        Assert.Equal(new string('n', 255), TocTree.CleanName(new string('n', 255)));
    }

    [Fact]
    public void TimesOwnersAndDigestsAreReadAsWrittenAndAWrongTypeIsRefused()
    {
        var toc = Toc.Parse(Encoding.UTF8.GetBytes("""
            {"version":1,"entries":[
              {"name":"a","type":"reg","modtime":"2024-03-01T10:20:30Z","userName":"root","groupName":""},
              {"name":"b","type":"reg","modtime":"not a time","userName":"alice","groupName":"sta\u0066f"},
              {"name":"c","type":"reg","modtime":"2024-03-01T12:20:30+02:00","userName":null},
              {"name":"d","type":"reg","digest":"sha256:aa","chunkDigest":"sha256:aa"},
              {"name":"e","type":"reg","digest":"sha256:aa","chunkDigest":"sha256:bb"}]}
            """));
        Assert.Equal(new DateTimeOffset(2024, 3, 1, 10, 20, 30, TimeSpan.Zero), toc.Entries[0].ModTime);
        Assert.Equal(("root", ""), (toc.Entries[0].UserName, toc.Entries[0].GroupName));
        Assert.Null(toc.Entries[1].ModTime);
        Assert.Equal(("alice", "staff"), (toc.Entries[1].UserName, toc.Entries[1].GroupName));
        Assert.Equal(new DateTimeOffset(2024, 3, 1, 10, 20, 30, TimeSpan.Zero), toc.Entries[2].ModTime);
        Assert.Null(toc.Entries[2].UserName);
        Assert.Same(toc.Entries[3].Digest, toc.Entries[3].ChunkDigest); // one chunk: one string
        Assert.Equal(("sha256:aa", "sha256:bb"), (toc.Entries[4].Digest, toc.Entries[4].ChunkDigest));
        Assert.Throws<TocValidationException>(() => Toc.Parse("""{"version":1,"entries":[{"name":"a","type":"reg","modtime":5}]}"""u8));
        Assert.Throws<TocValidationException>(() => Toc.Parse("""{"version":1,"entries":[{"name":"a","type":"reg","userName":5}]}"""u8));
    }

    [Theory]
    [MemberData(nameof(HostileTocs))]
    public async Task HostileToc_IsRejectedWithTheEntryName(string what, string json)
    {
        var e = await OpenFails<TocValidationException>(Blobs.WithToc(new byte[100], Json(json)));
        Assert.False(string.IsNullOrEmpty(e.Message), what);
        if (!what.StartsWith("long", StringComparison.Ordinal) && what != "orphan chunk")
            Assert.False(string.IsNullOrEmpty(e.EntryName), $"{what}: {e.Message}");
    }

    [Fact]
    public async Task TenMillionEntries_AreRejectedByTheEntryLimit_WithoutBuildingThem()
    {
        // ~30 MB of JSON, compressed to a few hundred KB: the limit trips while parsing.
        var sb = new MemoryStream();
        sb.Write("{\"version\":1,\"entries\":["u8);
        var one = "{\"type\":\"dir\"},"u8.ToArray();
        for (int i = 0; i < 10_000_000 - 1; i++) sb.Write(one);
        sb.Write("{\"type\":\"dir\"}]}"u8);
        var e = await OpenFails<TocValidationException>(Blobs.WithToc(new byte[10], sb.ToArray()));
        Assert.Contains("entries", e.Message);
    }

    [Fact]
    public async Task OversizedToc_IsRejectedBeforeDecompressingItAll()
    {
        var limits = new TocLimits { MaxTocJsonBytes = 1 << 20 };
        var json = Json("{\"version\":1,\"entries\":[],\"pad\":\"" + new string(' ', 2 << 20) + "\"}");
        await OpenFails<TocValidationException>(Blobs.WithToc(new byte[10], json), new EstargzReaderOptions { Limits = limits });
        var small = new TocLimits { MaxTocCompressedBytes = 100 };
        await OpenFails<TocValidationException>(Blobs.WithToc(new byte[10], json), new EstargzReaderOptions { Limits = small });
    }

    [Fact]
    public async Task ChunkOffsetPointingIntoGarbage_FailsOnRead_NotWithWrongData()
    {
        var json = Json("""{"version":1,"entries":[{"name":"f","type":"reg","size":5,"offset":3,"digest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","chunkDigest":"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]}""");
        var reader = await Blobs.OpenAsync(Blobs.WithToc(new byte[100], json));
        var f = reader.Lookup("f")!;
        await Assert.ThrowsAnyAsync<EstargzFormatException>(async () => await reader.ReadFileAsync(f, 0, new byte[5], TestContext.Current.CancellationToken));
    }

    [Fact]
    public async Task MissingChunkDigest_FailsVerifiedReads_UnlessAllowed()
    {
        // A real member holding "hello", described without digests.
        var payload = new MemoryStream();
        payload.Write(new byte[512]);
        long off = payload.Length;
        using (var gz = new GZipStream(payload, CompressionLevel.Optimal, true)) gz.Write("hello"u8);
        var json = Json($$"""{"version":1,"entries":[{"name":"f","type":"reg","size":5,"offset":{{off}}}]}""");
        var blob = Blobs.WithToc(payload.ToArray(), json);
        var strict = await Blobs.OpenAsync(blob);
        await Assert.ThrowsAsync<TocValidationException>(async () => await strict.ReadFileAsync(strict.Lookup("f")!, 0, new byte[5], TestContext.Current.CancellationToken));
        var lax = await Blobs.OpenAsync(blob, null, new EstargzReaderOptions { AllowMissingChunkDigests = true });
        var buf = new byte[5];
        Assert.Equal(5, await lax.ReadFileAsync(lax.Lookup("f")!, 0, buf, TestContext.Current.CancellationToken));
        Assert.Equal("hello"u8.ToArray(), buf);
    }

    [Fact]
    public async Task BuilderRejects_TarWithEscapingNames()
    {
        var ms = new MemoryStream();
        using (var w = new TarWriter(ms, TarEntryFormat.Pax, true))
            w.WriteEntry(new PaxTarEntry(TarEntryType.RegularFile, "../../evil") { DataStream = new MemoryStream("x"u8.ToArray()) });
        await Assert.ThrowsAsync<TocValidationException>(() => Blobs.BuildAsync(ms.ToArray()));
        await Assert.ThrowsAnyAsync<EstargzFormatException>(() => Blobs.BuildAsync(Encoding.ASCII.GetBytes(new string('z', 1500))));
    }

    [Fact]
    public async Task BuilderRejects_BrokenTarInput_WithAFormatError()
    {
        var good = TreeModel.ToTar([new ModelEntry { Path = "f", Type = TarEntryType.RegularFile, Content = new byte[3000] }]);
        // The file's data runs past the end of the input.
        var cut = good[..2000];
        var e1 = await Assert.ThrowsAnyAsync<EstargzFormatException>(() => Blobs.BuildAsync(cut));
        Assert.Contains("past the end", e1.Message);
        // A header whose checksum does not match.
        var bad = (byte[])good.Clone();
        int hdr = FindUstar(bad);
        bad[hdr + 10] ^= 0x20;
        Assert.Contains("checksum", (await Assert.ThrowsAnyAsync<EstargzFormatException>(() => Blobs.BuildAsync(bad))).Message);
        // A malformed PAX record (length field lies).
        var pax = (byte[])good.Clone();
        int rec = pax.AsSpan(512).IndexOf("mtime="u8) + 512;
        Assert.True(rec > 512);
        pax[rec - 2] = (byte)'9';
        FixChecksum(pax, 0);
        await Assert.ThrowsAnyAsync<EstargzFormatException>(() => Blobs.BuildAsync(pax));
        // An entry type eStargz cannot carry (sparse 'S').
        var sparse = (byte[])good.Clone();
        sparse[hdr + 156] = (byte)'S';
        FixChecksum(sparse, hdr);
        Assert.Contains("unsupported", (await Assert.ThrowsAnyAsync<EstargzFormatException>(() => Blobs.BuildAsync(sparse))).Message);
    }

    private static int FindUstar(byte[] tar)
    {
        for (int off = 0; off < tar.Length; off += 512)
            if (tar[off + 156] == (byte)'0') return off;
        throw new InvalidOperationException("no regular file header");
    }

    private static void FixChecksum(byte[] tar, int off)
    {
        var h = tar.AsSpan(off, 512);
        h.Slice(148, 8).Fill((byte)' ');
        int sum = 0;
        foreach (var b in h) sum += b;
        Encoding.ASCII.GetBytes(Convert.ToString(sum, 8).PadLeft(6, '0') + "\0 ", h.Slice(148, 8));
    }

    [Fact]
    public async Task Extract_NeverWritesOutsideTheTarget()
    {
        // A symlink pointing outside, followed by a file "through" it, is refused by the tree before any write.
        var json = Json("""{"version":1,"entries":[{"name":"link","type":"symlink","linkName":"/tmp"},{"name":"link/x","type":"reg"}]}""");
        await OpenFails<TocValidationException>(Blobs.WithToc(new byte[10], json));
        // A plain escaping symlink is written as a symlink, nothing is followed.
        var ok = Json("""{"version":1,"entries":[{"name":"link","type":"symlink","linkName":"../../../../etc"},{"name":"d/f","type":"reg"}]}""");
        var reader = await Blobs.OpenAsync(Blobs.WithToc(new byte[10], ok));
        using var dir = new Stargz.TestSupport.TempDir("estargz-extract");
        var target = Path.Combine(dir.Path, "out");
        await EstargzExtractor.ExtractAsync(reader, target, new ExtractOptions { SetOwners = false }, TestContext.Current.CancellationToken);
        Assert.Equal("../../../../etc", new FileInfo(Path.Combine(target, "link")).LinkTarget);
        Assert.True(File.Exists(Path.Combine(target, "d", "f")));
        Assert.Equal(["d", "link"], Directory.EnumerateFileSystemEntries(target).Select(Path.GetFileName).Order());
    }
}
