using System.Security.Cryptography;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Every file of an eStargz image, read inside a running container (so through our FUSE layers and overlayfs), equals
/// the original file: same set of regular files, same bytes, same modes and sizes, same symlink targets. Checked for
/// an image converted by the reference ctr-remote and one converted by our converter.
/// </summary>
public class ContentEqualityTests
{
    private sealed record Entry(string HostPath, bool IsLink);

    [Fact]
    public async Task EveryFileReadThroughTheContainerRootfsEqualsTheOriginal()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var layers = WriteLayers(rig.Work.Path);
        var expected = Merge(layers);

        var src = await E2eHelpers.PushPlainAsync(rig, "e2e/content", layers);
        var byReference = await rig.Containerd.ConvertWithReferenceAsync(src, $"{rig.Registry.Host}/e2e/content:ctr-remote");
        var ours = $"{rig.Registry.Host}/e2e/content:ours";
        await E2eHelpers.ConvertWithOursAsync(src, ours, rig.Work.Sub("convert"), ct);
        await rig.ForgetImagesAsync(src, byReference);

        var mounted = 0;
        foreach (var (image, id) in new[] { (byReference, "content-ctr-remote"), (ours, "content-ours") })
        {
            var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);
            (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess($"rpull {image}");
            // The layers really are ours (lazy FUSE mounts), so the container reads through them.
            mounted += manifest.Count;
            Assert.Equal(mounted, rig.FuseMounts().Count);

            var output = await E2eHelpers.RunAsync(rig.Containerd, image, id, "/bin/sh", "-c",
                "find / -xdev -type f -exec sha256sum {} +; echo =====; " +
                "find / -xdev -type f -exec stat -c '%a %s %n' {} +; echo =====; " +
                "find / -xdev -type l -exec sh -c 'for f; do echo \"$f -> $(readlink \"$f\")\"; done' sh {} +");
            var parts = output.Split("=====\n");
            Assert.Equal(3, parts.Length);

            // Contents: exactly the image's regular files, each with the original bytes.
            var wantSums = expected.Where(e => !e.Value.IsLink).ToDictionary(
                e => e.Key, e => Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(e.Value.HostPath))));
            var gotSums = Lines(parts[0]).Select(l => l.Split("  ", 2)).ToDictionary(p => p[1], p => p[0]);
            Assert.Equal(wantSums.Keys.Order(StringComparer.Ordinal), gotSums.Keys.Order(StringComparer.Ordinal));
            foreach (var (path, sum) in wantSums.Select(kv => (kv.Key, kv.Value))) Assert.True(sum == gotSums[path], $"{image}: {path} differs from the original");

            // Modes and sizes of every regular file.
            var wantStat = expected.Where(e => !e.Value.IsLink).Select(e =>
            {
                var fi = new FileInfo(e.Value.HostPath);
                return $"{Convert.ToString((int)fi.UnixFileMode, 8)} {fi.Length} {e.Key}";
            }).Order(StringComparer.Ordinal);
            Assert.Equal(wantStat, Lines(parts[1]).Order(StringComparer.Ordinal));

            // Symlink targets.
            var wantLinks = expected.Where(e => e.Value.IsLink)
                .Select(e => $"{e.Key} -> {new FileInfo(e.Value.HostPath).LinkTarget}").Order(StringComparer.Ordinal);
            Assert.Equal(wantLinks, Lines(parts[2]).Order(StringComparer.Ordinal));
        }
    }

    private static IEnumerable<string> Lines(string s) =>
        s.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>busybox; a data layer with a multi-chunk file, modes, a symlink, a hardlink and a deep tree; a layer
    /// that overwrites one file and adds another.</summary>
    private static List<string> WriteLayers(string work)
    {
        var l1 = Path.Combine(work, "c-l1");
        var l2 = Path.Combine(work, "c-l2");
        var l3 = Path.Combine(work, "c-l3");
        TestImages.WriteBusybox(l1);
        var rng = new Random(7);
        byte[] Rand(int n) { var b = new byte[n]; rng.NextBytes(b); return b; }
        var data = Path.Combine(l2, "data");
        Directory.CreateDirectory(Path.Combine(data, "deep", "a", "b", "c"));
        File.WriteAllBytes(Path.Combine(data, "big.bin"), Rand(9 << 20)); // spans three 4 MiB chunks
        File.WriteAllText(Path.Combine(data, "small.txt"), "first version\n");
        File.WriteAllBytes(Path.Combine(data, "empty"), []);
                File.WriteAllText(Path.Combine(data, "deep", "a", "b", "c", "file.txt"), string.Concat(Enumerable.Repeat("compressible line\n", 5000)));
        File.WriteAllText(Path.Combine(data, "run.sh"), "#!/bin/sh\necho run\n");
        File.SetUnixFileMode(Path.Combine(data, "run.sh"), (UnixFileMode)Convert.ToInt32("750", 8));
        File.WriteAllBytes(Path.Combine(data, "secret"), Rand(1000));
        File.SetUnixFileMode(Path.Combine(data, "secret"), (UnixFileMode)Convert.ToInt32("600", 8));
        File.CreateSymbolicLink(Path.Combine(data, "link"), "deep/a/b/c/file.txt");
        link(Path.Combine(data, "big.bin"), Path.Combine(data, "hard.bin"));
        var data3 = Path.Combine(l3, "data");
        Directory.CreateDirectory(data3);
        File.WriteAllText(Path.Combine(data3, "small.txt"), "second version, from the top layer\n");
        File.WriteAllBytes(Path.Combine(data3, "new.bin"), Rand(300_000));
        return [l1, l2, l3];
    }

    /// <summary>The image's files as the merged rootfs shows them: path in the container → file in a layer dir.</summary>
    private static SortedDictionary<string, Entry> Merge(IReadOnlyList<string> layers)
    {
        var merged = new SortedDictionary<string, Entry>(StringComparer.Ordinal);
        foreach (var layer in layers)
        {
            foreach (var f in Directory.EnumerateFileSystemEntries(layer, "*", SearchOption.AllDirectories))
            {
                var info = new FileInfo(f);
                if (Directory.Exists(f) && info.LinkTarget == null) continue;
                var rel = "/" + Path.GetRelativePath(layer, f);
                merged[rel] = new Entry(f, info.LinkTarget != null);
            }
        }
        return merged;
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int link(string oldpath, string newpath);
}
