using System.Security.Cryptography;
using Stargz.Layer;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

/// <summary>The cache disk fails: full (a real tmpfs that fills up) or unreadable files. Reads stay right.</summary>
public class CacheDiskTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task AFullCacheDiskNeverFailsAReadLeavesNoPartialChunkAndIsUsedAgainWhenSpaceReturns()
    {
        Requires.Root();
        using var dir = new TempDir("cache-full");
        var disk = Path.Combine(dir.Path, "disk");
        Mounts.MountTmpfs(disk, 1 << 20); // 1 MiB for 3 MiB of chunks
        try
        {
            var b = new BlobBuilder().AddFile("big", BlobBuilder.Random(3 << 20, 21), 100_000);
            var blob = b.Build();
            var (content, chunks) = b.Files["big"];
            // Memory holds a fifth of the file: most of it can be served again only from the disk or the registry.
            var options = new LayerOptions { CacheDirectory = Path.Combine(disk, "cache"), MemoryCacheBytes = 600_000 };
            using (var rig = new FetcherRig(blob, options))
            {
                Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 128 << 10, Ct));
                await rig.Fetcher.DrainAsync();
                Assert.True(rig.Cache.Disk.NoSpaceErrors > 0, "the disk never filled up");
                Assert.True(rig.Cache.Disk.IsFull);
                // Read again: whatever is neither in memory nor on disk comes from the registry, right.
                Assert.Equal(content, await rig.ReadAllAsync(chunks, content.Length, 64 << 10, Ct));
                await rig.Fetcher.DrainAsync();
                Assert.Equal(0, rig.Stats.Errors);
            }
            // Every chunk file on the full disk is whole (named by its digest), and no temp file is left.
            var files = Directory.GetFiles(Path.Combine(disk, "cache", "chunks"), "*", SearchOption.AllDirectories);
            Assert.NotEmpty(files);
            foreach (var f in files)
                Assert.Equal(Path.GetFileName(f), Convert.ToHexStringLower(SHA256.HashData(await File.ReadAllBytesAsync(f, Ct))));
            Assert.Empty(Directory.GetFiles(Path.Combine(disk, "cache", "tmp")));

            // Space returns: the next writes work, and the disk is no longer reported full.
            Mounts.ResizeTmpfs(disk, 16 << 20);
            using var again = new FetcherRig(blob, options);
            Assert.Equal(content, await again.ReadAllAsync(chunks, content.Length, 128 << 10, Ct));
            await again.Fetcher.DrainAsync();
            Assert.False(again.Cache.Disk.IsFull);
            Assert.Equal(chunks.Length, Directory.GetFiles(Path.Combine(disk, "cache", "chunks"), "*", SearchOption.AllDirectories).Length);
        }
        finally { Mounts.UnmountAllUnder(disk); }
    }

    [Fact]
    public async Task AnUnreadableCachedChunkIsFetchedAgainAndCounted()
    {
        using var dir = new TempDir("cache-eio");
        var b = new BlobBuilder().AddFile("f", BlobBuilder.Random(150_000, 22), 50_000);
        var blob = b.Build();
        var (content, chunks) = b.Files["f"];
        var options = new LayerOptions { CacheDirectory = dir.Path };
        var path = (await FetcherRig.FillCacheAsync(blob, options, chunks, content, content.Length, Ct))[1];
        // A chunk "file" that cannot be read (a directory in its place: the read fails as on a broken disk).
        File.Delete(path);
        Directory.CreateDirectory(path);
        using var second = new FetcherRig(blob, options);
        Assert.Equal(content, await second.ReadAllAsync(chunks, content.Length, content.Length, Ct));
        Assert.Equal(1, second.Cache.Disk.ReadErrors);
        Assert.Equal(1, second.Blob.Calls); // only that chunk came from the registry
    }
}
