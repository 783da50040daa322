using Stargz.Layer;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

/// <summary>The disk budget ([directory_cache] max_disk_mb): accounting, eviction order, pins, and reads under it.</summary>
public class DiskBudgetTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static string File(TempDir dir, string name, int bytes)
    {
        var p = Path.Combine(dir.Path, name);
        System.IO.File.WriteAllBytes(p, new byte[bytes]);
        return p;
    }

    [Fact]
    public void EvictsBackgroundChunksFirstThenCopiesThenTheLeastRecentlyReadChunksButNeverPinnedFilesOrTocs()
    {
        using var dir = new TempDir("budget");
        var b = new DiskBudget { Limit = 1000 };
        var evicted = new List<string>();
        b.ChunkEvicted = k => evicted.Add(k);
        b.CopyEvicted = k => evicted.Add(k);
        long t = 1;
        b.Added(CacheFileKind.Toc, "toc", File(dir, "toc", 100), 100, t++);
        b.Added(CacheFileKind.Chunk, "read-old", File(dir, "read-old", 100), 100, t++);
        b.Added(CacheFileKind.Chunk, "read-pinned", File(dir, "read-pinned", 100), 100, t++);
        b.Added(CacheFileKind.Copy, "copy", File(dir, "copy", 100), 100, t++);
        b.Added(CacheFileKind.Chunk, "read-new", File(dir, "read-new", 100), 100, t++);
        b.Added(CacheFileKind.BackgroundChunk, "bg-read-later", File(dir, "bg-read-later", 100), 100, t++);
        b.Added(CacheFileKind.BackgroundChunk, "bg", File(dir, "bg", 100), 100, t++);
        b.Pin(CacheFileKind.Chunk, "read-pinned");
        b.TouchChunk("bg-read-later"); // read since: now a read chunk, the most recent
        Assert.Equal(700, b.Used);
        Assert.True(b.HasRoom(300));
        Assert.False(b.HasRoom(301));

        // 550 more: down to 1000 - 550 - 5% = 400 used.
        Assert.True(b.MakeRoom(550));
        Assert.Equal(["bg", "copy", "read-old"], evicted);
        Assert.Equal(400, b.Used);
        Assert.False(System.IO.File.Exists(Path.Combine(dir.Path, "bg")));
        Assert.True(System.IO.File.Exists(Path.Combine(dir.Path, "read-pinned")));

        // Only the TOC and the pinned chunk would be left: not enough room for 950.
        evicted.Clear();
        Assert.False(b.MakeRoom(950));
        Assert.Equal(["read-new", "bg-read-later"], evicted);
        Assert.Equal(200, b.Used);
        Assert.Equal(5, b.Evictions);
        b.Unpin(CacheFileKind.Chunk, "read-pinned");
        Assert.True(b.MakeRoom(850));
        Assert.Equal(100, b.Used); // the TOC stays
    }

    /// <summary>Stands in for the layer manager's side of an image eviction: frees or holds as told, counting like the promoter.</summary>
    private sealed class Images(DiskBudget b) : IImageEviction
    {
        public readonly List<string> Evicted = [];
        public readonly HashSet<string> InUse = [];
        private readonly List<(string Key, long Size)> _held = [];

        public bool FreeHeld()
        {
            _held.RemoveAll(h =>
            {
                if (InUse.Contains(h.Key)) return false;
                b.Removed(CacheFileKind.Toc, "held/" + h.Key);
                return true;
            });
            return _held.Count > 0;
        }

        public bool Evict(string digest)
        {
            Evicted.Add(digest);
            var size = b.SizeOf(CacheFileKind.Image, digest);
            b.Removed(CacheFileKind.Image, digest);
            if (InUse.Contains(digest))
            {
                b.Added(CacheFileKind.Toc, "held/" + digest, "held/" + digest, size);
                _held.Add((digest, size));
            }
            return true;
        }
    }

    [Fact]
    public void PromotedImagesGoLastLeastRecentlyMountedFirstAndAHeldOneStopsFurtherImageEvictionsUntilItIsFreed()
    {
        using var dir = new TempDir("budget");
        var b = new DiskBudget { Limit = 1000 };
        var images = new Images(b);
        b.Images = images;
        long t = 1;
        b.Added(CacheFileKind.Image, "img-old", "img-old", 300, t++);
        b.Added(CacheFileKind.Image, "img-mid", "img-mid", 300, t++);
        b.Added(CacheFileKind.Image, "img-new", "img-new", 300, t++);
        b.Added(CacheFileKind.Chunk, "read", File(dir, "read", 100), 100, t++);
        b.TouchImage("img-old"); // mounted again: now the most recent image
        Assert.Equal(1000, b.Used);

        // Chunks first; then the least recently mounted image (img-mid); it was in use, so it stays counted and no other goes.
        images.InUse.Add("img-mid");
        Assert.False(b.MakeRoom(200));
        Assert.Equal(["img-mid"], images.Evicted);
        Assert.Equal(900, b.Used);
        Assert.Equal(1, b.ImageEvictions);
        Assert.False(b.MakeRoom(200)); // still held: nothing more evicted
        Assert.Equal(["img-mid"], images.Evicted);

        // Its container ended: freed first, then the next image only if needed.
        images.InUse.Clear();
        Assert.True(b.MakeRoom(200));
        Assert.Equal(600, b.Used);
        Assert.Equal(["img-mid"], images.Evicted);
        Assert.True(b.MakeRoom(600));
        Assert.Equal(["img-mid", "img-new"], images.Evicted);
        Assert.Equal(300, b.Used);

        // A whole-file copy never pushes an image out; a new image makes room from images only.
        b.Added(CacheFileKind.Chunk, "read2", File(dir, "read2", 100), 100, t++);
        Assert.False(b.MakeRoom(800, evictBelow: CacheFileKind.Chunk));
        Assert.Equal(["img-mid", "img-new"], images.Evicted);
        Assert.True(b.MakeRoomForImage(650));
        Assert.Equal(["img-mid", "img-new", "img-old"], images.Evicted);
        Assert.Equal(100, b.Used); // the read chunk stayed
    }

    [Fact]
    public void AWholeFileCopyMakesRoomOnlyFromBackgroundChunksAndOtherCopiesNeverFromReadChunks()
    {
        using var dir = new TempDir("budget-copy");
        var b = new DiskBudget { Limit = 400 };
        b.Added(CacheFileKind.Chunk, "read", File(dir, "read", 200), 200, 1);
        b.Added(CacheFileKind.BackgroundChunk, "bg", File(dir, "bg", 100), 100, 2);
        b.Added(CacheFileKind.Copy, "old-copy", File(dir, "old-copy", 100), 100, 3);
        Assert.False(b.MakeRoom(250, evictBelow: CacheFileKind.Chunk));
        Assert.Equal(200, b.Used); // background chunk and old copy went; the read chunk stays
        Assert.True(System.IO.File.Exists(Path.Combine(dir.Path, "read")));
        Assert.True(b.MakeRoom(150, evictBelow: CacheFileKind.Chunk));
    }

    [Fact]
    public async Task ReadingAFileFourTimesTheBudgetStaysWithinItAndEveryReadIsRight()
    {
        using var dir = new TempDir("budget-read");
        var b = new BlobBuilder().AddFile("big", BlobBuilder.Random(2_000_000, 31), 50_000);
        var blob = b.Build();
        var (content, chunks) = b.Files["big"];
        const long limit = 500_000;
        // Little memory, so reads again go to the disk or the registry.
        var options = new LayerOptions { CacheDirectory = dir.Path, MaxDiskBytes = limit, MemoryCacheBytes = 100_000 };
        using var rig = new FetcherRig(blob, options);
        rig.Cache.Budget.Limit = limit;
        long max = 0;
        var rnd = new Random(5);
        for (var pass = 0; pass < 3; pass++)
        {
            for (long off = 0; off < content.Length; off += 64 << 10)
            {
                var buf = new byte[64 << 10];
                var n = await rig.Fetcher.ReadAsync(chunks, content.Length, off, buf, Ct);
                Assert.True(content.AsSpan((int)off, n).SequenceEqual(buf.AsSpan(0, n)), $"pass {pass} @{off}");
                await rig.Fetcher.DrainAsync();
                max = Math.Max(max, DiskBytes(dir.Path));
            }
        }
        Assert.True(max <= limit, $"{max} bytes on disk, budget {limit}");
        Assert.True(rig.Cache.Budget.Evictions > 0);
        Assert.True(rig.Cache.Refetches > 0, "nothing was fetched again after its eviction");
        Assert.Equal(DiskBytes(dir.Path), rig.Cache.Budget.Used); // the accounting matches the disk
    }

    private static long DiskBytes(string dir)
        => Directory.EnumerateFiles(Path.Combine(dir, "chunks"), "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length);

    [Fact]
    public void AtStartTheBudgetCountsWhatTheCacheAlreadyHolds()
    {
        using var dir = new TempDir("budget-scan");
        using (var first = new ChunkCache(dir.Path, 1 << 20))
        {
            first.WriteDisk("sha256:" + new string('a', 64), new byte[1000]);
            first.WriteDisk("sha256:" + new string('b', 64), new byte[3000]);
            Assert.Equal(4000, first.Budget.Used);
        }
        using var again = new ChunkCache(dir.Path, 1 << 20);
        Assert.Equal(4000, again.Budget.Used);
        Assert.True(again.OnDisk("sha256:" + new string('b', 64)));
        Assert.True(again.Remove("sha256:" + new string('a', 64)));
        Assert.Equal(3000, again.Budget.Used);
    }
}
