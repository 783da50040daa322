using System.Security.Cryptography;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

public class AssembledFilesTests
{
    private static string Sha(ReadOnlySpan<byte> b) => "sha256:" + Convert.ToHexStringLower(SHA256.HashData(b));

    /// <summary>A file cut into chunk files of <paramref name="chunk"/> bytes under DIR/chunks; returns the chunks and their paths.</summary>
    private static (LayerChunk[] Chunks, Dictionary<string, string> Paths) Split(string dir, byte[] file, int chunk)
    {
        Directory.CreateDirectory(Path.Combine(dir, "chunks"));
        var chunks = new List<LayerChunk>();
        var paths = new Dictionary<string, string>();
        for (int off = 0; off < file.Length; off += chunk)
        {
            var part = file.AsSpan(off, Math.Min(chunk, file.Length - off)).ToArray();
            var digest = Sha(part);
            var p = Path.Combine(dir, "chunks", digest[7..]);
            File.WriteAllBytes(p, part);
            paths[digest] = p;
            chunks.Add(new LayerChunk(off, part.Length, off, part.Length, 0, digest));
        }
        return (chunks.ToArray(), paths);
    }

    private static AssembledFiles NewFiles(TempDir dir) =>
        new(Path.Combine(dir.Path, "files"), Directory.CreateDirectory(Path.Combine(dir.Path, "tmp")).FullName, durableWrites: false);

    /// <summary>Schedules the build of <paramref name="file"/> and waits (bounded) for it to end.</summary>
    private static Task BuildAsync(AssembledFiles files, byte[] file, LayerChunk[] chunks, Func<LayerChunk, string?> path) =>
        files.Schedule(Sha(file), file.Length, chunks, path).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);

    private static void NoTempFilesLeft(TempDir dir) => Assert.Empty(Directory.EnumerateFiles(Path.Combine(dir.Path, "tmp")));

    [Fact]
    public async Task BuildsTheFileFromItsChunksOnceHoweverManyAsk()
    {
        using var dir = new TempDir("assemble-ok");
        var file = TestTars.Random(300_001, 1);
        var (chunks, paths) = Split(dir.Path, file, 65_536);
        using var files = NewFiles(dir);
        var digest = Sha(file);
        await Task.WhenAll(Enumerable.Range(0, 8).Select(_ => BuildAsync(files, file, chunks, c => paths[c.Digest!])));
        Assert.Equal(1, files.Built);
        Assert.Equal(file, File.ReadAllBytes(files.TrustedPath(digest)!));
        NoTempFilesLeft(dir);
        // Trusted now: asking again does nothing.
        Assert.True(files.Schedule(digest, file.Length, chunks, c => paths[c.Digest!]).IsCompleted);
        Assert.Equal(1, files.Built);
    }

    [Fact]
    public async Task ChunksWhoseBytesDoNotHashToTheFileDigestLeaveNoCopyAndAreNotTriedAgainAtOnce()
    {
        using var dir = new TempDir("assemble-bad");
        var file = TestTars.Random(200_000, 2);
        var (chunks, paths) = Split(dir.Path, file, 65_536);
        File.WriteAllBytes(paths[chunks[1].Digest!], TestTars.Random(65_536, 3)); // a chunk file altered on disk
        using var files = NewFiles(dir);
        var digest = Sha(file);
        await BuildAsync(files, file, chunks, c => paths[c.Digest!]);
        Assert.Equal((0, 1), (files.Built, files.Failed));
        Assert.Null(files.TrustedPath(digest));
        Assert.False(File.Exists(files.PathOf(digest)));
        NoTempFilesLeft(dir);
        Assert.True(files.Schedule(digest, file.Length, chunks, c => paths[c.Digest!]).IsCompleted);
        Assert.Equal(1, files.Failed);
    }

    [Fact]
    public async Task AMissingChunkFileOrAGapBetweenChunksFailsTheBuild()
    {
        using var dir = new TempDir("assemble-gap");
        var file = TestTars.Random(200_000, 4);
        var (chunks, paths) = Split(dir.Path, file, 65_536);
        using var files = NewFiles(dir);
        await BuildAsync(files, file, chunks, c => c.FileOffset == 65_536 ? null : paths[c.Digest!]);
        Assert.Equal(1, files.Failed);
        var other = TestTars.Random(200_000, 5);
        var (otherChunks, otherPaths) = Split(dir.Path, other, 65_536);
        LayerChunk[] gap = [otherChunks[0], otherChunks[2], otherChunks[3]];
        await BuildAsync(files, other, gap, c => otherPaths[c.Digest!]);
        Assert.Equal((0, 2), (files.Built, files.Failed));
        NoTempFilesLeft(dir);
    }

    [Fact]
    public async Task RemoveDeletesCopiesAndForgetsThem()
    {
        using var dir = new TempDir("assemble-rm");
        var file = TestTars.Random(100_000, 6);
        var (chunks, paths) = Split(dir.Path, file, 65_536);
        using var files = NewFiles(dir);
        var digest = Sha(file);
        await BuildAsync(files, file, chunks, c => paths[c.Digest!]);
        var path = files.TrustedPath(digest)!;
        Assert.Equal(1, await files.RemoveAsync([digest, Sha([1, 2, 3])], TestContext.Current.CancellationToken));
        Assert.False(File.Exists(path));
        Assert.Null(files.TrustedPath(digest));
    }
}
