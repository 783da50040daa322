using System.Text.RegularExpressions;
using Stargz.Estargz;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// `stargz image optimize` on the real registry, containerd 1.6 and runc: the workload runs once, the files it opens
/// are recorded and land before `.prefetch.landmark` in their layers (a layer with none of them gets
/// `.no.prefetch.landmark`), and a cold start of the optimized image through our daemon asks the registry for fewer
/// ranges than the same image converted without a record, for the same command.
/// </summary>
public class OptimizeTests
{
    private const string Workload = "cat /data/f0.bin /data/f2.bin /data/f4.bin /data/f6.bin /data/f8.bin /data/f10.bin > /dev/null";

    private sealed class Rig : IAsyncDisposable
    {
        public required LocalRegistry Registry { get; init; }
        public required LocalDaemon Daemon { get; init; }
        public required LocalContainerd Containerd { get; init; }
        public required TempDir Work { get; init; }

        public async ValueTask DisposeAsync()
        {
            await Containerd.DisposeAsync();
            await Daemon.DisposeAsync();
            await Registry.DisposeAsync();
            Work.Dispose();
        }
    }

    /// <summary>Prefetch on (it is what the landmark is for), background fetch off: the registry's log then holds
    /// only what a cold start needed (mount, prefetch, on-demand reads).</summary>
    private static async Task<Rig> StartAsync()
    {
        Requires.Fuse();
        Requires.Root();
        var work = new TempDir("optimize");
        var registry = await LocalRegistry.StartAsync();
        LocalDaemon? daemon = null;
        try
        {
            daemon = await LocalDaemon.StartAsync("noprefetch = false\nno_background_fetch = true\n");
            var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
            return new Rig { Registry = registry, Daemon = daemon, Containerd = ctd, Work = work };
        }
        catch
        {
            if (daemon != null) await daemon.DisposeAsync();
            await registry.DisposeAsync();
            work.Dispose();
            throw;
        }
    }

