using System.Security.Cryptography;
using Grpc.Core;
using Stargz.Cri.V1;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// A Kubernetes node without kubelet: the tests make kubelet's CRI calls themselves. containerd 1.6 with its CRI plugin
/// (snapshotter `stargz`, snapshot annotations on, CNI from Debian's containernetworking-plugins in dirs of its own),
/// runc, our daemon (optionally with [cri_keychain], kubelet's --image-service-endpoint), and a docker-registry that
/// turns private (htpasswd) once the test's images are pushed.
/// <para>
/// Pod networking: CRI gives every pod a network namespace and calls CNI: `loopback`, then a `bridge` network whose
/// host side (the bridge and each veth's far end) lives in a network namespace this rig creates, not the host's: the
/// bridge plugin in the CNI bin dir is a wrapper that runs Debian's plugin under `ip netns exec`. No gateway, no
/// masquerading, no iptables: nothing of the host's network is touched, and deleting the namespace removes it all.
/// </para>
/// </summary>
public sealed class PodRig : IAsyncDisposable
{
    public const string User = "kubelet";
    public const string Password = "pod-secret-n0t-logged";
    private const string CniDir = "/usr/lib/cni";

    public required LocalRegistry Registry { get; set; }
    public required LocalDaemon Daemon { get; init; }
    public required LocalContainerd Containerd { get; init; }
    public required int MetricsPort { get; init; }
    public required TempDir Work { get; init; }
    public required string NetNs { get; init; }
    public required string PauseImage { get; init; }
    /// <summary>kubelet's runtime endpoint (--container-runtime-endpoint): containerd's CRI.</summary>
    public required CriClient Cri { get; init; }
    private string _baseToml = "";
    private Dictionary<string, string> _env = [];
    private readonly List<string> _sandboxes = [];

    /// <summary>The daemon's credentials file (with [cri_keychain] persist_credentials).</summary>
    public string CredentialsFile => Path.Combine(Daemon.Root, "cri-keychain.json");
    public string CacheChunks => Path.Combine(Daemon.Root, "stargz", "cache", "chunks");

