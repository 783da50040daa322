using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Fully fetched layers promoted to kernel EROFS, end to end on real parts: an image of several layers (owners, modes,
/// setuid, xattrs, hard links, symlinks, a fifo, a whiteout and an opaque dir across layers) converted by ctr-remote,
/// lazily pulled, fetched in the background and promoted; a new container's overlay lowerdirs are then erofs mounts and
/// its rootfs equals the same image unpacked by containerd's own overlayfs snapshotter; a container started before the
/// promotion keeps reading through FUSE; after a restart with the registry gone, a new container still starts.
/// </summary>
public class ErofsPromotionTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static async Task Run(params string[] cmd) => (await ProcessRunner.RunAsync(cmd[0], cmd[1..])).EnsureSuccess(string.Join(' ', cmd));

    /// <summary>busybox; a data layer with every kind of entry; then a whiteout layer and an opaque-dir layer (umoci).</summary>
    private static async Task<string> PushImageAsync(E2eRig rig)
    {
        var work = rig.Work.Path;
        var l1 = Path.Combine(work, "e-l1");
        var l2 = Path.Combine(work, "e-l2");
        var l3 = Path.Combine(work, "e-l3");
        TestImages.WriteBusybox(l1);
        var data = Path.Combine(l2, "data");
        Directory.CreateDirectory(Path.Combine(data, "opq", "sub"));
        Directory.CreateDirectory(Path.Combine(data, "home"));
        var rng = new Random(20);
        byte[] Rand(int n) { var b = new byte[n]; rng.NextBytes(b); return b; }
        File.WriteAllBytes(Path.Combine(data, "big.bin"), Rand(6 << 20)); // several chunks
        File.WriteAllBytes(Path.Combine(data, "tool"), Rand(50_000));
        await Run("chmod", "4755", Path.Combine(data, "tool"));
        await Run("ln", Path.Combine(data, "tool"), Path.Combine(data, "tool-again"));
        await Run("ln", "-s", "tool", Path.Combine(data, "tool-link"));
        await Run("ln", "-s", "/nowhere", Path.Combine(data, "dangling"));
        await Run("mkfifo", "-m", "0620", Path.Combine(data, "pipe"));
        File.WriteAllText(Path.Combine(data, "home", "notes"), "owned by a user\n");
        await Run("chown", "-R", "1000:1001", Path.Combine(data, "home"));
        await Run("chmod", "0750", Path.Combine(data, "home"));
        File.WriteAllText(Path.Combine(data, "tagged"), "has xattrs\n");
        await Run("setfattr", "-n", "user.purpose", "-v", "promotion-test", Path.Combine(data, "tagged"));
        File.WriteAllText(Path.Combine(data, "gone.txt"), "whited out by a later layer\n");
        File.WriteAllText(Path.Combine(data, "opq", "old"), "hidden by the opaque dir\n");
        File.WriteAllText(Path.Combine(data, "opq", "sub", "older"), "hidden too\n");
        File.WriteAllBytes(Path.Combine(data, "empty"), []);
        // The third layer replaces data/opq as an opaque dir.
        var newOpq = Path.Combine(l3, "opq");
        Directory.CreateDirectory(newOpq);
        File.WriteAllText(Path.Combine(newOpq, "fresh"), "the only file of the opaque dir\n");

        var layout = Path.Combine(work, "oci-erofs");
        await TestImages.BuildAsync(layout, "v1", [l1, l2]);
        var umoci = Requires.Command("umoci");
        (await ProcessRunner.RunAsync(umoci, ["insert", "--image", layout + ":v1", "--no-history", "--whiteout", "/data/gone.txt"])).EnsureSuccess("umoci whiteout");
        (await ProcessRunner.RunAsync(umoci, ["insert", "--image", layout + ":v1", "--no-history", "--opaque", newOpq, "/data/opq"])).EnsureSuccess("umoci opaque");
        await TestImages.PushAsync(layout, "v1", rig.Registry.Host, "e2e/erofs:v1");
        var src = $"{rig.Registry.Host}/e2e/erofs:v1";
        var dst = $"{rig.Registry.Host}/e2e/erofs:esgz";
        await rig.Containerd.ConvertWithReferenceAsync(src, dst);
        await rig.ForgetImagesAsync(src, dst);
        return dst;
    }

    /// <summary>The overlay options of the mount `ctr snapshots mounts` gives for snapshot <paramref name="key"/>.</summary>
    private static async Task<string> MountOptionsAsync(E2eRig rig, string snapshotter, string key)
    {
        var r = (await rig.Containerd.CtrAsync("snapshots", "--snapshotter", snapshotter, "mounts", "/x", key)).EnsureSuccess("ctr snapshots mounts");
        var line = r.StdOut.Trim();
        var at = line.IndexOf(" -o ", StringComparison.Ordinal);
        Assert.True(at > 0, $"no overlay options in: {line}");
        Assert.StartsWith("mount -t overlay", line);
        return line[(at + 4)..].Trim();
    }

    private static IEnumerable<string> LowerDirs(string options) =>
        options.Split(',').Single(o => o.StartsWith("lowerdir=", StringComparison.Ordinal))["lowerdir=".Length..].Split(':');

    /// <summary>Everything a user sees of a tree (the root itself excluded): names, types, modes, owners, link counts,
    /// whole-second mtimes, sizes and bytes of files, symlink targets, xattrs.</summary>
    private static async Task<string> DescribeAsync(string root)
    {
        // eStargz's landmark files are tar entries the lazy layer hides (as the reference does); overlayfs unpacks them.
        // So is the TOC (stargz.index.json), the layer's own index.
        string[] skip = ["-path", "./.no.prefetch.landmark", "-prune", "-o", "-path", "./.prefetch.landmark", "-prune", "-o",
            "-path", "./stargz.index.json", "-prune", "-o"];
        var find = (await ProcessRunner.RunAsync("sh", ["-c", "cd \"$1\" && shift && find . -mindepth 1 \"$@\" -printf '%P %y %m %U:%G n=%n t=%T@ l=%l\\n'",
            "sh", root, .. skip])).EnsureSuccess("find").StdOut;
        var lines = find.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l =>
        {
            var t = l.IndexOf(" t=", StringComparison.Ordinal);
            var sp = l.IndexOf(' ', t + 1);
            // Directories: no mtime. A layer that names a file but not its parent dir (umoci's whiteout layer) leaves
            // the dir's times to the unpacker: containerd's applier makes it at unpack time, the lazy layer says 0.
            if (l.Split(' ')[1] == "d") return l[..t] + l[sp..];
            // Whole seconds: the TOC keeps what the tar had; sub-second parts are not what this compares.
            var dot = l.IndexOf('.', t);
            return dot > 0 && dot < sp ? l[..dot] + l[sp..] : l;
        }).Order(StringComparer.Ordinal).ToList();
        var sums = (await ProcessRunner.RunAsync("sh", ["-c", "cd \"$1\" && shift && find . \"$@\" -type f -exec sha256sum {} + | sort", "sh", root, .. skip])).EnsureSuccess("sha256sum").StdOut;
        var sizes = (await ProcessRunner.RunAsync("sh", ["-c", "cd \"$1\" && shift && find . \"$@\" ! -type d -printf '%P %s\\n' | sort", "sh", root, .. skip])).EnsureSuccess("sizes").StdOut;
        var xattrs = (await ProcessRunner.RunAsync("sh", ["-c", "cd \"$1\" && getfattr -R -h -d -m - . 2>/dev/null; true", "sh", root])).StdOut;
        return string.Join('\n', lines) + "\n=====\n" + sums + "=====\n" + sizes + "=====\n" + xattrs;
    }

    private static async Task<string> MountCopyAsync(E2eRig rig, string snapshotter, string key, string target)
    {
        Directory.CreateDirectory(target);
        var options = await MountOptionsAsync(rig, snapshotter, key);
        await Run("mount", "-t", "overlay", "overlay", "-o", options, target);
        return options;
    }

    [Fact]
    public async Task PromotedLayersServeNewContainersFromErofsWithTheSameRootfsAsOverlayfsAndSurviveARestartWithoutTheRegistry()
    {
        Requires.Erofs();
        await using var rig = await E2eRig.StartAsync("[erofs]\npromote = true\n");
        var image = await PushImageAsync(rig);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);
        Assert.Equal(4, manifest.Count);
        (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess("ctr-remote rpull");
        Assert.Equal(manifest.Count, rig.FuseMounts().Count);

        // A container started before the promotion: its overlay stays over FUSE and keeps working after it.
        (await rig.Containerd.CtrAsync("run", "-d", "--snapshotter", "stargz", image, "erofs-early", "/bin/sleep", "3600")).EnsureSuccess("ctr run -d");

        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(240);
        while (await rig.MetricAsync("stargz_layers_promoted") < manifest.Count)
        {
            Assert.True(await rig.MetricAsync("stargz_erofs_promotion_failures") == 0, "a promotion failed:\n" + rig.Daemon.Log);
            Assert.True(DateTime.UtcNow < deadline, "the layers were not all promoted within 240 s:\n" + rig.Daemon.Log);
            await Task.Delay(500, Ct);
        }
        Assert.True(await rig.MetricAsync("stargz_erofs_promoted_bytes") > 6 << 20);
        var early = (await rig.Containerd.CtrAsync("tasks", "exec", "--exec-id", "read", "erofs-early", "/bin/sh", "-c", "cat /data/tool-again | wc -c")).EnsureSuccess("exec in the early container");
        Assert.Equal("50000", early.StdOut.Trim());

        // A new container: every lowerdir of its rootfs is an erofs mount (read in the container's own mountinfo).
        var mountinfo = await E2eHelpers.RunAsync(rig.Containerd, image, "erofs-new", "/bin/cat", "/proc/self/mountinfo");
        var root = mountinfo.Split('\n').Single(l => l.Split(' ') is { Length: > 4 } f && f[4] == "/");
        var lowers = LowerDirs(root[(root.LastIndexOf(' ') + 1)..]).ToList();
        Assert.Equal(manifest.Count, lowers.Count);
        var hostMounts = Mounts.List();
        foreach (var dir in lowers)
            Assert.True(hostMounts.LastOrDefault(m => m.MountPoint == dir)?.FsType == "erofs", $"lowerdir {dir} is not an erofs mount: {hostMounts.LastOrDefault(m => m.MountPoint == dir)}");

        // Its rootfs equals the image unpacked by containerd's overlayfs snapshotter.
        (await rig.Containerd.CtrAsync("images", "pull", "--plain-http", "--snapshotter", "overlayfs", image)).EnsureSuccess("ctr pull (overlayfs)");
        (await rig.Containerd.CtrAsync("containers", "create", "--snapshotter", "stargz", image, "erofs-view-ours")).EnsureSuccess("create (stargz)");
        (await rig.Containerd.CtrAsync("containers", "create", "--snapshotter", "overlayfs", image, "erofs-view-ovl")).EnsureSuccess("create (overlayfs)");
        var ours = rig.Work.Sub("rootfs-ours");
        var theirs = rig.Work.Sub("rootfs-overlayfs");
        string want, got;
        try
        {
            var opts = await MountCopyAsync(rig, "stargz", "erofs-view-ours", ours);
            foreach (var dir in LowerDirs(opts))
                Assert.True(Mounts.List().LastOrDefault(m => m.MountPoint == dir)?.FsType == "erofs", $"lowerdir {dir} of a new snapshot is not erofs");
            await MountCopyAsync(rig, "overlayfs", "erofs-view-ovl", theirs);
            want = await DescribeAsync(theirs);
            got = await DescribeAsync(ours);
        }
        finally
        {
            foreach (var mp in new[] { ours, theirs })
                await ProcessRunner.RunAsync("umount", [mp]);
        }
        if (want != got)
        {
            await File.WriteAllTextAsync("/tmp/erofs-e2e-want.txt", want, Ct);
            await File.WriteAllTextAsync("/tmp/erofs-e2e-got.txt", got, Ct);
        }
        Assert.Equal(want, got);
        // The comparison covered what it claims: the whiteout, the opaque dir, the xattr, owners, setuid, hard links.
        Assert.DoesNotContain("data/gone.txt", got);
        Assert.DoesNotContain("data/opq/old", got);
        Assert.Contains("data/opq/fresh f", got);
        Assert.Contains("user.purpose=\"promotion-test\"", got);
        Assert.Contains("data/home d 750 1000:1001", got);
        Assert.Contains("data/tool f 4755 0:0 n=2", got);
        Assert.Contains("data/pipe p 620", got);
        Assert.Contains("data/tool-link l 777 0:0 n=1 t=", got);

        // Restart with the registry gone: the promoted layers come back from their images and a new container starts.
        await rig.Containerd.CtrAsync("tasks", "rm", "-f", "erofs-early");
        await rig.Containerd.CtrAsync("containers", "rm", "erofs-early", "erofs-view-ours", "erofs-view-ovl");
        await rig.Registry.DisposeAsync();
        await rig.Daemon.StopAsync();
        await rig.Daemon.RestartAsync();
        deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while ((await rig.Containerd.CtrAsync("snapshots", "--snapshotter", "stargz", "ls")).ExitCode != 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "containerd did not reach the restarted daemon");
            await Task.Delay(500, Ct);
        }
        var after = await E2eHelpers.RunAsync(rig.Containerd, image, "erofs-after", "/bin/sh", "-c", "sha256sum /data/big.bin; cat /proc/self/mountinfo");
        Assert.Contains("/data/big.bin", after);
        var root2 = after.Split('\n').Single(l => l.Split(' ') is { Length: > 4 } f && f[4] == "/");
        foreach (var dir in LowerDirs(root2[(root2.LastIndexOf(' ') + 1)..]))
            Assert.True(Mounts.List().LastOrDefault(m => m.MountPoint == dir)?.FsType == "erofs", $"after the restart, lowerdir {dir} is not erofs");
        Assert.Empty(rig.FuseMounts());
        Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "from its EROFS image"));
    }

    /// <summary>Bytes of the daemon's layer files: chunks, copies, temp files, TOCs and EROFS images (evicted ones still held too).</summary>
    private static long DiskBytes(string root)
    {
        long n = 0;
        foreach (var sub in new[] { "cache", "toc", "erofs" })
        {
            var d = Path.Combine(root, "stargz", sub);
            if (!Directory.Exists(d)) continue;
            var files = sub == "erofs" ? Directory.EnumerateFiles(d) : Directory.EnumerateFiles(d, "*", SearchOption.AllDirectories); // not erofs/mnt
            foreach (var f in files)
            {
                try { n += new FileInfo(f).Length; }
                catch (FileNotFoundException) { }
            }
        }
        return n;
    }

    private static Dictionary<string, string> Sums(string stdout) => stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries)
        .Select(l => l.Split(' ', 2, StringSplitOptions.TrimEntries)).Where(f => f.Length == 2 && f[1].EndsWith(".bin", StringComparison.Ordinal))
        .ToDictionary(f => f[1], f => f[0]);

    /// <summary>
    /// Issue 20's disk rule on real containerd: under max_disk_mb, image A's layers are promoted; image B's data layer,
    /// once fully fetched, needs room for its image, and A's images (the least recently mounted, no container on them)
    /// are evicted for it. A's layer goes back to lazy FUSE: a new container on A reads the right bytes, fetched from the
    /// registry again, with its data layer on FUSE; the disk use sampled all along stays within the budget plus one batch.
    /// </summary>
    [Fact]
    public async Task APromotedImageIsEvictedForAnotherUnderTheBudgetAndANewContainerOnItReadsRightBytesLazily()
    {
        Requires.Erofs();
        const int budgetMb = 34;
        await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 300, backgroundFetch: true, extraToml: $"""
            [directory_cache]
            max_disk_mb = {budgetMb}
            [erofs]
            promote = true
            """);
        var a = await rig.PushImageAsync("evict/a", new Dictionary<string, int> { ["a0.bin"] = 5 << 10, ["a1.bin"] = 5 << 10 }, seed: 2031,
            "--estargz-chunk-size", "262144");
        var b = await rig.PushImageAsync("evict/b", new Dictionary<string, int> { ["b0.bin"] = 4 << 10, ["b1.bin"] = 4 << 10, ["b2.bin"] = 4 << 10 },
            seed: 2032, "--estargz-chunk-size", "262144");
        long max = 0;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        var sampler = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                max = Math.Max(max, DiskBytes(rig.DaemonRoot));
                try { await Task.Delay(50, stop.Token); } catch (OperationCanceledException) { }
            }
        }, Ct);
        async Task WaitAsync(string what, Func<Task<bool>> done)
        {
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(240);
            while (!await done())
            {
                Assert.True(DateTime.UtcNow < deadline, $"{what} within 240 s:\n{rig.Daemon.Log}");
                await Task.Delay(500, Ct);
            }
        }

        // A: both layers promoted (its container ran and is gone).
        await rig.RpullAsync(a.Estargz);
        var first = (await rig.RunAsync(a.Estargz, "evict-a1", "cd /data && sha256sum *.bin")).EnsureSuccess("run on A");
        Assert.Equal(a.Sha256, Sums(first.StdOut));
        await WaitAsync("A's two layers were not promoted", async () => await rig.MetricAsync("stargz_layers_promoted") >= 2);
        var fetchedBefore = await rig.MetricAsync("stargz_layer_fetched_bytes");

        // B: its layers fit beside A's images, but its data layer's image does not: A's images (the least recently
        // mounted) make room for it. A's layers then fetch again in the background, but its data layer's image does not
        // fit beside B's: it stays on FUSE.
        await rig.RpullAsync(b.Estargz);
        var second = (await rig.RunAsync(b.Estargz, "evict-b1", "cd /data && sha256sum *.bin")).EnsureSuccess("run on B");
        Assert.Equal(b.Sha256, Sums(second.StdOut));
        await WaitAsync("B's data layer was not promoted in place of A's", async () =>
            await rig.MetricAsync("stargz_erofs_image_evictions") >= 1 && await rig.MetricAsync("stargz_erofs_promotions") >= 3);
        Assert.True(await rig.MetricAsync("stargz_layers_promoted") < 4, "A's layers are all still promoted");
        Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "served lazily through FUSE again"));
        Assert.Empty(Directory.GetFiles(Path.Combine(rig.DaemonRoot, "stargz", "erofs"), "*.evicted-*")); // nothing held it: deleted

        // A new container on A: right bytes, its data layer on FUSE, fetched from the registry again.
        var third = (await rig.RunAsync(a.Estargz, "evict-a2", "cd /data && sha256sum *.bin; cat /proc/self/mountinfo")).EnsureSuccess("run on A again");
        Assert.Equal(a.Sha256, Sums(third.StdOut));
        var root = third.StdOut.Split('\n').Single(l => l.Split(' ') is { Length: > 4 } f && f[4] == "/");
        var types = LowerDirs(root[(root.LastIndexOf(' ') + 1)..]).Select(d => Mounts.List().LastOrDefault(m => m.MountPoint == d)?.FsType).ToList();
        Assert.Contains(types, t => t != null && t.StartsWith("fuse", StringComparison.Ordinal));
        var fetched = await rig.MetricAsync("stargz_layer_fetched_bytes") - fetchedBefore;
        Assert.True(fetched >= (12 + 10) * 0.95 * (1 << 20), $"{fetched} bytes fetched since A was promoted: B's 12 MiB and A's 10 MiB again expected");
        stop.Cancel();
        await sampler;
        Assert.True(max <= ((long)budgetMb << 20) + (4 << 20), $"the daemon's layer files took {max} bytes; budget {budgetMb} MiB");
        TestContext.Current.TestOutputHelper?.WriteLine($"disk peak {max} bytes (budget {budgetMb} MiB), {fetched} bytes fetched after A's promotion");
    }
}