    /// <summary>Three layers: busybox; /data with twelve 24 KiB files of random bytes (the workload reads every
    /// other one); /other with a file nobody reads. Pushed as NAME:v1 (plain gzip); returns the reference.</summary>
    private static async Task<string> PushSourceAsync(Rig rig, string name)
    {
        var root = rig.Work.Sub("img");
        string l1 = Path.Combine(root, "l1"), l2 = Path.Combine(root, "l2"), l3 = Path.Combine(root, "l3");
        TestImages.WriteBusybox(l1);
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        Directory.CreateDirectory(Path.Combine(l3, "other"));
        var rng = new Random(42);
        for (int i = 0; i < 12; i++)
        {
            var bytes = new byte[24 * 1024];
            rng.NextBytes(bytes);
            await File.WriteAllBytesAsync(Path.Combine(l2, "data", $"f{i}.bin"), bytes);
        }
        var other = new byte[64 * 1024];
        rng.NextBytes(other);
        await File.WriteAllBytesAsync(Path.Combine(l3, "other", "unread.bin"), other);
        var layout = Path.Combine(root, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1, l2, l3], cmd: ["/bin/sh", "-c", Workload]);
        await TestImages.PushAsync(layout, "v1", rig.Registry.Host, $"{name}:v1");
        return $"{rig.Registry.Host}/{name}:v1";
    }

    private static RegistryClient PlainClient(string host)
    {
        var hosts = new RegistryHostsConfig();
        hosts.Set(host, new HostConfig { Origin = new EndpointConfig { Host = host, PlainHttp = true } });
        return new RegistryClient(hosts, new DockerConfigCredentialProvider());
    }

    /// <summary>The TOC entry names of every layer of <paramref name="image"/>, in blob order.</summary>
    private static async Task<List<List<string>>> TocNamesAsync(string image, CancellationToken ct)
    {
        var reference = ImageReference.Parse(image);
        using var client = PlainClient(reference.Host);
        var manifest = await client.ResolveAsync(reference, ct: ct);
        var layers = new List<List<string>>();
        foreach (var l in manifest.Layers)
        {
            var blob = await client.FetchBlobBytesAsync(reference, l.Digest, 64 << 20, ct);
            var reader = await EstargzReader.OpenAsync(new ByteArrayBlobSource(blob), ct: ct);
            var names = new List<string>();
            foreach (var e in reader.Toc.Entries)
                if (names.Count == 0 || names[^1] != e.Name) names.Add(e.Name); // one name per file, not per chunk
            layers.Add(names);
        }
        return layers;
    }

    /// <summary>Blob range requests of a cold start (rpull through the counting proxy, then the workload in a new
    /// container), less the mount's reads of each blob's tail (footer + TOC) and one-byte health checks.</summary>
    private static async Task<(int Requests, List<string> Log)> ColdStartAsync(Rig rig, CountingProxy proxy, string image, string id)
    {
        var viaProxy = image.Replace(rig.Registry.Host, proxy.Host, StringComparison.Ordinal);
        proxy.ResetCounts();
        lock (proxy.Log) proxy.Log.Clear();
        (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", viaProxy)).EnsureSuccess($"rpull {viaProxy}");
        (await rig.Containerd.CtrAsync("run", "--rm", "--snapshotter", "stargz", viaProxy, id, "/bin/sh", "-c", Workload))
            .EnsureSuccess($"workload in {id}\n{rig.Daemon.Log}");
        List<string> log;
        lock (proxy.Log) log = [.. proxy.Log];
        int requests = 0;
        foreach (var line in log)
        {
            var m = Regex.Match(line, @"^GET \S*/blobs/(\S+) bytes=(\d+)-(\d+)");
            if (!m.Success) continue;
            if (m.Groups[2].Value == "0" && m.Groups[3].Value == "0") continue;
            // The mount reads the footer and TOC: ranges that end at the blob's last byte.
            var size = await BlobSizeAsync(rig, image, m.Groups[1].Value);
            if (long.Parse(m.Groups[3].Value, System.Globalization.CultureInfo.InvariantCulture) == size - 1) continue;
            requests++;
        }
        await rig.Containerd.CtrAsync("images", "rm", "--sync", viaProxy);
        return (requests, log);
    }

    private static readonly Dictionary<string, long> Sizes = [];

    private static async Task<long> BlobSizeAsync(Rig rig, string image, string digest)
    {
        lock (Sizes) if (Sizes.TryGetValue(digest, out var s)) return s;
        var reference = ImageReference.Parse(image);
        using var client = PlainClient(rig.Registry.Host);
        var m = await client.ResolveAsync(reference);
        foreach (var l in m.Layers) lock (Sizes) Sizes[l.Digest] = l.Size;
        lock (Sizes) return Sizes.TryGetValue(digest, out var size) ? size : -1;
    }

    [Fact]
    public async Task OptimizedImageHasTheRecordedFilesFirstAndItsColdStartAsksTheRegistryForLess()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await StartAsync();
        var src = await PushSourceAsync(rig, "opt/app");
        var optimized = $"{rig.Registry.Host}/opt/app:optimized";
        var plain = $"{rig.Registry.Host}/opt/app:esgz";

        // No command: the image's own Cmd (the workload) runs.
        var r = (await StargzCli.RunAsync(["image", "optimize", "--plain-http", "--address", rig.Containerd.Socket, "--runc-root", rig.Containerd.RuncRoot,
            "--period", "120", src, optimized], TimeSpan.FromMinutes(10))).EnsureSuccess("stargz image optimize");
        var recorded = Regex.Matches(r.StdOut, @"^recorded (/\S+) (\d+) bytes layer (-?\d+)$", RegexOptions.Multiline)
            .ToDictionary(m => m.Groups[1].Value, m => (Size: long.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture), Layer: int.Parse(m.Groups[3].Value, System.Globalization.CultureInfo.InvariantCulture)));
        var read = new[] { 0, 2, 4, 6, 8, 10 }.Select(i => $"/data/f{i}.bin").ToList();
        foreach (var f in read)
        {
            Assert.True(recorded.TryGetValue(f, out var rec), $"{f} not recorded:\n{r.StdOut}\n{r.StdErr}");
            Assert.Equal((24L * 1024, 1), rec);
        }
        Assert.Equal((new FileInfo(Requires.Which("busybox") ?? "/bin/busybox").Length, 0), recorded["/bin/busybox"]);
        Assert.DoesNotContain("/data/f1.bin", recorded.Keys);
        Assert.DoesNotContain("/other/unread.bin", recorded.Keys);
        Assert.Contains("workload exited with 0", r.StdOut);
        Assert.Matches(@"layer 1 sha256:[0-9a-f]{64}: 6 files, 147456 bytes recorded", r.StdOut);
        Assert.Matches(@"layer 2 sha256:[0-9a-f]{64}: 0 files, 0 bytes recorded", r.StdOut);
        // The order recorded is the order of the opens: busybox (exec) before the files it cats, those in argument order.
        var order = recorded.Keys.ToList();
        Assert.True(order.IndexOf("/bin/busybox") < order.IndexOf("/data/f0.bin"), string.Join('\n', order));
        Assert.Equal(read, order.Where(read.Contains).ToList());

        var layers = await TocNamesAsync(optimized, ct);
        Assert.Equal(3, layers.Count);
        int Landmark(List<string> names) => names.IndexOf(LayerLabels.PrefetchLandmark);
        Assert.True(Landmark(layers[0]) > layers[0].IndexOf("bin/busybox") && layers[0].IndexOf("bin/busybox") >= 0, string.Join('\n', layers[0]));
        Assert.True(Landmark(layers[1]) > 0, string.Join('\n', layers[1]));
        for (int i = 0; i < 12; i++)
        {
            var at = layers[1].IndexOf($"data/f{i}.bin");
            Assert.True(i % 2 == 0 ? at < Landmark(layers[1]) : at > Landmark(layers[1]), $"data/f{i}.bin at {at}, landmark at {Landmark(layers[1])}");
        }
        // In the order they were read.
        var positions = read.Select(f => layers[1].IndexOf(f.TrimStart('/'))).ToList();
        Assert.Equal(positions.Order().ToList(), positions);
        Assert.Contains(LayerLabels.NoPrefetchLandmark, layers[2]);
        Assert.DoesNotContain(LayerLabels.PrefetchLandmark, layers[2]);

        // The same image converted without a record: no landmark to prefetch to.
        await E2eHelpers.ConvertWithOursAsync(src, plain, rig.Work.Path, ct);
        await using var proxy = new CountingProxy(rig.Registry.Host);
        var (plainRequests, plainLog) = await ColdStartAsync(rig, proxy, plain, "cold-plain");
        var (optRequests, optLog) = await ColdStartAsync(rig, proxy, optimized, "cold-optimized");
        Assert.True(optRequests < plainRequests,
            $"optimized cold start asked for {optRequests} ranges, unoptimized {plainRequests}:\n{string.Join('\n', optLog)}\n--\n{string.Join('\n', plainLog)}");
    }

    [Fact]
    public async Task ThePeriodStopsALongWorkloadAndTheRecordSoFarIsUsed()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await StartAsync();
        var src = await PushSourceAsync(rig, "opt/long");
        var optimized = $"{rig.Registry.Host}/opt/long:optimized";
        var r = (await StargzCli.RunAsync(["image", "optimize", "--plain-http", "--address", rig.Containerd.Socket, "--runc-root", rig.Containerd.RuncRoot,
            "--period", "3", src, optimized, "--", "/bin/sh", "-c", "cat /data/f3.bin > /dev/null; sleep 600"], TimeSpan.FromMinutes(5))).EnsureSuccess("stargz image optimize");
        Assert.Contains("stopped at the end of the period", r.StdOut);
        Assert.Contains("recorded /data/f3.bin 24576 bytes layer 1", r.StdOut);
        var layers = await TocNamesAsync(optimized, ct);
        Assert.True(layers[1].IndexOf("data/f3.bin") < layers[1].IndexOf(LayerLabels.PrefetchLandmark), string.Join('\n', layers[1]));
        // Nothing left behind: no container, no task, no mount of ours.
        Assert.Equal("", (await rig.Containerd.CtrAsync("containers", "ls", "-q")).EnsureSuccess("ctr containers ls").StdOut.Trim());
        Assert.DoesNotContain(Mounts.List(), m => m.MountPoint.Contains("stargz-optimize-", StringComparison.Ordinal));
    }
}
