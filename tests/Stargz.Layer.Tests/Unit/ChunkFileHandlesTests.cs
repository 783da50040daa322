using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Unit;

public class ChunkFileHandlesTests
{
    [Fact]
    public void KeepsAtMostCapacityDescriptorsAndDropsTheLeastRecentlyUsed()
    {
        using var dir = new TempDir("fd-lru");
        var paths = Enumerable.Range(0, 4).Select(i => { var p = Path.Combine(dir.Path, $"c{i}"); File.WriteAllBytes(p, [(byte)i]); return p; }).ToArray();
        using var cache = new ChunkFileHandles(2);
        var h0 = cache.Add("k0", File.OpenHandle(paths[0]));
        var h1 = cache.Add("k1", File.OpenHandle(paths[1]));
        Assert.Same(h0, cache.TryGet("k0")); // k0 is now the most recently used
        var h2 = cache.Add("k2", File.OpenHandle(paths[2]));
        Assert.Equal(2, cache.Count);
        Assert.True(h1.IsClosed, "the least recently used descriptor was not closed");
        Assert.Null(cache.TryGet("k1"));
        Assert.Same(h0, cache.TryGet("k0"));
        Assert.Same(h2, cache.TryGet("k2"));
        Assert.False(h0.IsClosed || h2.IsClosed);
    }

    [Fact]
    public void AddingAKeyTwiceKeepsTheFirstHandleAndClosesTheSecond()
    {
        using var dir = new TempDir("fd-twice");
        var p = Path.Combine(dir.Path, "c");
        File.WriteAllBytes(p, [1]);
        using var cache = new ChunkFileHandles(4);
        var first = cache.Add("k", File.OpenHandle(p));
        var second = File.OpenHandle(p);
        Assert.Same(first, cache.Add("k", second));
        Assert.True(second.IsClosed);
        Assert.Equal(1, cache.Count);
    }

    [Fact]
    public void DisposeClosesEveryDescriptorAndLaterAddsAreClosedAtOnce()
    {
        using var dir = new TempDir("fd-dispose");
        var p = Path.Combine(dir.Path, "c");
        File.WriteAllBytes(p, [1]);
        var cache = new ChunkFileHandles(4);
        var h = cache.Add("k", File.OpenHandle(p));
        cache.Dispose();
        Assert.True(h.IsClosed);
        Assert.Null(cache.TryGet("k"));
        var late = cache.Add("k2", File.OpenHandle(p));
        Assert.True(late.IsClosed); // a read racing the unmount then takes the memory path (its lend fails)
        Assert.Equal(0, cache.Count);
    }
}
