using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>async_remove: Remove answers at once and frees the key; the directory goes at the next Cleanup.</summary>
public class AsyncRemoveTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private static readonly Dictionary<string, string> NoLabels = new();

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task RemoveDeletesTheDirNowOrLeavesItForCleanup(bool asyncRemove)
    {
        using var dir = new TempDir("sga");
        var root = dir.Sub("root");
        await using var sn = await StargzSnapshotter.OpenAsync(new SnapshotterOptions { Root = root, AsyncRemove = asyncRemove }, null, Ct);
        var mounts = await sn.PrepareAsync("", "default/1/active", "", NoLabels, Ct);
        var upper = mounts[0].Source;
        await File.WriteAllTextAsync(Path.Combine(upper, "data.txt"), "written by the container", Ct);
        var snapshotDir = Path.GetDirectoryName(upper)!;
        Assert.True(Directory.Exists(snapshotDir));

        await sn.RemoveAsync("", "default/1/active", Ct);
        await Assert.ThrowsAsync<SnapshotterException>(() => sn.StatAsync("", "default/1/active", Ct));
        var snapshotsDir = Path.GetDirectoryName(snapshotDir)!;
        var leftovers = Directory.GetDirectories(snapshotsDir, "rm-*");
        if (asyncRemove)
        {
            // The data is still on disk, but under a name no snapshot owns; the key can be used again at once.
            var left = Assert.Single(leftovers);
            Assert.Equal("written by the container", await File.ReadAllTextAsync(Path.Combine(left, "fs", "data.txt"), Ct));
            await sn.PrepareAsync("", "default/1/active", "", NoLabels, Ct);
            Assert.True(await sn.CleanupAsync(Ct) >= 1);
            Assert.Empty(Directory.GetDirectories(snapshotsDir, "rm-*"));
            Assert.NotNull(await sn.StatAsync("", "default/1/active", Ct)); // Cleanup left the new snapshot alone
        }
        else
        {
            Assert.Empty(leftovers);
            Assert.False(Directory.Exists(snapshotDir));
        }
    }
}
