using System.Diagnostics;
using Stargz.Estargz;
using Stargz.Layer.Erofs;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// Promotion of fully fetched layers to kernel EROFS on real parts: a real registry, real FUSE mounts, real mkfs.erofs
/// and file-backed erofs mounts. The promoted mount must show exactly the tar's tree (whiteouts, opaque dirs, hard links,
/// devices, owners, modes, xattrs), and the image check must catch every kind of difference.
/// </summary>
public class ErofsPromotionTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static void RequiresErofs()
    {
        Requires.Fuse();
        Requires.Erofs();
    }

    private static string? FsTypeAt(string path) => Mounts.List().LastOrDefault(m => m.MountPoint == Path.GetFullPath(path))?.FsType;

    private static async Task WaitPromotedAsync(LayerRig rig, string mp)
    {
        var sw = Stopwatch.StartNew();
        while (!rig.Manager.IsPromoted(mp))
        {
            var info = rig.Manager.Layers.FirstOrDefault(l => l.MountPoint == mp);
            Assert.True(info?.PromotionError == null, $"promotion failed: {info?.PromotionError}");
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(120), "the layer was not promoted within 120 s of its mount");
            await Task.Delay(100, Ct);
        }
    }

    /// <summary>The chunks the image replaced are dropped just after the switch to it.</summary>
    private static async Task WaitChunksDroppedAsync(LayerRig rig)
    {
        var sw = Stopwatch.StartNew();
        while (ChunkFiles(rig) > 0)
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), $"{ChunkFiles(rig)} chunk files left 60 s after the promotion");
            await Task.Delay(50, Ct);
        }
    }

    private static int ChunkFiles(LayerRig rig)
    {
        var dir = Path.Combine(rig.Dir.Path, "cache", "chunks");
        return Directory.Exists(dir) ? Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories).Count() : 0;
    }

    [Fact]
    public async Task AFullyFetchedLayerIsPromotedToErofsShowingTheSameTreeAndARestartMountsItWithoutTheRegistry()
    {
        RequiresErofs();
        var tar = OurBuilderLayerTests.RichTar();
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 256 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions
        {
            PromoteToErofs = true, BackgroundPause = TimeSpan.FromMilliseconds(1), BackgroundQuietPeriod = TimeSpan.Zero,
            FetchingTimeout = TimeSpan.FromSeconds(5),
        });
        var digest = await rig.PushAsync("erofs/rich", blob, Ct);
        var labels = rig.Labels("erofs/rich", digest, built.TocDigest);
        var expected = TreeModel.FromTar(new MemoryStream(tar));

        var mp = await rig.MountAsync(labels, Ct);
        Assert.StartsWith("fuse", FsTypeAt(mp));
        // A file held open across the promotion, as a container started before it would: it keeps reading through FUSE.
        await using var held = new FileStream(Path.Combine(mp, "home/user/big.bin"), FileMode.Open, FileAccess.Read);

        await WaitPromotedAsync(rig, mp);
        Assert.Equal("erofs", FsTypeAt(mp));
        var info = rig.Manager.Layers.Single(l => l.MountPoint == mp);
        Assert.True(info.Promoted);
        Assert.True(File.Exists(info.ErofsImage), info.ErofsImage);
        var actual = TreeModel.FromDirectory(mp);
        OurBuilderLayerTests.LandmarkIsHidden(actual, mp);
        Assert.True(TreeModel.Diff(expected, actual) == "", TreeModel.Diff(expected, actual));
        Assert.Equal(TreeModel.InodeOf(Path.Combine(mp, "bin/tool")), TreeModel.InodeOf(Path.Combine(mp, "home/user/tool-third")));
        // The image replaced the chunks; the open made before the promotion reads the right bytes from it.
        Assert.Equal(0, ChunkFiles(rig));
        var want = TestTars.Random(3_500_000, 1);
        var got = new byte[want.Length];
        await held.ReadExactlyAsync(got, Ct);
        Assert.Equal(want, got);

        // Check needs no registry; a second mount of the layer is the image at once.
        rig.Proxy.Down();
        await rig.Manager.CheckAsync(mp, labels, Ct);
        var mp2 = await rig.MountAsync(labels, Ct);
        Assert.Equal("erofs", FsTypeAt(mp2));
        Assert.True(TreeModel.Diff(expected, TreeModel.FromDirectory(mp2)) == "");
        await rig.Manager.UnmountAsync(mp2, Ct);
        // The detached FUSE mount ends when its last user does: its server stops once the held file is closed.
        var fuse = rig.Manager.ServerOf(mp)!;
        Assert.False(fuse.Completion.IsCompleted);
        await held.DisposeAsync();
        await fuse.Completion.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        await rig.Manager.UnmountAsync(mp, Ct);
        Assert.Null(FsTypeAt(mp));

        // After a restart, with the registry away, the layer mounts from its image and passes Check.
        rig.Proxy.ResetCounts();
        await rig.RestartManagerAsync();
        var mp3 = await rig.MountAsync(labels, Ct);
        Assert.Equal("erofs", FsTypeAt(mp3));
        Assert.True(rig.Manager.IsPromoted(mp3));
        Assert.True(TreeModel.Diff(expected, TreeModel.FromDirectory(mp3)) == "", TreeModel.Diff(expected, TreeModel.FromDirectory(mp3)));
        await rig.Manager.CheckAsync(mp3, labels, Ct);
        Assert.Equal(0, rig.Proxy.Requests);

        // Releasing the layer (its snapshot removed) drops the image and its mount.
        var image = rig.Manager.Layers.Single(l => l.MountPoint == mp3).ErofsImage!;
        await rig.Manager.ReleaseAsync(mp3, Ct);
        Assert.False(File.Exists(image));
        Assert.Empty(Mounts.Under(rig.Dir.Path));
    }

    /// <summary>
    /// Issue 20's disk rule: under <c>max_disk_mb</c>, when chunks are not enough, a promoted layer's image is evicted. The
    /// layer goes back to lazy FUSE at the same mountpoint (chunks fetched from the registry again, verified), its record
    /// is gone (a restart would not bind it), a file opened on the image before (a running container) keeps reading the
    /// right bytes and keeps the image counted until it is closed, and once there is room the layer is promoted again.
    /// </summary>
    [Fact]
    public async Task UnderBudgetPressureAPromotedImageIsEvictedTheLayerIsServedLazilyThroughFuseAgainAndPromotedAgainWhenThereIsRoom()
    {
        RequiresErofs();
        var tar = OurBuilderLayerTests.RichTar();
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 256 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions
        {
            PromoteToErofs = true, BackgroundPause = TimeSpan.FromMilliseconds(1), BackgroundQuietPeriod = TimeSpan.Zero,
            MaxDiskBytes = 256L << 20,
        });
        var digest = await rig.PushAsync("erofs/evict", blob, Ct);
        var labels = rig.Labels("erofs/evict", digest, built.TocDigest);
        var expected = TreeModel.FromTar(new MemoryStream(tar));
        var erofsDir = Path.Combine(rig.Dir.Path, "erofs");
        var want = TestTars.Random(3_500_000, 1);
        var mp = await rig.MountAsync(labels, Ct);
        await WaitPromotedAsync(rig, mp);
        await WaitChunksDroppedAsync(rig);
        var image = rig.Manager.Layers.Single(l => l.MountPoint == mp).ErofsImage!;
        var imageBytes = new FileInfo(image).Length;
        Assert.Single(Directory.GetFiles(erofsDir, "*.promoted"));

        // A container started on the image holds a file of it.
        await using var held = new FileStream(Path.Combine(mp, "home/user/big.bin"), FileMode.Open, FileAccess.Read);
        var budget = rig.Manager.Cache.Budget;
        var used = budget.Used;
        rig.Proxy.ResetCounts();
        budget.Limit = used; // full: the next chunk needs room, and only the image can give it
        Assert.False(budget.MakeRoom(1 << 20)); // evicted, but the open file keeps its bytes on disk: counted still

        Assert.Equal(1, rig.Manager.ImageEvictions);
        Assert.StartsWith("fuse", FsTypeAt(mp));
        var info = rig.Manager.Layers.Single(l => l.MountPoint == mp);
        Assert.False(info.Promoted);
        Assert.False(info.AllChunksFetched); // status: serving again (its chunks were dropped at the promotion)
        Assert.Null(info.ErofsImage);
        Assert.False(File.Exists(image));
        Assert.Empty(Directory.GetFiles(erofsDir, "*.promoted"));
        var kept = Assert.Single(Directory.GetFiles(erofsDir, "*.evicted-*"));
        Assert.Equal(used, budget.Used);
        // The open file reads the right bytes from the image; the layer's mount reads them lazily from the registry.
        var got = new byte[want.Length];
        await held.ReadExactlyAsync(got, Ct);
        Assert.Equal(want, got);
        var fused = TreeModel.FromDirectory(mp);
        Assert.True(TreeModel.Diff(expected, fused) == "", TreeModel.Diff(expected, fused));
        Assert.True(rig.Proxy.RangeRequests > 0, "the evicted layer's files were not fetched from the registry again");
        Assert.True(rig.Manager.ServerOf(mp)!.ReadRequests > 0);

        // Closed (the container ended): the kernel lets go of the image and it is deleted, its bytes no longer counted.
        await held.DisposeAsync();
        budget.FreeHeldImages();
        Assert.False(File.Exists(kept));
        Assert.True(budget.Used <= used - imageBytes, $"used {budget.Used} of {used} before, image {imageBytes}");

        // Room again: the background fetch completes the layer and it is promoted anew.
        budget.Limit = 256L << 20;
        await WaitPromotedAsync(rig, mp);
        Assert.Equal("erofs", FsTypeAt(mp));
        Assert.True(TreeModel.Diff(expected, TreeModel.FromDirectory(mp)) == "", TreeModel.Diff(expected, TreeModel.FromDirectory(mp)));
        Assert.Single(Directory.GetFiles(erofsDir, "*.promoted"));

        // Evicted again with nothing holding it: deleted at once, and the room is there.
        await WaitChunksDroppedAsync(rig);
        var fusedServer = rig.Manager.ServerOf(mp)!;
        budget.Limit = budget.Used;
        Assert.True(budget.MakeRoom(1 << 20));
        Assert.Equal(2, rig.Manager.ImageEvictions);
        Assert.StartsWith("fuse", FsTypeAt(mp));
        Assert.Empty(Directory.GetFiles(erofsDir, "*.erofs"));
        Assert.Empty(Directory.GetFiles(erofsDir, "*.evicted-*"));
        Assert.NotSame(fusedServer, rig.Manager.ServerOf(mp));

        // A restart does not bind a missing image: the layer mounts through FUSE.
        await rig.Manager.UnmountAsync(mp, Ct);
        await rig.RestartManagerAsync();
        rig.Manager.Cache.Budget.Limit = 0;
        var mp2 = await rig.MountAsync(labels, Ct);
        Assert.StartsWith("fuse", FsTypeAt(mp2));
        var again = TreeModel.FromDirectory(mp2);
        Assert.True(TreeModel.Diff(expected, again) == "", TreeModel.Diff(expected, again));
        await rig.Manager.ReleaseAsync(mp2, Ct);
        Assert.Empty(Mounts.Under(rig.Dir.Path));
    }

    [Fact]
    public async Task WithPromotionTurnedOffAfterARestartThePromotedLayerIsServedLazilyThroughFuseAgainAndItsImageIsDeleted()
    {
        Requires.Fuse();
        Requires.Erofs();
        var tar = OurBuilderLayerTests.RichTar();
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 256 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions
        {
            PromoteToErofs = true, BackgroundPause = TimeSpan.FromMilliseconds(1), BackgroundQuietPeriod = TimeSpan.Zero,
        });
        var digest = await rig.PushAsync("erofs/off", blob, Ct);
        var labels = rig.Labels("erofs/off", digest, built.TocDigest);
        var mp = await rig.MountAsync(labels, Ct);
        await WaitPromotedAsync(rig, mp);
        var image = rig.Manager.Layers.Single(l => l.MountPoint == mp).ErofsImage!;
        await rig.Manager.UnmountAsync(mp, Ct);
        Assert.True(File.Exists(image));

        await rig.Manager.DisposeAsync();
        await using var off = new LayerManager(rig.Client, rig.Options with { PromoteToErofs = false });
        Assert.False(File.Exists(image));
        var mp2 = rig.Dir.Sub("mnt-off");
        await off.MountAsync(mp2, labels, Ct);
        try
        {
            Assert.StartsWith("fuse", FsTypeAt(mp2));
            Assert.False(off.IsPromoted(mp2));
            var expected = TreeModel.FromTar(new MemoryStream(tar));
            Assert.True(TreeModel.Diff(expected, TreeModel.FromDirectory(mp2)) == "", TreeModel.Diff(expected, TreeModel.FromDirectory(mp2)));
        }
        finally { await off.UnmountAsync(mp2, Ct); }
    }

    /// <summary>
    /// The check behind every promotion: a copy of the FUSE mount (cp -a) passes it, and each kind of difference —
    /// a mode, an owner, an mtime, a byte of content, an xattr, an extra name, a broken hard link, a symlink target —
    /// is refused naming the path.
    /// </summary>
    [Fact]
    public async Task TheImageCheckAcceptsAnExactCopyAndNamesEveryKindOfDifference()
    {
        RequiresErofs();
        var tar = OurBuilderLayerTests.RichTar();
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 256 << 10, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync();
        var digest = await rig.PushAsync("erofs/check", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("erofs/check", digest, built.TocDigest), Ct);
        var fs = rig.Manager.GetLayer(mp)!.FileSystem;
        var copy = rig.Dir.Sub("copy");

        async Task Fresh()
        {
            if (Directory.Exists(copy)) Directory.Delete(copy, recursive: true);
            (await ProcessRunner.RunAsync("cp", ["-a", mp, copy])).EnsureSuccess("cp -a");
        }
        void Refused(string path, string what)
        {
            var e = Assert.Throws<InvalidDataException>(() => ErofsImageCheck.Verify(fs, copy, Ct));
            Assert.Contains(path, e.Message);
            Assert.Contains(what, e.Message);
        }
        async Task Run(params string[] cmd) => (await ProcessRunner.RunAsync(cmd[0], cmd[1..])).EnsureSuccess(string.Join(' ', cmd));
        // A change made in the copy touches mtimes too (the file's, its directory's): put them back, so only the change differs.
        Task KeepTime(string rel) => Run("touch", "-h", "-r", Path.Combine(mp, rel), Path.Combine(copy, rel));

        await Fresh();
        var summary = ErofsImageCheck.Verify(fs, copy, Ct);
        Assert.True(summary.HashedBytes >= 3_500_000 + 70_000, $"hashed {summary.HashedBytes}");

        await Run("chmod", "0600", Path.Combine(copy, "etc/shadow"));
        Refused("/etc/shadow", "mode");
        await Fresh();
        await Run("chown", "1:1", Path.Combine(copy, "etc/hostname"));
        Refused("/etc/hostname", "owner");
        await Fresh();
        await Run("touch", "-h", "-d", "@1000000000.5", Path.Combine(copy, "home/user/empty"));
        Refused("/home/user/empty", "mtime");
        await Fresh();
        await using (var f = new FileStream(Path.Combine(copy, "home/user/big.bin"), FileMode.Open, FileAccess.Write))
        {
            f.Position = 3_000_000;
            f.WriteByte(0xAA);
        }
        await KeepTime("home/user/big.bin");
        Refused("/home/user/big.bin", "content hashes");
        await Fresh();
        await Run("setfattr", "-x", "user.b", Path.Combine(copy, "home/user/tagged"));
        Refused("/home/user/tagged", "xattr");
        await Fresh();
        await Run("setfattr", "-x", "trusted.overlay.opaque", Path.Combine(copy, "var/cache"));
        Refused("/var/cache", "xattr");
        await Fresh();
        await File.WriteAllTextAsync(Path.Combine(copy, "etc/extra"), "not in the layer", Ct);
        await KeepTime("etc");
        Refused("/etc", "extra extra");
        await Fresh();
        File.Delete(Path.Combine(copy, "var/old-log"));
        await KeepTime("var");
        Refused("/var", "missing old-log");
        await Fresh();
        // A hard link broken in two (bin/tool-again becomes a copy): the link counts no longer match the TOC.
        await Run("cp", "-a", "--remove-destination", Path.Combine(copy, "bin/tool"), Path.Combine(copy, "bin/tool-again"));
        await KeepTime("bin");
        Refused("/tool", "link count"); // whichever of its three names the walk meets first
        await Fresh();
        await Run("ln", "-sfn", "other", Path.Combine(copy, "bin/sh"));
        await KeepTime("bin/sh");
        await KeepTime("bin");
        Refused("/bin/sh", "symlink target");
    }
}