    /// <param name="supervised">run the daemon under `stargz-snapshotter supervise` (FUSE connections kept over restarts).</param>
    public static async Task<PodRig> StartAsync(string extraDaemonToml = "", bool supervised = false)
    {
        Requires.Fuse();
        var ip = Requires.Command("ip");
        foreach (var plugin in new[] { "bridge", "loopback", "host-local" })
            if (!File.Exists(Path.Combine(CniDir, plugin)))
                Requires.Missing($"CNI plugin {CniDir}/{plugin} is missing (Debian package containernetworking-plugins)");
        var work = new TempDir("e2e-pod");
        var netns = "sgzpod-" + Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(4));
        (await ProcessRunner.RunAsync(ip, ["netns", "add", netns], TimeSpan.FromSeconds(30))).EnsureSuccess($"ip netns add {netns}");
        LocalRegistry? registry = null;
        LocalDaemon? daemon = null;
        LocalContainerd? ctd = null;
        try
        {
            registry = await LocalRegistry.StartAsync(storageDir: work.Sub("registry-storage"));
            var metricsPort = LocalRegistry.FreePort();
            // Chunks come only when a container reads them: what a test reads after a restart was never fetched before.
            var baseToml = $"metrics_address = \"127.0.0.1:{metricsPort}\"\nnoprefetch = true\nno_background_fetch = true\n{extraDaemonToml}";
            // Its own docker config (none): root's ~/.docker must not open the private registry.
            var env = new Dictionary<string, string> { ["DOCKER_CONFIG"] = work.Sub("docker-config") };
            daemon = await LocalDaemon.StartAsync(baseToml, env: env, supervised: supervised);
            var pause = $"{registry.Host}/e2e/pause:v1";
            ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket, enableCri: true, sandboxImage: pause,
                prepare: dir => WriteCniAsync(dir, ip, netns),
                // CRI's runc state under the instance's dir too (runc's default root is shared by every containerd here).
                extraToml: $"""
                    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
                      runtime_type = "io.containerd.runc.v2"
                      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
                        Root = "{work.Sub("runc")}"
                    """);
            var rig = new PodRig
            {
                Registry = registry, Daemon = daemon, Containerd = ctd, MetricsPort = metricsPort, Work = work, NetNs = netns,
                PauseImage = pause, Cri = new CriClient(ctd.Socket), _baseToml = baseToml, _env = env,
            };
            // The pause image (kubelet's --pod-infra-container-image): a static busybox sleeping, pulled while the
            // registry is open (CRI pulls it without credentials).
            var p = work.Sub("pause");
            TestImages.WriteBusybox(p);
            var layout = Path.Combine(work.Path, "oci-pause");
            await TestImages.BuildAsync(layout, "v1", [p], entrypoint: ["/bin/sleep", "2147483647"]);
            await TestImages.PushAsync(layout, "v1", registry.Host, "e2e/pause:v1");
            await rig.Cri.Images.PullImageAsync(new PullImageRequest { Image = new ImageSpec { Image = pause } });
            return rig;
        }
        catch
        {
            if (ctd != null) await ctd.DisposeAsync();
            if (daemon != null) await daemon.DisposeAsync();
            if (registry != null) await registry.DisposeAsync();
            await ProcessRunner.RunAsync(ip, ["netns", "del", netns], TimeSpan.FromSeconds(30));
            work.Dispose();
            throw;
        }
    }

    private static async Task WriteCniAsync(string dir, string ip, string netns)
    {
        var bin = Directory.CreateDirectory(Path.Combine(dir, "cni-bin")).FullName;
        var conf = Directory.CreateDirectory(Path.Combine(dir, "cni-conf")).FullName;
        foreach (var plugin in new[] { "loopback", "host-local" })
            File.CreateSymbolicLink(Path.Combine(bin, plugin), Path.Combine(CniDir, plugin));
        var bridge = Path.Combine(bin, "bridge");
        await File.WriteAllTextAsync(bridge, $"""
            #!/bin/sh
            # The pod network's host side (bridge, veth ends) in the test's own network namespace, never the host's.
            exec {ip} netns exec {netns} {CniDir}/bridge "$@"

            """);
        File.SetUnixFileMode(bridge, (UnixFileMode)0b111_101_101);
        await File.WriteAllTextAsync(Path.Combine(conf, "10-pods.conflist"), $$"""
            {
              "cniVersion": "0.4.0",
              "name": "stargz-e2e-pods",
              "plugins": [
                {
                  "type": "bridge",
                  "bridge": "sgz0",
                  "isGateway": false,
                  "ipMasq": false,
                  "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.231.0.0/24" }]], "dataDir": "{{Path.Combine(dir, "ipam")}}" }
                }
              ]
            }
            """);
    }

    /// <summary>Builds NAME:v1, converts it to NAME:esgz with ctr-remote (eStargz), and leaves containerd without
    /// either (so the pull starts from nothing). Call while the registry is open. Returns the eStargz reference.</summary>
    public Task<string> PushEstargzAsync(string name, IReadOnlyList<string> layers) =>
        E2eHelpers.PushEstargzAsync(Registry, Containerd, Work.Path, name, layers);

    /// <summary>
    /// From now on the registry wants Basic credentials, and the daemon serves CRI's ImageService ([cri_keychain],
    /// proxied to containerd) with <paramref name="persist"/> as persist_credentials: kubelet's image endpoint.
    /// </summary>
    public async Task GoPrivateAsync(bool persist)
    {
        var htpasswd = Requires.Command("htpasswd");
        var line = (await ProcessRunner.RunAsync(htpasswd, ["-Bbn", User, Password], TimeSpan.FromSeconds(30))).EnsureSuccess("htpasswd").StdOut.Trim();
        var file = Path.Combine(Work.Path, "htpasswd");
        await File.WriteAllTextAsync(file, line + "\n");
        var port = Registry.Port;
        await Registry.DisposeAsync();
        Registry = await LocalRegistry.StartAsync(authYaml: LocalRegistry.HtpasswdAuthYaml(file), storageDir: Path.Combine(Work.Path, "registry-storage"), port: port);
        await File.WriteAllTextAsync(Daemon.ConfigPath, _baseToml +
            $"[cri_keychain]\nenable_keychain = true\nimage_service_path = \"{Containerd.Socket}\"\npersist_credentials = {(persist ? "true" : "false")}\n");
        Assert.Equal(0, await Daemon.StopAsync());
        await RestartDaemonAsync();
    }

    /// <summary>Starts the daemon again (after <see cref="LocalDaemon.StopAsync"/>) and waits until containerd reaches it.</summary>
    public async Task RestartDaemonAsync()
    {
        await Daemon.RestartAsync(env: _env);
        await WaitContainerdReachesDaemonAsync();
    }

    /// <summary>Supervised: SIGTERM to the daemon (it hands its mounts over), its supervisor starts it again; waits until containerd reaches it.</summary>
    public async Task HandOverDaemonAsync()
    {
        await Daemon.SignalAndWaitRestartAsync(15);
        await WaitContainerdReachesDaemonAsync();
    }

    private Task WaitContainerdReachesDaemonAsync() => E2eHelpers.WaitContainerdReachesDaemonAsync(Containerd, Daemon, "k8s.io");

    /// <summary>kubelet's PullImage through its image endpoint (the daemon's socket when the keychain is on).</summary>
    public async Task<string> PullAsync(string image, bool withAuth = true, CancellationToken ct = default)
    {
        using var images = new CriClient(Daemon.Socket);
        var r = await images.Images.PullImageAsync(new PullImageRequest
        {
            Image = new ImageSpec { Image = image },
            // As kubelet sends an image pull secret's entry: server_address is the registry's URL.
            Auth = withAuth ? new AuthConfig { Username = User, Password = Password, ServerAddress = $"http://{Registry.Host}" } : null,
        }, cancellationToken: ct);
        return r.ImageRef;
    }

    /// <summary>RunPodSandbox as kubelet does it for a pod NAME in namespace e2e; logs under the rig's dir.</summary>
    public async Task<(string Id, PodSandboxConfig Config)> RunPodAsync(string name, CancellationToken ct = default)
    {
        var config = new PodSandboxConfig
        {
            Metadata = new PodSandboxMetadata { Name = name, Namespace = "e2e", Uid = Guid.NewGuid().ToString(), Attempt = 0 },
            Hostname = name,
            LogDirectory = Work.Sub(Path.Combine("pods", name)),
            Linux = new LinuxPodSandboxConfig(),
        };
        config.Labels["io.kubernetes.pod.name"] = name;
        RunPodSandboxResponse r;
        try { r = await Cri.Runtime.RunPodSandboxAsync(new RunPodSandboxRequest { Config = config }, cancellationToken: ct); }
        catch (RpcException e)
        {
            var log = Containerd.ReadLog();
            throw new Xunit.Sdk.XunitException($"RunPodSandbox {name}: {e.Status}\ncontainerd:\n{(log.Length <= 6000 ? log : log[^6000..])}");
        }
        lock (_sandboxes) _sandboxes.Add(r.PodSandboxId);
        return (r.PodSandboxId, config);
    }

    /// <summary>CreateContainer + StartContainer in a pod; its log goes to LOGDIR/NAME.log. Returns the container id.</summary>
    public async Task<string> StartContainerAsync(string sandboxId, PodSandboxConfig sandbox, string name, string imageRef,
        IReadOnlyList<string> command, CancellationToken ct = default)
    {
        var config = new ContainerConfig
        {
            Metadata = new ContainerMetadata { Name = name },
            Image = new ImageSpec { Image = imageRef },
            LogPath = name + ".log",
        };
        config.Command.AddRange(command);
        var created = await Cri.Runtime.CreateContainerAsync(new CreateContainerRequest
        {
            PodSandboxId = sandboxId, Config = config, SandboxConfig = sandbox,
        }, cancellationToken: ct);
        await Cri.Runtime.StartContainerAsync(new StartContainerRequest { ContainerId = created.ContainerId }, cancellationToken: ct);
        return created.ContainerId;
    }

    /// <summary>ContainerStatus until the container has exited (bounded); returns its last status.</summary>
    public async Task<ContainerStatus> WaitExitedAsync(string containerId, CancellationToken ct = default)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(5);
        while (true)
        {
            var s = (await Cri.Runtime.ContainerStatusAsync(new ContainerStatusRequest { ContainerId = containerId }, cancellationToken: ct)).Status;
            if (s.State == ContainerState.ContainerExited) return s;
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"container {s.Metadata.Name} still {s.State}");
            await Task.Delay(200, ct);
        }
    }

    /// <summary>The container's stdout as kubelet reads it from the log file CRI writes (CRI log format:
    /// "TIME STREAM TAG TEXT", a P tag continues the line in the next record).</summary>
    public static string ReadStdout(string logPath) => ReadStream(logPath, "stdout");

    /// <summary>One stream ("stdout" or "stderr") of the container's log file.</summary>
    public static string ReadStream(string logPath, string stream)
    {
        if (!File.Exists(logPath)) return "";
        var sb = new System.Text.StringBuilder();
        string text;
        using (var fs = new FileStream(logPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite))
        using (var r = new StreamReader(fs))
            text = r.ReadToEnd();
        foreach (var line in text.Split('\n'))
        {
            var parts = line.Split(' ', 4);
            if (parts.Length < 4 || parts[1] != stream) continue;
            sb.Append(parts[3]);
            if (parts[2] == "F") sb.Append('\n');
        }
        return sb.ToString();
    }

    /// <summary>Waits (bounded) until the container's stdout holds <paramref name="lines"/> full lines; returns it.</summary>
    public static async Task<string> WaitStdoutLinesAsync(string logPath, int lines, CancellationToken ct = default)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromMinutes(2);
        while (true)
        {
            var s = ReadStdout(logPath);
            if (s.Count(c => c == '\n') >= lines || DateTime.UtcNow > deadline) return s;
            await Task.Delay(200, ct);
        }
    }

    /// <summary>StopPodSandbox then RemovePodSandbox, as kubelet does when a pod is deleted.</summary>
    public async Task RemovePodAsync(string sandboxId, CancellationToken ct = default)
    {
        await Cri.Runtime.StopPodSandboxAsync(new StopPodSandboxRequest { PodSandboxId = sandboxId }, cancellationToken: ct);
        await Cri.Runtime.RemovePodSandboxAsync(new RemovePodSandboxRequest { PodSandboxId = sandboxId }, cancellationToken: ct);
        lock (_sandboxes) _sandboxes.Remove(sandboxId);
    }

    /// <summary>kubelet's image GC: RemoveImage by image ID through its image endpoint.</summary>
    public async Task RemoveImageAsync(string imageId, CancellationToken ct = default)
    {
        using var images = new CriClient(Daemon.Socket);
        await images.Images.RemoveImageAsync(new RemoveImageRequest { Image = new ImageSpec { Image = imageId } }, cancellationToken: ct);
    }

    /// <summary>CRI ImageFsInfo's used bytes (containerd sums the snapshotter's Usage of each snapshot, refreshed every 10 s).</summary>
    public async Task<ulong> ImageFsUsedBytesAsync(CancellationToken ct = default)
    {
        var fs = await Cri.Images.ImageFsInfoAsync(new ImageFsInfoRequest(), cancellationToken: ct);
        ulong used = 0;
        foreach (var f in fs.ImageFilesystems) used += f.UsedBytes?.Value ?? 0;
        return used;
    }

    /// <summary>Waits (bounded: containerd refreshes snapshot usage every 10 s) until ImageFsInfo's used bytes satisfy
    /// <paramref name="ok"/>; returns the last value.</summary>
    public async Task<ulong> WaitImageFsAsync(Func<ulong, bool> ok, CancellationToken ct = default)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(90);
        while (true)
        {
            var v = await ImageFsUsedBytesAsync(ct);
            if (ok(v) || DateTime.UtcNow > deadline) return v;
            await Task.Delay(500, ct);
        }
    }

    public Task<double> MetricAsync(string name) => DaemonMetrics.ReadAsync(MetricsPort, name);

    /// <summary>Our FUSE mounts (one per remote layer) under the daemon's root.</summary>
    public List<Mounts.MountInfo> FuseMounts() =>
        Mounts.Under(Daemon.Root).Where(m => m.FsType.StartsWith("fuse", StringComparison.Ordinal)).ToList();

    public static int CountFiles(string dir) =>
        Directory.Exists(dir) ? Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories).Count() : 0;

    /// <summary>The end of the daemon's log without its per-request lines (containerd polls Usage every 10 s).</summary>
    public string Tail()
    {
        var sb = new System.Text.StringBuilder();
        foreach (var l in Daemon.Log.Split('\n'))
            if (!l.Contains("\"Microsoft.AspNetCore.", StringComparison.Ordinal) && !l.Contains("\"LogLevel\":\"Debug\"", StringComparison.Ordinal))
                sb.AppendLine(l);
        var t = sb.ToString();
        return t.Length <= 12000 ? t : t[^12000..];
    }

    public async ValueTask DisposeAsync()
    {
        // Pods first (their containers hold our snapshots' mounts), as kubelet would; then whatever CRI left running.
        List<string> pods;
        lock (_sandboxes) pods = [.. _sandboxes];
        foreach (var id in pods)
        {
            try { await RemovePodAsync(id); }
            catch (RpcException) { }
        }
        try
        {
            var tasks = await Containerd.CtrInNamespaceAsync("k8s.io", "tasks", "ls", "-q");
            foreach (var id in tasks.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
                await Containerd.CtrInNamespaceAsync("k8s.io", "tasks", "rm", "-f", id);
        }
        catch (Exception e) when (e is InvalidOperationException or TimeoutException or IOException) { }
        Cri.Dispose();
        await Containerd.DisposeAsync();
        await Daemon.DisposeAsync();
        await Registry.DisposeAsync();
        await ProcessRunner.RunAsync(Requires.Command("ip"), ["netns", "del", NetNs], TimeSpan.FromSeconds(30));
        Work.Dispose();
    }
}
