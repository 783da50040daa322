using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Registry + our daemon + containerd wired through the `stargz` proxy plugin, all real, on loopback and private dirs.
/// Images are built from local files, converted by the reference ctr-remote, pushed, and then removed from containerd
/// so that a pull starts from nothing.
/// </summary>
public sealed class E2eRig : IAsyncDisposable
{
    public required LocalRegistry Registry { get; init; }
    public required LocalDaemon Daemon { get; init; }
    public required LocalContainerd Containerd { get; init; }
    public required int MetricsPort { get; init; }
    public required TempDir Work { get; init; }

    public static async Task<E2eRig> StartAsync(string extraDaemonToml = "", bool enableCri = false)
    {
        Requires.Fuse();
        var registry = await LocalRegistry.StartAsync();
        var port = LocalRegistry.FreePort();
        var daemon = await LocalDaemon.StartAsync($"metrics_address = \"127.0.0.1:{port}\"\n{extraDaemonToml}");
        var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket, enableCri: enableCri);
        return new E2eRig { Registry = registry, Daemon = daemon, Containerd = ctd, MetricsPort = port, Work = new TempDir("e2e") };
    }

    /// <summary>Builds the image from <paramref name="layers"/>, pushes it as NAME:v1, converts it to NAME:esgz with
    /// ctr-remote, and leaves containerd with neither image nor content. Returns the eStargz reference.</summary>
    public Task<string> PushEstargzAsync(string name, IReadOnlyList<string> layers) =>
        E2eHelpers.PushEstargzAsync(Registry, Containerd, Work.Path, name, layers);

    /// <summary>Removes images from containerd and lets its GC drop their content and snapshots.</summary>
    public Task ForgetImagesAsync(params string[] images) => E2eHelpers.ForgetImagesAsync(Containerd, images);

    /// <summary>Reads one gauge from the daemon's Prometheus endpoint.</summary>
    public Task<double> MetricAsync(string name) => DaemonMetrics.ReadAsync(MetricsPort, name);

    /// <summary>Our FUSE mounts (one per remote layer) under the daemon's root.</summary>
    public List<Mounts.MountInfo> FuseMounts() =>
        Mounts.Under(Daemon.Root).Where(m => m.FsType.StartsWith("fuse", StringComparison.Ordinal)).ToList();

    public async Task<List<string>> ContentDigestsAsync()
    {
        var ls = (await Containerd.CtrAsync("content", "ls", "-q")).EnsureSuccess("ctr content ls").StdOut;
        return ls.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).ToList();
    }

    public async ValueTask DisposeAsync()
    {
        await Containerd.DisposeAsync();
        await Daemon.DisposeAsync();
        await Registry.DisposeAsync();
        Work.Dispose();
    }
}
