using System.Security.Cryptography;
using System.Text.RegularExpressions;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Registry + our daemon + containerd (stargz proxy plugin) for the restart, outage and tampering tests. Unlike
/// <see cref="E2eRig"/> the registry keeps its storage in the rig's work dir, so it can be stopped and started again on
/// the same port with the same blobs. The daemon runs without prefetch and background fetch, so only what a container
/// reads is fetched, and with a small <c>[blob] fetching_timeout_sec</c>.
/// </summary>
public sealed class OutageRig : IAsyncDisposable
{
    public const int FetchingTimeoutSec = 5;

    private LocalRegistry? _registry;
    private readonly string _registryStorage;
    private readonly int _registryPort;


    public LocalDaemon Daemon { get; }
    public LocalContainerd Containerd { get; }
    public int MetricsPort { get; }
    public TempDir Work { get; }
    public LocalRegistry Registry => _registry ?? throw new InvalidOperationException("the registry is stopped");
    public string RegistryHost => $"127.0.0.1:{_registryPort}";
    public string RegistryStorage => _registryStorage;
    /// <summary>The daemon's --root.</summary>
    public string DaemonRoot { get; private init; } = "";

    private OutageRig(LocalRegistry registry, string storage, LocalDaemon daemon, LocalContainerd ctd, int metricsPort, TempDir work)
    {
        _registry = registry;
        _registryStorage = storage;
        _registryPort = registry.Port;
        Daemon = daemon;
        Containerd = ctd;
        MetricsPort = metricsPort;
        Work = work;
    }

