using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;
using System.Text;

namespace Stargz.Estargz.Tests;

/// <summary>Random access fetches only the touched chunk's member, never the blob from its start.</summary>
public class RandomAccessTests
{
    private sealed class RecordingSource(byte[] data) : IBlobSource
    {
        public readonly List<(long Offset, int Length)> Reads = new();
        private readonly ByteArrayBlobSource _inner = new(data);
        public long Size => _inner.Size;
        public ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct)
        {
            lock (Reads) Reads.Add((offset, destination.Length));
            return _inner.ReadAtAsync(offset, destination, ct);
        }
    }

    [Fact]
    public async Task ReadInTheMiddleOfABigFile_FetchesOnlyThatChunk()
    {
        var ct = TestContext.Current.CancellationToken;
        var content = RandomNumberGenerator.GetBytes(1_000_000);
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar([
            new ModelEntry { Path = "first", Type = TarEntryType.RegularFile, Content = RandomNumberGenerator.GetBytes(300_000) },
            new ModelEntry { Path = "big", Type = TarEntryType.RegularFile, Content = content }]), new BuildOptions { ChunkSize = 65536 });
        var src = new RecordingSource(blob);
        var reader = await EstargzReader.OpenAsync(src, r.TocDigest, null, ct);
        src.Reads.Clear();
        var big = reader.Lookup("big")!;
        var buf = new byte[4096];
        Assert.Equal(4096, await reader.ReadFileAsync(big, 700_000, buf, ct));
        Assert.True(content.AsSpan(700_000, 4096).SequenceEqual(buf));
        var c = big.Chunks[reader.FindChunkIndex(big, 700_000)];
        Assert.Equal([(c.BlobOffset, (int)c.BlobLength)], src.Reads);
        Assert.True(c.BlobLength < 70_000);

        // A read across a chunk boundary fetches exactly the two chunks.
        src.Reads.Clear();
        var across = new byte[8192];
        Assert.Equal(8192, await reader.ReadFileAsync(big, 65536 * 3 - 4096, across, ct));
        Assert.True(content.AsSpan(65536 * 3 - 4096, 8192).SequenceEqual(across));
        Assert.Equal([big.Chunks[2].BlobOffset, big.Chunks[3].BlobOffset], src.Reads.Select(x => x.Offset));
    }

    [Fact]
    public async Task SeveralFilesInOneMember_AreReadThroughInnerOffset()
    {
        // Newer reference builders pack small files into one member and address them with innerOffset.
        var ct = TestContext.Current.CancellationToken;
        var payload = new MemoryStream();
        payload.Write(new byte[1024]);
        long member = payload.Length;
        using (var gz = new GZipStream(payload, CompressionLevel.Optimal, true)) gz.Write("helloworld!"u8);
        string D(string s) => TreeModel.Sha256(Encoding.ASCII.GetBytes(s));
        var json = $$"""
            {"version":1,"entries":[
             {"name":"a","type":"reg","size":5,"offset":{{member}},"digest":"{{D("hello")}}","chunkDigest":"{{D("hello")}}"},
             {"name":"b","type":"reg","size":6,"offset":{{member}},"innerOffset":5,"digest":"{{D("world!")}}","chunkDigest":"{{D("world!")}}"}]}
            """;
        var reader = await Blobs.OpenAsync(Blobs.WithToc(payload.ToArray(), Encoding.UTF8.GetBytes(json)));
        var b = reader.Lookup("b")!;
        Assert.Equal(reader.Lookup("a")!.Chunks[0].BlobLength, b.Chunks[0].BlobLength);
        var buf = new byte[6];
        Assert.Equal(6, await reader.ReadFileAsync(b, 0, buf, ct));
        Assert.Equal("world!", Encoding.ASCII.GetString(buf));
        Assert.Equal(3, await reader.ReadFileAsync(b, 3, buf, ct));
        Assert.Equal("ld!", Encoding.ASCII.GetString(buf, 0, 3));
        await reader.VerifyAllAsync(ct);
    }

    [Fact]
    public async Task FromToc_ReadsLikeOpen()
    {
        var ct = TestContext.Current.CancellationToken;
        var content = RandomNumberGenerator.GetBytes(50_000);
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar([new ModelEntry { Path = "x/y", Type = TarEntryType.RegularFile, Content = content }]),
            new BuildOptions { ChunkSize = 10_000, Compression = BlobCompression.Zstd });
        var src = new ByteArrayBlobSource(blob);
        var footer = await EstargzReader.ReadFooterAsync(src, ct);
        var tocBytes = blob.AsSpan((int)footer.TocOffset, (int)footer.TocLength);
        var json = EstargzReader.DecodeToc(tocBytes, footer.Compression);
        Assert.Equal(r.TocDigest, TreeModel.Sha256(json));
        var reader = EstargzReader.FromToc(Toc.Parse(json), footer.TocOffset, footer.Compression, src, r.TocDigest);
        var buf = new byte[content.Length];
        Assert.Equal(content.Length, await reader.ReadFileAsync(reader.Lookup("/x/y")!, 0, buf, ct));
        Assert.Equal(content, buf);
        Assert.Same(reader.Root, reader.Lookup("x")!.Parent);
        Assert.Same(reader.Lookup("x"), reader.Lookup("x/y")!.Parent);
        Assert.Equal(["y"], reader.Lookup("x")!.Children!.Keys);
    }

    [Fact]
    public async Task DecodeToc_ReadsTheCompressedTocInPlace()
    {
        var ct = TestContext.Current.CancellationToken;
        // A TOC that compresses poorly (random hex at the fastest level): ~1 MiB of JSON, ~0.9 MB compressed.
        var json = Encoding.ASCII.GetBytes($$"""{"version":1,"entries":[],"filler":"{{Convert.ToHexString(RandomNumberGenerator.GetBytes(512 * 1024))}}"}""");
        var blob = Blobs.WithToc([], json);
        var footer = await EstargzReader.ReadFooterAsync(new ByteArrayBlobSource(blob), ct);
        var compressed = blob.AsMemory((int)footer.TocOffset, blob.Length - (int)footer.TocOffset - footer.FooterSize);
        Assert.True(compressed.Length > 256 * 1024, $"compressed TOC of {compressed.Length} bytes");
        Assert.Equal(json, EstargzReader.DecodeToc(compressed.Span, footer.Compression)); // warm-up: pools, statics

        var before = GC.GetAllocatedBytesForCurrentThread();
        var decoded = EstargzReader.DecodeToc(compressed.Span, footer.Compression);
        var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.Equal(json, decoded);
        // The JSON's array and the decompressors' small buffers; no copy of the compressed TOC.
        Assert.True(allocated < json.Length + compressed.Length / 2, $"{allocated} bytes allocated for {json.Length} bytes of JSON from {compressed.Length} compressed");
    }
}
