using System.Security.Cryptography;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>The daemon's root is a small tmpfs that the chunk cache fills up.</summary>
public class DiskFullTests
{
    [Fact]
    public async Task WithTheRootOnASmallTmpfsThatFillsUpContainersKeepReadingRightBytesAndTheDaemonRecoversWhenSpaceReturns()
    {
        Requires.Root();
        using var disk = new TempDir("full-root");
        var root = Path.Combine(disk.Path, "root");
        // 24 MiB for 48 MiB of (incompressible) data: the background fetch fills it.
        Mounts.MountTmpfs(root, 24L << 20);
        try
        {
            await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 300, backgroundFetch: true, daemonRoot: root);
            var files = new Dictionary<string, int>();
            for (var i = 0; i < 6; i++) files[$"d{i}.bin"] = 8 << 10;
            var img = await rig.PushImageAsync("full/root", files, seed: 911);
            await rig.RpullAsync(img.Estargz);
            // The container's own snapshot is made while there is room; what it reads later is not.
            var holder = await rig.RunDetachedAsync(img.Estargz, "holder", "/bin/sleep", "3600");
            var full = await rig.WaitMetricAsync("stargz_cache_disk_full", v => v == 1, TimeSpan.FromSeconds(180));
            Assert.True(full == 1, $"the cache never filled the disk\n{rig.Daemon.Log}");
            Assert.Equal(img.Sha256, await rig.Sha256OfDataFilesInAsync(holder));
            Assert.Null(rig.Daemon.ExitCode);
            Assert.True(await rig.MetricAsync("stargz_cache_disk_no_space_errors") > 0);
            Assert.True(await rig.MetricAsync("stargz_layers_fully_fetched") < 2, "a layer whose chunks did not all reach the disk counts as fully fetched");

            // Every chunk file is whole (named by its digest); no temp file of a refused write is left.
            var cache = Path.Combine(root, "stargz", "cache");
            foreach (var f in Directory.GetFiles(Path.Combine(cache, "chunks"), "*", SearchOption.AllDirectories))
                Assert.Equal(Path.GetFileName(f), Convert.ToHexStringLower(SHA256.HashData(await File.ReadAllBytesAsync(f, TestContext.Current.CancellationToken))));
            Assert.Empty(Directory.GetFiles(Path.Combine(cache, "tmp")));
            // Logged, but not once per refused write.
            var logged = rig.Daemon.Log.Split('\n').Count(l => l.Contains("cache disk: cannot write", StringComparison.Ordinal));
            Assert.InRange(logged, 1, 6);

            // Space returns: the background fetch resumes by itself and completes both layers.
            Mounts.ResizeTmpfs(root, 256L << 20);
            Assert.Equal(2, await rig.WaitMetricAsync("stargz_layers_fully_fetched", v => v == 2, TimeSpan.FromSeconds(180)));
            Assert.Equal(0, await rig.MetricAsync("stargz_cache_disk_full"));
            var second = await rig.RunDetachedAsync(img.Estargz, "second", "/bin/sleep", "3600");
            Assert.Equal(img.Sha256, await rig.Sha256OfDataFilesInAsync(second));
            Assert.Null(rig.Daemon.ExitCode);
        }
        finally { Mounts.UnmountAllUnder(root); }
    }
}
