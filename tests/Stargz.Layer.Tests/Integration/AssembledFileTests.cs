using Stargz.Estargz;
using Stargz.Fuse;
using Stargz.Layer.Tests.Support;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Integration;

/// <summary>
/// Passthrough for files of more than one chunk: once all of a file's chunks are verified on disk, an open has a
/// whole-file copy built in the background, and later opens hand the kernel that copy, so their reads skip the daemon.
/// Real registry, real FUSE mount with passthrough on.
/// </summary>
public class AssembledFileTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static readonly FuseMountOptions PassthroughMount = new() { AllowOther = true, Passthrough = true };

    private sealed record Setup(LayerRig Rig, string Mp, FuseServer Server, RemoteLayer Layer, byte[] Big, byte[] Other, string BigDigest);

    /// <summary>big.bin (6 MiB + a bit, 7 chunks) prefetched, so verified on disk; other.bin (9 chunks) not.</summary>
    private static async Task<Setup> MountAsync(LayerRig rig, string repo)
    {
        var big = TestTars.Random((6 << 20) + 12345, 81);
        var other = TestTars.Random((8 << 20) + 999, 82);
        var tar = TestTars.Write(w =>
        {
            TestTars.File(w, "big.bin", big);
            TestTars.File(w, "other.bin", other);
        });
        var (blob, built) = await LayerRig.BuildAsync(tar, new BuildOptions
        {
            ChunkSize = 1 << 20, CompressionLevel = 1, Prioritized = ["big.bin"],
        }, Ct);
        var digest = await rig.PushAsync(repo, blob, Ct);
        var mp = await rig.MountAsync(rig.Labels(repo, digest, built.TocDigest), Ct);
        var layer = rig.Manager.GetLayer(mp)!;
        await layer.BackgroundWork.WaitAsync(TimeSpan.FromSeconds(60), Ct);
        await layer.Fetcher.DrainAsync();
        Assert.Equal(FetchStageState.Done, layer.Stats.Snapshot().Prefetch);
        var server = rig.Manager.ServerOf(mp)!;
        Assert.True(server.PassthroughNegotiated, "kernel did not negotiate FUSE passthrough");
        var bigDigest = layer.FileSystem.Resolve("big.bin")!.Node!.Entry.Digest!;
        return new Setup(rig, mp, server, layer, big, other, bigDigest);
    }

    private static byte[] ReadAll(string path, int length)
    {
        var buf = new byte[length];
        using var h = File.OpenHandle(path);
        for (int off = 0; off < length;)
        {
            int n = RandomAccess.Read(h, buf.AsSpan(off, Math.Min(1 << 20, length - off)), off);
            Assert.True(n > 0, $"short read at {off} of {path}");
            off += n;
        }
        return buf;
    }

    /// <summary>
    /// Opens, reads and closes the file until an open of it is answered with a backing file; the kernel releases
    /// earlier opens asynchronously, and an inode with a page-cache open still running cannot switch to passthrough.
    /// Returns the READs that reached the daemon during that open.
    /// </summary>
    private static async Task<long> ReadUntilPassthroughAsync(Setup s, string name, byte[] expected)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (true)
        {
            var opens = s.Server.PassthroughOpens;
            var reads = s.Server.ReadRequests;
            Assert.Equal(expected, ReadAll(Path.Combine(s.Mp, name), expected.Length));
            if (s.Server.PassthroughOpens > opens) return s.Server.ReadRequests - reads;
            Assert.True(DateTime.UtcNow < deadline, $"no open of {name} was answered with a backing file within 10 s");
            await Task.Delay(50, Ct);
        }
    }

    [Fact]
    public async Task AFileWhoseChunksAreAllVerifiedGetsAWholeFileCopyAndLaterOpensReadItThroughPassthrough()
    {
        Requires.PassthroughKernel();
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true }, PassthroughMount);
        var s = await MountAsync(rig, "assembled/a");
        var files = rig.Manager.Files!;

        // First open: the chunks are verified on disk, no copy yet: served by the daemon, and the copy is built.
        var readsBefore = s.Server.ReadRequests;
        Assert.Equal(s.Big, ReadAll(Path.Combine(s.Mp, "big.bin"), s.Big.Length));
        Assert.True(s.Server.ReadRequests > readsBefore, "the first open did not go through the daemon");
        await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        Assert.Equal(1, files.Built);
        var copy = files.TrustedPath(s.BigDigest);
        Assert.NotNull(copy);
        Assert.Equal(s.Big, await File.ReadAllBytesAsync(copy, Ct));

        // A later open gets the copy as its backing file: none of its reads reaches the daemon.
        Assert.Equal(0, await ReadUntilPassthroughAsync(s, "big.bin", s.Big));

        // A file whose chunks are not all on disk gets no copy: reading its first 4 KiB (and the kernel's readahead,
        // well under 8 MiB) leaves most of its chunks unfetched.
        var part = new byte[4096];
        using (var h = File.OpenHandle(Path.Combine(s.Mp, "other.bin"))) Assert.Equal(part.Length, RandomAccess.Read(h, part, 0));
        Assert.Equal(s.Other.AsSpan(0, part.Length).ToArray(), part);
        using (File.OpenHandle(Path.Combine(s.Mp, "other.bin"))) { }
        await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        Assert.Equal(1, files.Built);
        Assert.Equal(0, files.Failed);

        // Releasing the layer (its snapshot was removed) deletes the copies no other layer has.
        await rig.Manager.ReleaseAsync(s.Mp, Ct);
        Assert.False(File.Exists(copy), "the released layer's whole-file copy is still on disk");
    }

    [Fact]
    public async Task AfterARestartACopyIsHashedBeforeUseAndAWrongOneIsRebuiltFromTheChunks()
    {
        Requires.PassthroughKernel();
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true }, PassthroughMount);
        var s = await MountAsync(rig, "assembled/restart");
        Assert.Equal(s.Big, ReadAll(Path.Combine(s.Mp, "big.bin"), s.Big.Length));
        await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        var copy = rig.Manager.Files!.TrustedPath(s.BigDigest)!;

        // A restarted daemon finds the copy and checks it on the file's first open; the next open uses it.
        await rig.RestartManagerAsync();
        s = await MountAsync(rig, "assembled/restart");
        var files = rig.Manager.Files!;
        Assert.True(files.HasUncheckedCopy(s.BigDigest));
        Assert.Null(files.TrustedPath(s.BigDigest));
        Assert.Equal(s.Big, ReadAll(Path.Combine(s.Mp, "big.bin"), s.Big.Length));
        await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        Assert.Equal((1, 0, 0), (files.Reused, files.Built, files.Rejected));
        Assert.Equal(0, await ReadUntilPassthroughAsync(s, "big.bin", s.Big));

        // The same with a copy altered while the daemon was down: it is found wrong, deleted and built again from the
        // chunk files (hashed as a whole on the way), and passthrough serves the right bytes.
        await rig.RestartManagerAsync();
        var bad = (byte[])s.Big.Clone();
        bad[5 << 20] ^= 0xFF;
        await File.WriteAllBytesAsync(copy, bad, Ct);
        s = await MountAsync(rig, "assembled/restart");
        files = rig.Manager.Files!;
        Assert.Equal(s.Big, ReadAll(Path.Combine(s.Mp, "big.bin"), s.Big.Length));
        await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
        Assert.Equal((0, 1, 1), (files.Reused, files.Built, files.Rejected));
        Assert.Equal(s.Big, await File.ReadAllBytesAsync(copy, Ct));
        Assert.Equal(0, await ReadUntilPassthroughAsync(s, "big.bin", s.Big));
    }

    [Fact]
    public async Task WithoutPassthroughNoCopyIsMade()
    {
        Requires.Fuse();
        await using var rig = await LayerRig.StartAsync(new LayerOptions { NoBackgroundFetch = true },
            new FuseMountOptions { AllowOther = true, Passthrough = false });
        Assert.Null(rig.Manager.Files);
        var big = TestTars.Random((3 << 20) + 5, 83);
        var (blob, built) = await LayerRig.BuildAsync(TestTars.Write(w => TestTars.File(w, "big.bin", big)),
            new BuildOptions { ChunkSize = 1 << 20, CompressionLevel = 1, Prioritized = ["big.bin"] }, Ct);
        var digest = await rig.PushAsync("assembled/off", blob, Ct);
        var mp = await rig.MountAsync(rig.Labels("assembled/off", digest, built.TocDigest), Ct);
        Assert.Equal(big, ReadAll(Path.Combine(mp, "big.bin"), big.Length));
        Assert.Equal(big, ReadAll(Path.Combine(mp, "big.bin"), big.Length));
        Assert.False(Directory.Exists(Path.Combine(rig.Options.CacheDirectory!, "files")), "a copy directory was made without passthrough");
    }

    [Fact]
    public async Task WithTheCacheOnOverlayfsTheKernelRefusesTheCopyOnceAndNoMoreCopiesAreBuilt()
    {
        // As under kind or docker-in-docker, where the daemon's root is on overlayfs: a backing file there is too
        // deep for passthrough (the FUSE mount's max_stack_depth is 1).
        Requires.PassthroughKernel();
        Requires.Root();
        using var dir = new TempDir("assembled-ovl");
        var merged = dir.Sub("merged");
        (await ProcessRunner.RunAsync("mount", "-t", "overlay", "overlay", "-o",
            $"lowerdir={dir.Sub("lower")},upperdir={dir.Sub("upper")},workdir={dir.Sub("work")}", merged)).EnsureSuccess("mount overlay");
        try
        {
            await using var rig = await LayerRig.StartAsync(
                new LayerOptions { NoBackgroundFetch = true, CacheDirectory = Path.Combine(merged, "cache") }, PassthroughMount);
            var s = await MountAsync(rig, "assembled/ovl");
            var files = rig.Manager.Files!;
            Assert.Equal(s.Big, ReadAll(Path.Combine(s.Mp, "big.bin"), s.Big.Length));
            await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
            Assert.Equal(1, files.Built);

            // A later open offers the copy (once the kernel has released the earlier page-cache opens); the kernel
            // refuses it (ELOOP), the file is read through the daemon, and passthrough is off for the mount.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            do
            {
                Assert.Equal(s.Big, ReadAll(Path.Combine(s.Mp, "big.bin"), s.Big.Length));
                if (s.Server.PassthroughUsable) await Task.Delay(50, Ct);
            } while (s.Server.PassthroughUsable && DateTime.UtcNow < deadline);
            Assert.False(s.Server.PassthroughUsable, "the kernel never refused the copy on overlayfs");
            Assert.Equal(0, s.Server.PassthroughOpens);

            // No more copies: other.bin, once all its chunks are verified on disk, gets none.
            Assert.Equal(s.Other, ReadAll(Path.Combine(s.Mp, "other.bin"), s.Other.Length));
            await s.Layer.Fetcher.DrainAsync();
            Assert.Equal(s.Other, ReadAll(Path.Combine(s.Mp, "other.bin"), s.Other.Length));
            await s.Layer.FileSystem.LastAssembly.WaitAsync(TimeSpan.FromSeconds(30), Ct);
            Assert.Equal(1, files.Built);
            await rig.Manager.UnmountAsync(s.Mp, Ct);
        }
        finally
        {
            await ProcessRunner.RunAsync("umount", merged);
        }
    }
}
