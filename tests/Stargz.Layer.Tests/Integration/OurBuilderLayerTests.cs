using System.Diagnostics;
using System.Formats.Tar;
using Stargz.Estargz;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// Layers made by our own builder, served by a real docker-registry through a counting proxy, mounted through real
/// FUSE by the <see cref="LayerManager"/>, and checked the way a user would: ls/stat/cat of the mount against the tar.
/// </summary>
public class OurBuilderLayerTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    internal static byte[] RichTar() => TestTars.Write(w =>
    {
        TestTars.Dir(w, "etc/", 0x1ED /* 0755 */);
        TestTars.File(w, "etc/hostname", "stargz\n"u8.ToArray(), 0x1A4 /* 0644 */, 0, 0);
        TestTars.File(w, "etc/shadow", "root:*:1:0:99999:7:::\n"u8.ToArray(), 0x1A0 /* 0640 */, 0, 42);
        TestTars.Dir(w, "home/", 0x1ED /* 0755 */);
        TestTars.Dir(w, "home/user/", 0x1C0 /* 0700 */, 1000, 1000, new() { ["user.purpose"] = "home" });
        TestTars.File(w, "home/user/big.bin", TestTars.Random(3_500_000, 1), 0x180 /* 0600 */, 1000, 1000);
        TestTars.File(w, "home/user/empty", [], 0x1A4 /* 0644 */, 1000, 1000);
        TestTars.File(w, "home/user/tagged", "x"u8.ToArray(), 0x1A4 /* 0644 */, 1000, 1000, new() { ["user.a"] = "1", ["user.b"] = "two" });
        TestTars.Dir(w, "bin/", 0x1ED /* 0755 */);
        TestTars.File(w, "bin/tool", TestTars.Random(70_000, 2), 0x9ED /* 04755 */);
        TestTars.Link(w, TarEntryType.HardLink, "bin/tool-again", "bin/tool");
        TestTars.Link(w, TarEntryType.HardLink, "home/user/tool-third", "bin/tool");
        TestTars.Link(w, TarEntryType.SymbolicLink, "bin/sh", "tool");
        TestTars.Link(w, TarEntryType.SymbolicLink, "dangling", "/nowhere/at/all");
        TestTars.Dir(w, "dev/", 0x1ED /* 0755 */);
        TestTars.Device(w, TarEntryType.CharacterDevice, "dev/null", 1, 3, 0x1B6 /* 0666 */);
        TestTars.Device(w, TarEntryType.BlockDevice, "dev/loop9", 7, 9, 0x1B0 /* 0660 */);
        TestTars.Device(w, TarEntryType.Fifo, "dev/pipe", 0, 0, 0x190 /* 0620 */);
        TestTars.Dir(w, "var/", 0x1ED /* 0755 */);
        TestTars.Dir(w, "var/cache/", 0x3FF /* 01777 */);
        TestTars.File(w, "var/cache/.wh..wh..opq", []);
        TestTars.File(w, "var/cache/new", "fresh"u8.ToArray());
        TestTars.File(w, "var/.wh.old-log", []);
        TestTars.File(w, "var/.wh.kept", []);
        TestTars.File(w, "var/kept", "a file that also has a whiteout entry"u8.ToArray());
        TestTars.Dir(w, "sp ace/", 0x1ED /* 0755 */);
        TestTars.File(w, "sp ace/ünïcödé ✓.txt", "utf-8 names"u8.ToArray());
    });

    /// <summary>The builder adds a landmark file (a real tar entry of the layer); like the reference, the mounted layer
    /// neither lists it nor finds it by name in "/" (it is not a file of the image).</summary>
    internal static void LandmarkIsHidden(Dictionary<string, FileView> actual, string mountpoint)
    {
        Assert.False(actual.ContainsKey(".no.prefetch.landmark"), "landmark listed in the mounted layer");
        Assert.False(actual.ContainsKey(".prefetch.landmark"), "landmark listed in the mounted layer");
        Assert.False(File.Exists(Path.Combine(mountpoint, ".no.prefetch.landmark")), "landmark found by name");
        Assert.False(File.Exists(Path.Combine(mountpoint, ".prefetch.landmark")), "landmark found by name");
    }

    [Theory]
    [InlineData(BlobCompression.Gzip)]
    [InlineData(BlobCompression.Zstd)]
    public async Task AMountedLayerShowsExactlyTheTarsTree(BlobCompression compression)
    {
        var tar = RichTar();
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions
        {
            ChunkSize = 1 << 20, CompressionLevel = compression == BlobCompression.Gzip ? 1 : 3, Compression = compression,
        }, Ct);
        await using var rig = await LayerRig.StartAsync();
        var digest = await rig.PushAsync("ours/rich", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("ours/rich", digest, built.TocDigest), Ct);

        var expected = TreeModel.FromTar(new MemoryStream(tar));
        var actual = TreeModel.FromDirectory(mp);
        LandmarkIsHidden(actual, mp);
        Assert.True(TreeModel.Diff(expected, actual) == "", TreeModel.Diff(expected, actual));
        // Spot checks a user would make.
        Assert.Equal(3u, actual["bin/tool"].NLink);
        Assert.Equal('c', actual["var/old-log"].Type);
        Assert.Contains("trusted.overlay.opaque=", actual["var/cache"].Xattrs);
        Assert.False(File.Exists(Path.Combine(mp, "var/.wh.old-log")));
        Assert.Equal("tool", new FileInfo(Path.Combine(mp, "bin/sh")).LinkTarget);
        // Hardlinks are one inode; inode numbers stay the same for the life of the mount.
        var ino = TreeModel.InodeOf(Path.Combine(mp, "bin/tool"));
        Assert.Equal(ino, TreeModel.InodeOf(Path.Combine(mp, "bin/tool-again")));
        Assert.Equal(ino, TreeModel.InodeOf(Path.Combine(mp, "home/user/tool-third")));
        Assert.NotEqual(ino, TreeModel.InodeOf(Path.Combine(mp, "bin/sh")));
        // statfs: what df shows for the layer.
        var statfs = (await ProcessRunner.RunAsync("stat", ["-f", "-c", "%T %b %c", mp])).EnsureSuccess("stat -f").StdOut.Split(' ');
        Assert.True(long.Parse(statfs[1]) * 4096 >= 3_500_000, $"statfs blocks {statfs[1]}");
        var distinct = actual.Keys.Select(p => TreeModel.InodeOf(Path.Combine(mp, p))).Distinct().Count();
        Assert.Equal(distinct + 1 /* root */, long.Parse(statfs[2]));
        var st = rig.Manager.GetLayer(mp)!.Stats.Snapshot();
        Assert.Equal(blob.Length, st.BlobSize);
        Assert.Equal(0, st.Errors);
    }

    [Fact]
    public async Task WhiteoutsAndOpaqueDirsWorkThroughARealOverlayMount()
    {
        var lowerTar = TestTars.Write(w =>
        {
            TestTars.Dir(w, "var/");
            TestTars.Dir(w, "var/cache/");
            TestTars.File(w, "var/cache/stale", "old cache"u8.ToArray());
            TestTars.File(w, "var/old-log", "old log"u8.ToArray());
            TestTars.File(w, "var/kept", "lower version"u8.ToArray());
            TestTars.File(w, "keep-me", "from the lower layer"u8.ToArray());
        });
        var upperTar = RichTar();
        await using var rig = await LayerRig.StartAsync();
        var (lowerBlob, lowerBuilt) = await LayerRig.BuildAsync(lowerTar, null, Ct);
        var (upperBlob, upperBuilt) = await LayerRig.BuildAsync(upperTar, new BuildOptions { ChunkSize = 1 << 20, CompressionLevel = 1 }, Ct);
        var lowerDigest = await rig.PushAsync("ours/ovl", lowerBlob, Ct);
        var upperDigest = await rig.PushAsync("ours/ovl", upperBlob, Ct);
        var layers = lowerDigest + "," + upperDigest;
        var lower = await rig.MountAsync(rig.Labels("ours/ovl", lowerDigest, lowerBuilt.TocDigest, layers), Ct);
        var upper = await rig.MountAsync(rig.Labels("ours/ovl", upperDigest, upperBuilt.TocDigest, layers), Ct);
        var merged = rig.Dir.Sub("merged");
        (await ProcessRunner.RunAsync("mount", ["-t", "overlay", "overlay", "-o", $"lowerdir={upper}:{lower}", merged]))
            .EnsureSuccess("mount overlay");
        try
        {
            Assert.Equal("from the lower layer", await File.ReadAllTextAsync(Path.Combine(merged, "keep-me"), Ct));
            Assert.False(File.Exists(Path.Combine(merged, "var/old-log")), "whiteout did not hide the lower file");
            Assert.Equal(["new"], Directory.GetFileSystemEntries(Path.Combine(merged, "var/cache")).Select(Path.GetFileName).ToArray());
            Assert.Equal("a file that also has a whiteout entry", await File.ReadAllTextAsync(Path.Combine(merged, "var/kept"), Ct));
            Assert.Equal(TestTars.Random(3_500_000, 1), await File.ReadAllBytesAsync(Path.Combine(merged, "home/user/big.bin"), Ct));
            Assert.DoesNotContain(Directory.GetFileSystemEntries(Path.Combine(merged, "var")), p => Path.GetFileName(p).StartsWith(".wh.", StringComparison.Ordinal));
        }
        finally
        {
            await ProcessRunner.RunAsync("umount", [merged]);
        }
    }

    [Fact]
    public async Task WithUserxattrTheOpaqueMarkIsUserOverlayOpaque()
    {
        var tar = RichTar();
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions { ChunkSize = 1 << 20, CompressionLevel = 1 }, Ct);
        await using var rig = await LayerRig.StartAsync(new LayerOptions { UserXattrOpaque = true });
        var digest = await rig.PushAsync("ours/ux", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("ours/ux", digest, built.TocDigest), Ct);
        var expected = TreeModel.FromTar(new MemoryStream(tar), "user.overlay.opaque");
        var actual = TreeModel.FromDirectory(mp);
        LandmarkIsHidden(actual, mp);
        Assert.True(TreeModel.Diff(expected, actual) == "", TreeModel.Diff(expected, actual));
    }

    [Fact]
    public async Task ALayerWithoutATocDigestLabelNeedsAllowNoVerificationAndTheSkipVerifyLabel()
    {
        var (blob, built) = await LayerRig.BuildAsync(RichTar(), null, Ct);
        Dictionary<string, string> SkipVerify(Dictionary<string, string> l)
        {
            l[SnapshotLabels.SkipVerify] = "true";
            return l;
        }
        await using var rig = await LayerRig.StartAsync();
        var digest = await rig.PushAsync("ours/nolabel", blob, Ct);
        var e = await Assert.ThrowsAsync<LayerResolveException>(() => rig.MountAsync(rig.Labels("ours/nolabel", digest, null), Ct));
        Assert.Contains("allow_no_verification", e.Message);
        // The label alone is not enough: the operator must allow it too.
        e = await Assert.ThrowsAsync<LayerResolveException>(() => rig.MountAsync(SkipVerify(rig.Labels("ours/nolabel", digest, null)), Ct));
        Assert.Contains("needs allow_no_verification", e.Message);
        var wrong = await Assert.ThrowsAsync<LayerResolveException>(() => rig.MountAsync(rig.Labels("ours/nolabel", digest, "sha256:" + new string('0', 64)), Ct));
        Assert.Contains("does not match", wrong.Message);

        await using var lax = await LayerRig.StartAsync(new LayerOptions { AllowNoVerification = true });
        var d2 = await lax.PushAsync("ours/nolabel", blob, Ct);
        // Nor is the config alone (the reference's rule: the pull asks for it with --skip-content-verify).
        e = await Assert.ThrowsAsync<LayerResolveException>(() => lax.MountAsync(lax.Labels("ours/nolabel", d2, null), Ct));
        Assert.Contains(SnapshotLabels.SkipVerify, e.Message);
        var mp = await lax.MountAsync(SkipVerify(lax.Labels("ours/nolabel", d2, null)), Ct);
        Assert.Equal("stargz\n", await File.ReadAllTextAsync(Path.Combine(mp, "etc/hostname"), Ct));
        // A wrong TOC digest is refused whatever the skip label says.
        wrong = await Assert.ThrowsAsync<LayerResolveException>(() =>
            lax.MountAsync(SkipVerify(lax.Labels("ours/nolabel", d2, "sha256:" + new string('0', 64))), Ct));
        Assert.Contains("does not match", wrong.Message);

        // disable_verification needs no label.
        await using var off = await LayerRig.StartAsync(new LayerOptions { DisableVerification = true });
        var d3 = await off.PushAsync("ours/nolabel", blob, Ct);
        mp = await off.MountAsync(off.Labels("ours/nolabel", d3, null), Ct);
        Assert.Equal("stargz\n", await File.ReadAllTextAsync(Path.Combine(mp, "etc/hostname"), Ct));
    }

    [Fact]
    public async Task ALayerThatCannotBeServedLazilyIsRefusedWithTheReasonAndNothingIsMounted()
    {
        await using var rig = await LayerRig.StartAsync(new LayerOptions { FetchingTimeout = TimeSpan.FromSeconds(3) });
        // A plain gzip layer (what docker build makes): no eStargz footer.
        var plainTar = new MemoryStream();
        using (var gz = new System.IO.Compression.GZipStream(plainTar, System.IO.Compression.CompressionLevel.Fastest, leaveOpen: true))
            gz.Write(RichTar());
        var plain = await rig.PushAsync("ours/plain", plainTar.ToArray(), Ct);
        var e = await Assert.ThrowsAsync<LayerResolveException>(() => rig.MountAsync(rig.Labels("ours/plain", plain, "sha256:" + new string('2', 64)), Ct));
        Assert.Contains("footer", e.Message);
        // A layer the registry does not have.
        var missing = await Assert.ThrowsAsync<LayerResolveException>(() =>
            rig.MountAsync(rig.Labels("ours/plain", "sha256:" + new string('3', 64), "sha256:" + new string('2', 64)), Ct));
        Assert.Contains("sha256:3333", missing.Message);
        // A registry that does not answer: refused within the fetching timeout, not hung.
        var (blob, built) = await LayerRig.BuildAsync(RichTar(), null, Ct);
        var digest = await rig.PushAsync("ours/away", blob, Ct);
        rig.Proxy.Down();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        await Assert.ThrowsAsync<LayerResolveException>(() => rig.MountAsync(rig.Labels("ours/away", digest, built.TocDigest), Ct));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(12), $"refused only after {sw.Elapsed}");
        Assert.Empty(Mounts.Under(rig.Dir.Path));
        Assert.Empty(rig.Manager.Layers);
        // Back again: the failed resolution was not remembered.
        rig.Proxy.Up();
        var mp = await rig.MountAsync(rig.Labels("ours/away", digest, built.TocDigest), Ct);
        Assert.Equal("stargz\n", await File.ReadAllTextAsync(Path.Combine(mp, "etc/hostname"), Ct));
    }
}
