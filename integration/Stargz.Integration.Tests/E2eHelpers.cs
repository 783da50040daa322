using Grpc.Net.Client;
using Stargz.Converter;
using Stargz.Protos;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>Helpers shared by the content, fallback, duplicate, label, cleanup and CRI tests.</summary>
internal static class E2eHelpers
{
    /// <summary>
    /// Waits (bounded) until containerd reaches the daemon again after a restart under it: its proxy client answers
    /// "connection refused" for a while (gRPC reconnect backoff after the dials it made while the daemon was down)
    /// although the socket is up. Returns the snapshot list of <paramref name="ns"/> that got through.
    /// </summary>
    public static async Task<string> WaitContainerdReachesDaemonAsync(LocalContainerd ctd, LocalDaemon daemon, string ns = "default",
        TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(60));
        while (true)
        {
            var r = await ctd.CtrInNamespaceAsync(ns, "snapshots", "--snapshotter", "stargz", "ls");
            if (r.ExitCode == 0) return r.StdOut;
            if (DateTime.UtcNow > deadline)
                throw new TimeoutException($"containerd did not reach the restarted daemon: {r.StdErr}\ndaemon log:\n{daemon.Log}");
            await Task.Delay(250);
        }
    }

    /// <summary>Builds NAME:v1 from <paramref name="layers"/> and pushes it as a plain gzip image; returns its reference.</summary>
    public static async Task<string> PushPlainAsync(E2eRig rig, string name, IReadOnlyList<string> layers)
    {
        var layout = Path.Combine(rig.Work.Path, "oci-" + name.Replace('/', '-'));
        await TestImages.BuildAsync(layout, "v1", layers);
        await TestImages.PushAsync(layout, "v1", rig.Registry.Host, $"{name}:v1");
        return $"{rig.Registry.Host}/{name}:v1";
    }

    /// <summary>Builds the image from <paramref name="layers"/>, pushes it as NAME:v1, converts it to NAME:esgz with
    /// ctr-remote, and leaves containerd with neither image nor content. Returns the eStargz reference.</summary>
    public static async Task<string> PushEstargzAsync(LocalRegistry registry, LocalContainerd ctd, string workDir, string name, IReadOnlyList<string> layers)
    {
        var layout = Path.Combine(workDir, "oci-" + name.Replace('/', '-'));
        await TestImages.BuildAsync(layout, "v1", layers);
        await TestImages.PushAsync(layout, "v1", registry.Host, $"{name}:v1");
        var src = $"{registry.Host}/{name}:v1";
        var dst = $"{registry.Host}/{name}:esgz";
        await ctd.ConvertWithReferenceAsync(src, dst);
        await ForgetImagesAsync(ctd, src, dst);
        return dst;
    }

    /// <summary>Removes images from containerd and lets its GC drop their content and snapshots.</summary>
    public static async Task ForgetImagesAsync(LocalContainerd ctd, params string[] images)
    {
        foreach (var i in images) await ctd.CtrAsync("images", "rm", "--sync", i);
        await ctd.CtrAsync("content", "prune", "references");
    }

    /// <summary>Converts SRC to eStargz with OUR converter (src/Stargz.Converter), registry to registry, over plain HTTP.</summary>
    public static async Task ConvertWithOursAsync(string src, string dst, string workDir, CancellationToken ct)
    {
        var (from, to) = (ImageReference.Parse(src), ImageReference.Parse(dst));
        var hosts = new RegistryHostsConfig();
        foreach (var h in new[] { from.Host, to.Host }.Distinct(StringComparer.OrdinalIgnoreCase))
            hosts.Set(h, new HostConfig { Origin = new EndpointConfig { Host = h, PlainHttp = true } });
        using var client = new RegistryClient(hosts, new DockerConfigCredentialProvider());
        await new ImageConverter(client).ConvertAsync(from, to, new ConvertOptions { WorkDirectory = workDir }, ct);
    }

    /// <summary>A gRPC channel to the daemon's snapshots API over its unix socket.</summary>
    public static GrpcChannel Channel(string socket) => UnixGrpcChannel.Create(socket);

    /// <summary>Snapshot names `ctr snapshots --snapshotter stargz ls` shows in <paramref name="ns"/>.</summary>
    public static async Task<List<string>> StargzSnapshotsAsync(LocalContainerd ctd, string ns = "default")
    {
        var r = (await ctd.CtrInNamespaceAsync(ns, "snapshots", "--snapshotter", "stargz", "ls")).EnsureSuccess("ctr snapshots ls");
        return r.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Skip(1) // header: KEY PARENT KIND
            .Select(l => l.Split(' ', 2)[0])
            .ToList();
    }

    /// <summary>The first line of the daemon's log containing all of <paramref name="parts"/>, waiting (bounded) for it:
    /// the daemon logs asynchronously, so a line may reach its output a little after the call it describes.</summary>
    public static async Task<string?> WaitLogLineAsync(LocalDaemon daemon, params string[] parts)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (true)
        {
            var line = daemon.Log.Split('\n').FirstOrDefault(l => parts.All(p => l.Contains(p, StringComparison.Ordinal)));
            if (line != null || DateTime.UtcNow > deadline) return line;
            await Task.Delay(100, TestContext.Current.CancellationToken);
        }
    }

    /// <summary>
    /// Runs a command in a fresh container and returns its stdout (container removed afterwards). The command's stdout
    /// goes to a file on a bind mount, not through ctr: containerd 1.6's ctr can lose a short-lived container's output
    /// (seen in CI: `cat` of a one-line file succeeded and ctr printed nothing). The image needs /bin/sh.
    /// </summary>
    public static async Task<string> RunAsync(LocalContainerd ctd, string image, string id, params string[] cmd)
    {
        using var outDir = new TempDir("ctr-out-" + id);
        var args = new List<string>
        {
            "run", "--rm", "--snapshotter", "stargz", "--mount", $"type=bind,src={outDir.Path},dst=/out,options=rbind:rw",
            image, id, "/bin/sh", "-c", "\"$@\" > /out/stdout", "sh",
        };
        args.AddRange(cmd);
        (await ctd.CtrAsync(args.ToArray())).EnsureSuccess($"ctr run {id}");
        return await File.ReadAllTextAsync(Path.Combine(outDir.Path, "stdout"), TestContext.Current.CancellationToken);
    }
}
