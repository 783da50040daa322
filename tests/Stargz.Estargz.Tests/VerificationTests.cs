using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;

namespace Stargz.Estargz.Tests;

/// <summary>Any single flipped byte in a chunk is caught: reads either fail or return the original bytes, never others.</summary>
public class VerificationTests
{
    [Fact]
    public async Task FlippedByteInStoredChunkData_IsAlwaysCaught()
    {
        // Level 0 stores the bytes as-is, so every byte of every chunk can be located and flipped in the blob.
        var ct = TestContext.Current.CancellationToken;
        var content = RandomNumberGenerator.GetBytes(3 * 5000 + 123);
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar([new ModelEntry { Path = "f", Type = TarEntryType.RegularFile, Content = content }]),
            new BuildOptions { ChunkSize = 5000, CompressionLevel = 0 });
        var reader = await Blobs.OpenAsync(blob, r.TocDigest);
        var f = reader.Lookup("f")!;
        var rng = new Random(5);
        int flips = 0;
        foreach (var c in f.Chunks)
        {
            int at = blob.AsSpan((int)c.BlobOffset, (int)c.BlobLength).IndexOf(content.AsSpan((int)c.FileOffset, 64));
            Assert.True(at >= 0);
            foreach (var i in new[] { 0, 1, (int)c.Size / 2, (int)c.Size - 1, rng.Next((int)c.Size), rng.Next((int)c.Size) })
            {
                var bad = (byte[])blob.Clone();
                bad[c.BlobOffset + at + i] ^= (byte)(1 << rng.Next(8));
                flips++;
                var br = await Blobs.OpenAsync(bad, r.TocDigest);
                // Caught by the chunk digest, or earlier by the member's own CRC when the decoder reaches it.
                var e = await Assert.ThrowsAnyAsync<EstargzFormatException>(async () => await br.ReadFileAsync(br.Lookup("f")!, c.FileOffset + i, new byte[1], ct));
                if (e is DigestMismatchException dm)
                {
                    Assert.Equal("f", dm.EntryName);
                    Assert.Equal(c.Digest, dm.ExpectedDigest);
                }
                else Assert.StartsWith("f: chunk at file offset", e.Message);
                await Assert.ThrowsAnyAsync<EstargzFormatException>(() => br.VerifyAllAsync(ct));
                // With the member CRC out of the picture (the chunk bytes alone), only the digest stands guard.
                var member = bad.AsSpan((int)c.BlobOffset, (int)c.BlobLength).ToArray();
                var dst = new byte[c.Size];
                try { ChunkDecoder.Decompress(BlobCompression.Gzip, member, c.InnerOffset, dst); } catch (EstargzFormatException) { continue; }
                Assert.False(ChunkDecoder.Verify(dst, c.Digest!));
            }
        }
        Assert.Equal(6 * f.Chunks.Count, flips);
    }

    [Theory]
    [InlineData(BlobCompression.Gzip)]
    [InlineData(BlobCompression.Zstd)]
    public async Task FlippedByteAnywhereInCompressedChunks_NeverYieldsWrongData(BlobCompression compression)
    {
        var ct = TestContext.Current.CancellationToken;
        var rng = new Random(11);
        var content = new byte[40_000];
        for (int i = 0; i < content.Length; i++) content[i] = (byte)(rng.Next(4) == 0 ? rng.Next(256) : 'a' + i % 7);
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar([new ModelEntry { Path = "f", Type = TarEntryType.RegularFile, Content = content }]),
            new BuildOptions { ChunkSize = 8192, CompressionLevel = compression == BlobCompression.Gzip ? 6 : 3, Compression = compression });
        var f = (await Blobs.OpenAsync(blob)).Lookup("f")!;
        int caught = 0, tries = 0;
        foreach (var c in f.Chunks)
        {
            for (int k = 0; k < 40; k++)
            {
                long pos = c.BlobOffset + rng.NextInt64(c.BlobLength);
                var bad = (byte[])blob.Clone();
                bad[pos] ^= (byte)(1 << rng.Next(8));
                var br = await Blobs.OpenAsync(bad, r.TocDigest);
                var buf = new byte[c.Size];
                tries++;
                try
                {
                    await br.ReadFileAsync(br.Lookup("f")!, c.FileOffset, buf, ct);
                    // Only bytes after the chunk inside its member (trailer, padding) can change without changing the chunk.
                    Assert.True(content.AsSpan((int)c.FileOffset, (int)c.Size).SequenceEqual(buf), $"wrong data served after flipping byte {pos}");
                }
                catch (EstargzFormatException) { caught++; }
            }
        }
        Assert.True(caught > tries / 2, $"only {caught} of {tries} flips detected");
    }

    [Fact]
    public void ChunkDecoder_Verify_ComparesSha256Digests()
    {
        var data = "hello"u8;
        Assert.True(ChunkDecoder.Verify(data, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"));
        Assert.False(ChunkDecoder.Verify(data, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9825"));
        Assert.False(ChunkDecoder.Verify(data, "sha512:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"));
        Assert.False(ChunkDecoder.Verify(data, "sha256:zz"));
        Assert.False(ChunkDecoder.Verify(data, ""));
    }

    [Fact]
    public void ChunkDecoder_Decompress_HonoursInnerOffset()
    {
        var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Optimal, true)) gz.Write("0123456789abcdef"u8);
        var dst = new byte[4];
        ChunkDecoder.Decompress(BlobCompression.Gzip, ms.ToArray(), 10, dst);
        Assert.Equal("abcd"u8.ToArray(), dst);
        Assert.Throws<EstargzFormatException>(() => ChunkDecoder.Decompress(BlobCompression.Gzip, ms.ToArray(), 14, dst));
        Assert.Throws<EstargzFormatException>(() => ChunkDecoder.Decompress(BlobCompression.Gzip, new byte[20], 0, dst));
        var z = new ZstdSharp.Compressor(3).Wrap("0123456789abcdef"u8).ToArray();
        ChunkDecoder.Decompress(BlobCompression.Zstd, z, 2, dst);
        Assert.Equal("2345"u8.ToArray(), dst);
    }
}

public class FooterTests
{
    [Fact]
    public void GzipFooter_HasTheReferenceLayout_AndIsAnEmptyGzipMember()
    {
        var f = Footer.BuildGzip(0x1234abcd);
        Assert.Equal(51, f.Length);
        Assert.Equal(new byte[] { 0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 26, 0, (byte)'S', (byte)'G', 22, 0 }, f[..16]);
        Assert.Equal("000000001234abcdSTARGZ"u8.ToArray(), f[16..38]);
        using (var gz = new GZipStream(new MemoryStream(f), CompressionMode.Decompress))
            Assert.Equal(-1, gz.ReadByte());
        Assert.True(Footer.TryParse(f, out var info));
        Assert.Equal(new FooterInfo(0x1234abcd, -1, BlobCompression.Gzip, false, 51), info);
    }

    [Fact]
    public void LegacyFooter_Is47Bytes_WithTheBareExtraField()
    {
        // 47-byte legacy stargz footer: the 22-byte payload is the whole Extra field.
        var ms = new MemoryStream();
        ms.Write([0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 22, 0]);
        ms.Write("00000000000004d2STARGZ"u8);
        ms.Write([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        var f = ms.ToArray();
        Assert.Equal(Footer.LegacySize, f.Length);
        var withJunkBefore = new byte[10].Concat(f).ToArray();
        Assert.True(Footer.TryParse(withJunkBefore, out var info));
        Assert.True(info.Legacy);
        Assert.Equal(1234, info.TocOffset);
        Assert.Equal(47, info.FooterSize);
    }

    [Fact]
    public async Task LegacyStargzBlob_IsReadEndToEnd()
    {
        var ct = TestContext.Current.CancellationToken;
        var content = System.Security.Cryptography.RandomNumberGenerator.GetBytes(30_000);
        var (blob, r) = await Blobs.BuildAsync(TreeModel.ToTar([new ModelEntry { Path = "f", Type = System.Formats.Tar.TarEntryType.RegularFile, Content = content }]),
            new BuildOptions { ChunkSize = 8192 });
        // Swap the 51-byte footer for a 47-byte legacy one pointing at the same TOC.
        var legacy = new MemoryStream();
        legacy.Write(blob.AsSpan(0, blob.Length - Footer.Size));
        legacy.Write([0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 22, 0]);
        legacy.Write(System.Text.Encoding.ASCII.GetBytes(r.TocOffset.ToString("x16", System.Globalization.CultureInfo.InvariantCulture) + "STARGZ"));
        legacy.Write([1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        var reader = await Blobs.OpenAsync(legacy.ToArray(), r.TocDigest);
        Assert.True(reader.Footer!.Value.Legacy);
        var buf = new byte[content.Length];
        Assert.Equal(content.Length, await reader.ReadFileAsync(reader.Lookup("f")!, 0, buf, ct));
        Assert.Equal(content, buf);
    }

    [Fact]
    public void ZstdChunkedFooter_RoundTrips()
    {
        var f = Footer.BuildZstd(1000, 200, 5000);
        Assert.Equal(48, f.Length);
        Assert.Equal(new byte[] { 0x50, 0x2a, 0x4d, 0x18, 40, 0, 0, 0 }, f[..8]);
        Assert.Equal("GnUlInUx"u8.ToArray(), f[^8..]);
        Assert.True(Footer.TryParse(f, out var info));
        Assert.Equal(new FooterInfo(1000, 200, BlobCompression.Zstd, false, 48), info);
        Assert.Equal(992, info.PayloadEnd);
        Assert.False(Footer.TryParse(new byte[51], out _));
    }
}
