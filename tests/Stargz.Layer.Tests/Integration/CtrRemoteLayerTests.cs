using System.IO.Compression;
using System.Runtime.InteropServices;
using System.Text;
using Stargz.Layer.Tests.Support;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// An image built from local files (umoci), pushed to a real registry, converted to eStargz by the reference
/// ctr-remote, and each converted layer mounted by our <see cref="LayerManager"/>: the mount must equal the
/// original (unconverted) layer tar, and the layers stacked in a real overlayfs must apply their whiteouts.
/// </summary>
public class CtrRemoteLayerTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [DllImport("libc", SetLastError = true)]
    private static extern int mknod([MarshalAs(UnmanagedType.LPUTF8Str)] string path, uint mode, ulong dev);

    [DllImport("libc", SetLastError = true)]
    private static extern int link([MarshalAs(UnmanagedType.LPUTF8Str)] string target, [MarshalAs(UnmanagedType.LPUTF8Str)] string name);

    [DllImport("libc", SetLastError = true)]
    private static extern int lchown([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int uid, int gid);

    [DllImport("libc", SetLastError = true)]
    private static extern int lsetxattr([MarshalAs(UnmanagedType.LPUTF8Str)] string path, [MarshalAs(UnmanagedType.LPUTF8Str)] string name,
        byte[] value, nint size, int flags);

    private static readonly DateTime T = new(2022, 1, 2, 3, 4, 5, DateTimeKind.Utc);

    private static void Write(string root, string rel, byte[] data, int mode = 0x1A4 /* 0644 */)
    {
        var p = Path.Combine(root, rel);
        Directory.CreateDirectory(Path.GetDirectoryName(p)!);
        File.WriteAllBytes(p, data);
        File.SetUnixFileMode(p, (UnixFileMode)mode);
        File.SetLastWriteTimeUtc(p, T.AddMinutes(rel.Length));
    }

    private static void MakeLowerLayer(string root)
    {
        Write(root, "etc/os-release", "NAME=stargz-test\n"u8.ToArray());
        Write(root, "usr/bin/app", TestTars.Random(9_000_000, 21), 0x1ED /* 0755 */); // several 4 MiB chunks
        Write(root, "usr/lib/libfoo.so.1", TestTars.Random(200_000, 22));
        File.CreateSymbolicLink(Path.Combine(root, "usr/lib/libfoo.so"), "libfoo.so.1");
        Assert.Equal(0, link(Path.Combine(root, "usr/bin/app"), Path.Combine(root, "usr/bin/app-alias")));
        Write(root, "srv/owned", "owned by 1234:5678\n"u8.ToArray(), 0x1A0 /* 0640 */);
        Assert.Equal(0, lchown(Path.Combine(root, "srv/owned"), 1234, 5678));
        Write(root, "srv/setuid", "#!/bin/sh\n"u8.ToArray(), 0x9ED /* 04755 */);
        Write(root, "var/cache/app/stale.db", TestTars.Random(50_000, 23));
        Write(root, "var/log/old.log", "old log\n"u8.ToArray());
        Write(root, "home/empty-file", []);
        Directory.CreateDirectory(Path.Combine(root, "tmp"));
        File.SetUnixFileMode(Path.Combine(root, "tmp"), (UnixFileMode)0x3FF | UnixFileMode.StickyBit);
        Directory.CreateDirectory(Path.Combine(root, "dev"));
        Assert.Equal(0, mknod(Path.Combine(root, "dev/zero"), 0x2000 | 0x1B6, (1 << 8) | 5));
        Assert.Equal(0, mknod(Path.Combine(root, "dev/fifo"), 0x1000 | 0x180, 0));
        var tagged = Path.Combine(root, "etc/os-release");
        if (lsetxattr(tagged, "user.stargz.note", "hello"u8.ToArray(), 5, 0) != 0)
            TestContext.Current.TestOutputHelper?.WriteLine("user xattrs not supported on the temp dir; the xattr check is weaker");
    }

    private static void MakeUpperLayer(string root, string freshDir)
    {
        Write(root, "etc/motd", "welcome\n"u8.ToArray());
        Write(freshDir, "fresh.db", "fresh\n"u8.ToArray());
    }

    private static async Task Umoci(params string[] args) =>
        (await ProcessRunner.RunAsync(Requires.Command("umoci"), args)).EnsureSuccess("umoci " + string.Join(' ', args));

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task LayersConvertedByCtrRemoteMountAsTheirOriginalTarsAndStackInOverlayfs(bool zstdChunked)
    {
        Requires.Fuse();
        Requires.Command("ctr-remote");
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true });
        var lowerDir = rig.Dir.Sub("src-lower");
        var upperDir = rig.Dir.Sub("src-upper");
        var freshDir = rig.Dir.Sub("src-fresh");
        MakeLowerLayer(lowerDir);
        MakeUpperLayer(upperDir, freshDir);
        var layout = Path.Combine(rig.Dir.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [lowerDir, upperDir]);
        // umoci refuses .wh.* files in a source dir; it writes whiteouts and opaque markers itself (one layer each).
        await Umoci("insert", "--image", layout + ":v1", "--no-history", "--whiteout", "/var/log/old.log");
        await Umoci("insert", "--image", layout + ":v1", "--no-history", "--opaque", freshDir, "/var/cache/app");
        await TestImages.PushAsync(layout, "v1", rig.Registry.Host, "ref/app:v1");
        await using (var ctd = await LocalContainerd.StartAsync())
            await ctd.ConvertWithReferenceAsync($"{rig.Registry.Host}/ref/app:v1", $"{rig.Registry.Host}/ref/app:esgz", zstdChunked);

        var src = await rig.Client.ResolveAsync(ImageReference.Parse($"{rig.Registry.Host}/ref/app:v1"), null, Ct);
        var dst = await rig.Client.ResolveAsync(ImageReference.Parse($"{rig.Registry.Host}/ref/app:esgz"), null, Ct);
        Assert.Equal(4, src.Layers.Count);
        Assert.Equal(4, dst.Layers.Count);
        var layers = string.Join(",", dst.Layers.Select(l => l.Digest));
        var mounts = new List<string>();
        for (var i = 0; i < src.Layers.Count; i++)
        {
            var original = await rig.Client.FetchBlobBytesAsync(ImageReference.Parse($"{rig.Registry.Host}/ref/app:v1"), src.Layers[i].Digest, 64 << 20, Ct);
            var tar = new MemoryStream();
            using (var gz = new GZipStream(new MemoryStream(original), CompressionMode.Decompress)) await gz.CopyToAsync(tar, Ct);
            tar.Position = 0;
            var expected = TreeModel.FromTar(tar);

            var l = dst.Layers[i];
            var toc = l.Annotation(Stargz.Estargz.SnapshotLabels.TocDigest);
            Assert.NotNull(toc);
            var mp = await rig.MountAsync(rig.Labels("ref/app", l.Digest, toc, layers), Ct);
            mounts.Add(mp);
            var actual = TreeModel.FromDirectory(mp);
            OurBuilderLayerTests.LandmarkIsHidden(actual, mp);
            Assert.True(TreeModel.Diff(expected, actual) == "", $"layer {i}:\n" + TreeModel.Diff(expected, actual));
            Assert.Equal(0, rig.Manager.GetLayer(mp)!.Stats.Snapshot().Errors);
        }
        var lower = TreeModel.FromDirectory(mounts[0]);
        Assert.Equal(2u, lower["usr/bin/app"].NLink);
        Assert.Equal(1234u, lower["srv/owned"].Uid);
        Assert.Equal('c', lower["dev/zero"].Type);
        Assert.Equal('p', lower["dev/fifo"].Type);

        var whiteouts = TreeModel.FromDirectory(mounts[2]);
        Assert.Equal('c', whiteouts["var/log/old.log"].Type);
        var opaque = TreeModel.FromDirectory(mounts[3]);
        Assert.Contains("trusted.overlay.opaque=", opaque["var/cache/app"].Xattrs);

        var merged = rig.Dir.Sub("merged");
        mounts.Reverse();
        (await ProcessRunner.RunAsync("mount", ["-t", "overlay", "overlay", "-o", $"lowerdir={string.Join(':', mounts)}", merged]))
            .EnsureSuccess("mount overlay");
        try
        {
            Assert.False(File.Exists(Path.Combine(merged, "var/log/old.log")), "the whiteout did not hide var/log/old.log");
            Assert.Equal(["fresh.db"], Directory.GetFileSystemEntries(Path.Combine(merged, "var/cache/app")).Select(Path.GetFileName).ToArray());
            Assert.Equal("NAME=stargz-test\n", await File.ReadAllTextAsync(Path.Combine(merged, "etc/os-release"), Ct));
            Assert.Equal("welcome\n", await File.ReadAllTextAsync(Path.Combine(merged, "etc/motd"), Ct));
            Assert.Equal(TestTars.Random(9_000_000, 21), await File.ReadAllBytesAsync(Path.Combine(merged, "usr/bin/app"), Ct));
        }
        finally
        {
            await ProcessRunner.RunAsync("umount", [merged]);
        }
    }
}