    /// <param name="fetchingTimeoutSec">the daemon's <c>[blob] fetching_timeout_sec</c>.</param>
    /// <param name="backgroundFetch">leave prefetch and background fetch on (the default config) instead of off.</param>
    /// <param name="extraToml">more of the daemon's config, appended (tables only).</param>
    /// <param name="daemonRoot">the daemon's --root instead of one in its own dir (a small disk; the caller unmounts it).</param>
    /// <param name="supervised">run the daemon under `stargz-snapshotter supervise` (its fd store keeps the FUSE connections).</param>
    public static async Task<OutageRig> StartAsync(int fetchingTimeoutSec = FetchingTimeoutSec, bool backgroundFetch = false, string extraToml = "",
        string? daemonRoot = null, bool supervised = false)
    {
        Requires.Fuse();
        Requires.Root();
        var work = new TempDir("outage");
        LocalRegistry? registry = null;
        LocalDaemon? daemon = null;
        try
        {
            var storage = work.Sub("registry-storage");
            registry = await LocalRegistry.StartAsync(storageDir: storage);
            var port = LocalRegistry.FreePort();
            daemon = await LocalDaemon.StartAsync($"""
                metrics_address = "127.0.0.1:{port}"
                noprefetch = {(backgroundFetch ? "false" : "true")}
                no_background_fetch = {(backgroundFetch ? "false" : "true")}
                [blob]
                fetching_timeout_sec = {fetchingTimeoutSec}
                {extraToml}
                """, extraArgs: daemonRoot == null ? null : ["--root", daemonRoot], supervised: supervised);
            var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);
            return new OutageRig(registry, storage, daemon, ctd, port, work) { DaemonRoot = daemonRoot ?? daemon.Root };
        }
        catch
        {
            if (daemon != null) await daemon.DisposeAsync();
            if (registry != null) await registry.DisposeAsync();
            work.Dispose();
            throw;
        }
    }

    /// <summary>Stops the registry process; its storage stays.</summary>
    public async Task StopRegistryAsync()
    {
        if (_registry == null) return;
        await _registry.DisposeAsync();
        _registry = null;
    }

    /// <summary>Starts the registry again on the same port and storage.</summary>
    public async Task StartRegistryAsync()
    {
        if (_registry != null) return;
        _registry = await LocalRegistry.StartAsync(storageDir: _registryStorage, port: _registryPort);
    }

    /// <summary>
    /// A two-layer image: busybox, then /data with <paramref name="dataFiles"/> files of incompressible bytes
    /// (name → KiB). Pushed as NAME:v1 (plain gzip) and, converted by ctr-remote, as NAME:esgz; containerd then holds
    /// neither image nor content.
    /// </summary>
    /// <param name="convertArgs">more arguments for ctr-remote's convert (e.g. --estargz-chunk-size N).</param>
    public async Task<TestImage> PushImageAsync(string name, IReadOnlyDictionary<string, int> dataFiles, int seed, params string[] convertArgs)
    {
        var root = Work.Sub("img-" + name.Replace('/', '-'));
        var l1 = Path.Combine(root, "l1");
        var l2 = Path.Combine(root, "l2");
        TestImages.WriteBusybox(l1);
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        var rng = new Random(seed);
        var hashes = new Dictionary<string, string>();
        foreach (var (file, kib) in dataFiles)
        {
            var bytes = new byte[kib * 1024];
            rng.NextBytes(bytes);
            await File.WriteAllBytesAsync(Path.Combine(l2, "data", file), bytes);
            hashes[file] = System.Convert.ToHexStringLower(SHA256.HashData(bytes));
        }
        var layout = Path.Combine(root, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1, l2]);
        await TestImages.PushAsync(layout, "v1", RegistryHost, $"{name}:v1");
        var plain = $"{RegistryHost}/{name}:v1";
        var esgz = $"{RegistryHost}/{name}:esgz";
        await Containerd.ConvertWithReferenceAsync(plain, esgz, false, convertArgs);
        await E2eHelpers.ForgetImagesAsync(Containerd, plain, esgz);
        return new TestImage(plain, esgz, hashes);
    }

    public async Task RpullAsync(string image) =>
        (await Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess($"ctr-remote rpull {image}");

    public async Task PlainPullAsync(string image) =>
        (await Containerd.CtrAsync("image", "pull", "--plain-http", "--snapshotter", "stargz", image)).EnsureSuccess($"ctr pull {image}");

    /// <summary>`ctr run --rm --snapshotter stargz IMAGE ID sh -c SCRIPT`.</summary>
    public Task<ProcessResult> RunAsync(string image, string id, string script) =>
        Containerd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, id, "/bin/sh", "-c", script);

    /// <summary>`ctr run -d --snapshotter stargz IMAGE ID ARGS...`; returns the id.</summary>
    public async Task<string> RunDetachedAsync(string image, string id, params string[] args)
    {
        (await Containerd.CtrAsync(["run", "-d", "--snapshotter", "stargz", image, id, .. args])).EnsureSuccess($"ctr run -d {id}");
        return id;
    }

    /// <summary>Runs `sha256sum /data/FILE` in a new container; returns the hash printed (throws if the run failed).</summary>
    public async Task<string> Sha256InContainerAsync(string image, string id, string file)
    {
        var r = (await RunAsync(image, id, $"sha256sum /data/{file}")).EnsureSuccess($"sha256sum /data/{file} in {id}");
        return r.StdOut.Trim().Split(' ', 2)[0];
    }

    private int _execs;

    /// <summary>`sha256sum /data/*.bin` run in the running container <paramref name="container"/>: file name → hash.</summary>
    public async Task<Dictionary<string, string>> Sha256OfDataFilesInAsync(string container)
    {
        var r = (await Containerd.CtrAsync("tasks", "exec", "--exec-id", $"h{Interlocked.Increment(ref _execs)}", container, "/bin/sh", "-c", "cd /data && sha256sum *.bin"))
            .EnsureSuccess($"sha256sum in {container}\n{Daemon.Log}");
        return r.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries)
            .Select(l => l.Split(' ', 2, StringSplitOptions.TrimEntries)).ToDictionary(f => f[1], f => f[0]);
    }

    /// <summary>Waits (bounded) until containerd reaches our daemon again (<see cref="E2eHelpers.WaitContainerdReachesDaemonAsync"/>).</summary>
    public Task<string> WaitContainerdReachesDaemonAsync(TimeSpan? timeout = null) =>
        E2eHelpers.WaitContainerdReachesDaemonAsync(Containerd, Daemon, timeout: timeout);

    /// <summary>Committed snapshots as `ctr snapshots --snapshotter stargz ls` lists them: "KEY PARENT".</summary>
    public async Task<SortedSet<string>> CommittedSnapshotsAsync()
    {
        var ls = (await Containerd.CtrAsync("snapshots", "--snapshotter", "stargz", "ls")).EnsureSuccess("ctr snapshots ls").StdOut;
        var set = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var line in ls.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Skip(1))
        {
            var f = line.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries);
            if (f.Length >= 2 && f[^1] == "Committed") set.Add(string.Join(' ', f[..^1]));
        }
        return set;
    }

    /// <summary>Reads one gauge from the daemon's Prometheus endpoint.</summary>
    /// <summary>
    /// Runs the script in a new container (ids PREFIX-0, PREFIX-1, ...) once a second until it exits 0 or
    /// <paramref name="timeout"/> has passed (containerd's reconnect backoff and the layers' recovery take a while);
    /// returns the last run.
    /// </summary>
    public async Task<ProcessResult> RunUntilItSucceedsAsync(string image, string idPrefix, string script, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        for (var attempt = 0; ; attempt++)
        {
            var run = await RunAsync(image, $"{idPrefix}-{attempt}", script);
            if (run.ExitCode == 0 || DateTime.UtcNow > deadline) return run;
            await Task.Delay(1000, TestContext.Current.CancellationToken);
        }
    }

    public Task<double> MetricAsync(string name) => DaemonMetrics.ReadAsync(MetricsPort, name);

    /// <summary>Waits (bounded) until the gauge satisfies <paramref name="ok"/>; returns its last value.</summary>
    public async Task<double> WaitMetricAsync(string name, Func<double, bool> ok, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var v = await MetricAsync(name);
            if (ok(v) || DateTime.UtcNow > deadline) return v;
            await Task.Delay(250);
        }
    }

    /// <summary>Our FUSE mounts under the daemon's root as (mount id, mount point), from /proc/self/mountinfo.</summary>
    public SortedSet<string> FuseMountIds()
    {
        var set = new SortedSet<string>(StringComparer.Ordinal);
        var root = DaemonRoot.TrimEnd('/') + "/";
        foreach (var line in File.ReadAllLines("/proc/self/mountinfo"))
        {
            var f = line.Split(' ');
            var sep = Array.IndexOf(f, "-");
            if (f.Length < 5 || sep < 0 || sep + 1 >= f.Length) continue;
            var mp = Regex.Unescape(f[4].Replace("\\040", " "));
            if (mp.StartsWith(root, StringComparison.Ordinal) && f[sep + 1].StartsWith("fuse", StringComparison.Ordinal))
                set.Add($"{f[0]} {mp}");
        }
        return set;
    }

    /// <summary>Files of the chunk cache (DAEMON_ROOT/stargz/cache) with their sizes.</summary>
    public SortedDictionary<string, long> CacheFiles()
    {
        var dir = Path.Combine(DaemonRoot, "stargz", "cache");
        var d = new SortedDictionary<string, long>(StringComparer.Ordinal);
        if (!Directory.Exists(dir)) return d;
        foreach (var f in Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories))
        {
            try { d[Path.GetRelativePath(dir, f)] = new FileInfo(f).Length; }
            catch (FileNotFoundException) { }
        }
        return d;
    }

    /// <summary>Kills and deletes every task and container of this containerd (they hold runc state outside its dirs).</summary>
    public async Task RemoveContainersAsync()
    {
        var ls = await Containerd.CtrAsync("containers", "ls", "-q");
        foreach (var id in ls.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            await Containerd.CtrAsync("tasks", "rm", "-f", id);
            await Containerd.CtrAsync("containers", "rm", id);
        }
    }

    public async ValueTask DisposeAsync()
    {
        try { await RemoveContainersAsync(); }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException or IOException) { }
        await Containerd.DisposeAsync();
        await Daemon.DisposeAsync();
        await StopRegistryAsync();
        Work.Dispose();
    }
}

/// <summary>An image pushed by <see cref="OutageRig.PushImageAsync"/>: plain and eStargz refs, sha256 of each /data file.</summary>
public sealed record TestImage(string Plain, string Estargz, IReadOnlyDictionary<string, string> Sha256);
