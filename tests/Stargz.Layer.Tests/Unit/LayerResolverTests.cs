using Stargz.Estargz;
using Stargz.Layer.Tests.Support;

namespace Stargz.Layer.Tests.Unit;

public class LayerResolverTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private sealed class CountingSource(byte[] data) : IBlobSource
    {
        public int Reads;
        public long BytesRead;
        public long Size => data.Length;

        public ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct)
        {
            Interlocked.Increment(ref Reads);
            Interlocked.Add(ref BytesRead, destination.Length);
            data.AsMemory((int)offset, destination.Length).CopyTo(destination);
            return ValueTask.CompletedTask;
        }
    }

    private static async Task<(byte[] Blob, BuildResult Built)> LayerAsync(int files, BlobCompression compression = BlobCompression.Gzip)
    {
        var tar = TestTars.Write(w =>
        {
            TestTars.Dir(w, "d/");
            for (var i = 0; i < files; i++) TestTars.File(w, $"d/file-with-a-longish-name-{i:00000}", TestTars.Random(100, i));
        });
        return await LayerRig.BuildAsync(tar, new BuildOptions { Compression = compression, CompressionLevel = compression == BlobCompression.Gzip ? 6 : 3 }, Ct);
    }

    [Theory]
    [InlineData(BlobCompression.Gzip)]
    [InlineData(BlobCompression.Zstd)]
    public async Task FooterAndTocComeFromOneTailRead(BlobCompression compression)
    {
        var (blob, built) = await LayerAsync(50, compression);
        var src = new CountingSource(blob);
        var r = await LayerResolver.ResolveAsync(src, "sha256:l", built.TocDigest, new LayerOptions(), Ct);
        Assert.Equal(1, src.Reads);
        Assert.Equal(built.TocDigest, r.TocDigest);
        Assert.True(r.Verified);
        Assert.NotNull(r.Reader.Lookup("d/file-with-a-longish-name-00049"));
    }

    [Fact]
    public async Task ATocLongerThanTheTailCostsOneMoreRead()
    {
        var (blob, built) = await LayerAsync(300);
        var src = new CountingSource(blob);
        var r = await LayerResolver.ResolveAsync(src, "sha256:l", built.TocDigest, new LayerOptions(), Ct, speculativeTailBytes: 512);
        Assert.Equal(2, src.Reads);
        Assert.Equal(2, r.RangeRequests);
        Assert.Equal(built.TocDigest, r.TocDigest);
        Assert.NotNull(r.Reader.Lookup("d/file-with-a-longish-name-00299"));
        // The second read is only the TOC's part before the tail: no byte is fetched twice.
        var footerAndToc = blob.Length - built.TocOffset;
        Assert.True(src.BytesRead <= Math.Max(512, footerAndToc), $"{src.BytesRead} bytes read for a {footerAndToc}-byte TOC and footer");
    }

    [Fact]
    public async Task AWrongOrMissingTocDigestIsRefusedWithTheReason()
    {
        var (blob, built) = await LayerAsync(3);
        var wrong = await Assert.ThrowsAsync<LayerResolveException>(() =>
            LayerResolver.ResolveAsync(new CountingSource(blob), "sha256:l", "sha256:" + new string('1', 64), new LayerOptions(), Ct));
        Assert.Contains("does not match", wrong.Message);
        var missing = await Assert.ThrowsAsync<LayerResolveException>(() =>
            LayerResolver.ResolveAsync(new CountingSource(blob), "sha256:l", null, new LayerOptions(), Ct));
        Assert.Contains("allow_no_verification", missing.Message);
        var allowed = await LayerResolver.ResolveAsync(new CountingSource(blob), "sha256:l", null, new LayerOptions { AllowNoVerification = true }, Ct);
        Assert.False(allowed.Verified);
        Assert.Equal(built.TocDigest, allowed.TocDigest);
    }

    [Fact]
    public async Task ABlobThatIsNotEstargzIsRefused()
    {
        var plain = TestTars.Random(10_000, 1);
        var e = await Assert.ThrowsAsync<LayerResolveException>(() =>
            LayerResolver.ResolveAsync(new CountingSource(plain), "sha256:l", "sha256:" + new string('1', 64), new LayerOptions(), Ct));
        Assert.Contains("footer", e.Message);
        var (blob, built) = await LayerAsync(3);
        var truncated = blob.AsSpan(0, blob.Length - 20).ToArray();
        await Assert.ThrowsAsync<LayerResolveException>(() =>
            LayerResolver.ResolveAsync(new CountingSource(truncated), "sha256:l", built.TocDigest, new LayerOptions(), Ct));
    }
}
