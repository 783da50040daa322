using System.Security.Cryptography;
using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Stargz.Cri.V1;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The Kubernetes node path end to end, with the calls kubelet makes (<see cref="PodRig"/>): pods of lazily pulled
/// eStargz images from a private registry, a daemon restart under a running pod, kubelet's image GC (RemoveImage by
/// image ID) and ImageFsInfo, and many pods at once.
/// </summary>
public class PodTests
{
    private const string Motd = "served to a pod from a private registry";
    private const int ReadEarly = 2 << 20;
    private const int ReadLate = 6 << 20;
    private const ulong Scratch = 1 << 20;

    private sealed record PrivateImage(string Reference, int Layers, string EarlySha256, string LateSha256, string LateHalfSha256);

    /// <summary>busybox; /etc/motd and /data/early.bin (read before the restart); /data/late.bin alone in the last
    /// layer (read only after it): random bytes, so what is read is what is fetched.</summary>
    private static async Task<PrivateImage> PushPrivateImageAsync(PodRig rig, string name)
    {
        var l1 = rig.Work.Sub("l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("l2");
        Directory.CreateDirectory(Path.Combine(l2, "etc"));
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        await File.WriteAllTextAsync(Path.Combine(l2, "etc", "motd"), Motd + "\n");
        var early = RandomNumberGenerator.GetBytes(ReadEarly);
        await File.WriteAllBytesAsync(Path.Combine(l2, "data", "early.bin"), early);
        var l3 = rig.Work.Sub("l3");
        Directory.CreateDirectory(Path.Combine(l3, "data"));
        var late = RandomNumberGenerator.GetBytes(ReadLate);
        await File.WriteAllBytesAsync(Path.Combine(l3, "data", "late.bin"), late);
        var image = await rig.PushEstargzAsync(name, [l1, l2, l3]);
        return new PrivateImage(image, 3, Convert.ToHexStringLower(SHA256.HashData(early)), Convert.ToHexStringLower(SHA256.HashData(late)),
            Convert.ToHexStringLower(SHA256.HashData(late.AsSpan(0, ReadLate / 2))));
    }

    /// <summary>
    /// A pod of a private eStargz image pulled through the daemon's CRI keychain with persist_credentials: its
    /// container's log is right; the daemon (under supervise) is restarted with SIGTERM with the pod running: it hands
    /// its FUSE connections over, the running container reads on (ExecSync) half of a file whose chunks were never
    /// fetched, and a new container in that pod reads all of it, with the credentials read back from the daemon's
    /// 0600 file. Removing the pod and then the image by ID (kubelet's image GC) frees every FUSE mount,
    /// cached chunk and the credentials; the daemon's Usage of the remote snapshots counts what was read, and
    /// ImageFsInfo through containerd counts the pod's writable layer and goes down when the pod and image are gone.
    /// </summary>
    [Fact]
    public async Task APrivateLazyPodRunsKeepsFetchingAfterADaemonRestartWithPersistedCredentialsAndGcFreesEverything()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await PodRig.StartAsync(supervised: true);
        var img = await PushPrivateImageAsync(rig, "e2e/private-pod");
        await rig.GoPrivateAsync(persist: true);
        // ImageFsInfo before the image: the pause image's snapshot (once CRI has looked at it, within 10 s).
        var baseline = await rig.WaitImageFsAsync(v => v > 0, ct);

        var imageId = await rig.PullAsync(img.Reference, ct: ct);
        Assert.StartsWith("sha256:", imageId);
        Assert.True(img.Layers == rig.FuseMounts().Count, $"{rig.FuseMounts().Count} FUSE mounts for {img.Layers} layers:\n{rig.Tail()}");
        // The credentials are on disk for the restart: root's, 0600, in the daemon's root, and in no log.
        Assert.True(File.Exists(rig.CredentialsFile), "no credentials file after a pull with AuthConfig");
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(rig.CredentialsFile));
        Assert.Equal(0u, await OwnerAsync(rig.CredentialsFile));

        var (pod, podConfig) = await rig.RunPodAsync("private-app", ct);
        var sandbox = (await rig.Cri.Runtime.PodSandboxStatusAsync(new PodSandboxStatusRequest { PodSandboxId = pod }, cancellationToken: ct)).Status;
        Assert.Equal(PodSandboxState.SandboxReady, sandbox.State);
        // CNI's bridge (host side in the rig's own network namespace) gave the pod an address of its range.
        Assert.StartsWith("10.231.0.", sandbox.Network?.Ip ?? "");

        var app = await rig.StartContainerAsync(pod, podConfig, "app", imageId,
            ["/bin/sh", "-c", $"cat /etc/motd; sha256sum /data/early.bin; head -c {Scratch} /data/early.bin > /tmp/scratch; exec sleep 2147483647"], ct);
        var appLog = Path.Combine(podConfig.LogDirectory, "app.log");
        var stdout = await PodRig.WaitStdoutLinesAsync(appLog, 2, ct);
        var lines = stdout.Split('\n');
        Assert.True(lines.Length >= 2, $"app's log: [{stdout}]\n{rig.Tail()}");
        Assert.Equal(Motd, lines[0]);
        Assert.StartsWith(img.EarlySha256 + " ", lines[1]);
        Assert.Equal(ContainerState.ContainerRunning, (await ContainerStatusAsync(rig, app, ct)).State);
        // kubelet's exec probe (ExecSync) in the running container reads the image too.
        var probe = await rig.Cri.Runtime.ExecSyncAsync(new ExecSyncRequest { ContainerId = app, Cmd = { "/bin/cat", "/etc/motd" }, Timeout = 60 },
            cancellationToken: ct);
        Assert.Equal(0, probe.ExitCode);
        Assert.Equal(Motd + "\n", probe.Stdout.ToStringUtf8());

        // ImageFsInfo: containerd's CRI sums its snapshots' Usage, from us. It reads a committed snapshot's Usage once,
        // when it first sees it (every 10 s it re-reads active ones only), so our lazy layers count with what they held
        // then (little); the container's writable layer (active, ours too) counts as it grows.
        var usedRunning = await rig.WaitImageFsAsync(v => v >= baseline + Scratch, ct);
        Assert.True(usedRunning >= baseline + Scratch, $"ImageFsInfo: {baseline} bytes before the pod, {usedRunning} with {Scratch} written in it");

        // The daemon restarts with the pod running (SIGTERM; its supervisor keeps the FUSE connections and starts it again).
        var mountsBefore = rig.FuseMounts();
        await rig.HandOverDaemonAsync();
        Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "CRI keychain: credentials of 1 image(s) restored from"));
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (await rig.MetricAsync("stargz_fuse_adopted_mounts") < img.Layers && DateTime.UtcNow < deadline) await Task.Delay(250, ct);
        Assert.Equal(img.Layers, await rig.MetricAsync("stargz_layers_mounted"));
        Assert.Equal(img.Layers, await rig.MetricAsync("stargz_fuse_adopted_mounts")); // the same mounts, taken over
        Assert.Equal(mountsBefore, rig.FuseMounts());
        Assert.Equal(0, await rig.MetricAsync("stargz_layer_fetched_bytes")); // a new process: nothing fetched yet
        Assert.Equal(ContainerState.ContainerRunning, (await ContainerStatusAsync(rig, app, ct)).State);

        // The pod's running container reads on: half of the file never read before, through the mounts the new
        // daemon adopted, its chunks fetched from the private registry with the credentials read back from the file.
        var half = await rig.Cri.Runtime.ExecSyncAsync(new ExecSyncRequest
        {
            ContainerId = app, Cmd = { "/bin/sh", "-c", $"head -c {ReadLate / 2} /data/late.bin | sha256sum" }, Timeout = 120,
        }, cancellationToken: ct);
        Assert.True(half.ExitCode == 0, $"exec in the running container after the restart: {half.Stderr.ToStringUtf8()}\n{rig.Tail()}");
        Assert.StartsWith(img.LateHalfSha256 + " ", half.Stdout.ToStringUtf8());

        // A new container of the pod reads the file never read before: its chunks come from the private registry,
        // with the credentials the daemon read back from its file (kubelet does not pull an image it has).
        var late = await rig.StartContainerAsync(pod, podConfig, "late", imageId, ["/bin/sh", "-c", "sha256sum /data/late.bin"], ct);
        var lateStatus = await rig.WaitExitedAsync(late, ct);
        var lateOut = PodRig.ReadStdout(Path.Combine(podConfig.LogDirectory, "late.log"));
        Assert.True(lateStatus.ExitCode == 0, $"late container exited {lateStatus.ExitCode}: [{lateOut}]\n{rig.Tail()}");
        Assert.StartsWith(img.LateSha256 + " ", lateOut);
        Assert.True(await rig.MetricAsync("stargz_layer_fetched_bytes") >= ReadLate, "late.bin's chunks were not fetched after the restart");
        Assert.Equal(0, await rig.MetricAsync("stargz_layer_errors"));
        // The daemon's Usage of the image's remote snapshots: what their layers hold in the cache now, both files' bytes.
        var usage = await RemoteUsageAsync(rig, ct);
        Assert.True(usage >= ReadEarly + ReadLate, $"the image's remote snapshots report {usage} bytes after {ReadEarly + ReadLate} were read");

        // kubelet deletes the pod, then its image GC removes the image by ID through the image endpoint.
        await rig.RemovePodAsync(pod, ct);
        await rig.RemoveImageAsync(imageId, ct);
        Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "CRI RemoveImage " + imageId, "pull credentials are dropped"));
        var list = await rig.Cri.Images.ListImagesAsync(new ListImagesRequest(), cancellationToken: ct);
        Assert.DoesNotContain(list.Images, i => i.Id == imageId);
        Assert.False(File.Exists(rig.CredentialsFile), "the credentials outlived their image");

        // Every mount and chunk of the image is gone; only the pause image's (ordinary) snapshot stays.
        deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while ((rig.FuseMounts().Count > 0 || PodRig.CountFiles(rig.CacheChunks) > 0) && DateTime.UtcNow < deadline) await Task.Delay(250, ct);
        Assert.Empty(rig.FuseMounts());
        Assert.Equal(0, PodRig.CountFiles(rig.CacheChunks));
        Assert.Equal(0, await rig.MetricAsync("stargz_layers_mounted"));
        Assert.Single(await E2eHelpers.StargzSnapshotsAsync(rig.Containerd, "k8s.io"));
        Assert.Equal(0, await RemoteUsageAsync(rig, ct));
        // ... and containerd's ImageFsInfo no longer counts them, nor the pod's containers.
        var usedAfter = await rig.WaitImageFsAsync(v => v + Scratch <= usedRunning, ct);
        Assert.True(usedAfter + Scratch <= usedRunning, $"ImageFsInfo: {usedRunning} bytes while running, {usedAfter} after the pod and image were removed");

        Assert.DoesNotContain(PodRig.Password, rig.Daemon.Log);
        Assert.DoesNotContain(PodRig.Password, rig.Containerd.ReadLog());
        Assert.Null(rig.Daemon.ExitCode);
    }

    /// <summary>
    /// The trade-off the switch is about: without persist_credentials (the default, as the reference) the same restart
    /// leaves the private image's unread chunks unreachable: a new container of the pod cannot read them, and no
    /// credentials file is ever written (one left from before is deleted).
    /// </summary>
    [Fact]
    public async Task WithoutPersistedCredentialsTheUnreadChunksOfAPrivateImageCannotBeFetchedAfterARestart()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await PodRig.StartAsync();
        var img = await PushPrivateImageAsync(rig, "e2e/private-nopersist");
        await rig.GoPrivateAsync(persist: false);

        var imageId = await rig.PullAsync(img.Reference, ct: ct);
        Assert.Equal(img.Layers, rig.FuseMounts().Count);
        Assert.False(File.Exists(rig.CredentialsFile));
        var (pod, podConfig) = await rig.RunPodAsync("nopersist", ct);
        var first = await rig.StartContainerAsync(pod, podConfig, "first", imageId, ["/bin/sh", "-c", "sha256sum /data/early.bin"], ct);
        Assert.Equal(0, (await rig.WaitExitedAsync(first, ct)).ExitCode);
        Assert.StartsWith(img.EarlySha256 + " ", PodRig.ReadStdout(Path.Combine(podConfig.LogDirectory, "first.log")));

        Assert.Equal(0, await rig.Daemon.StopAsync());
        await rig.RestartDaemonAsync();

        string? failure = null;
        try
        {
            var late = await rig.StartContainerAsync(pod, podConfig, "late", imageId, ["/bin/sh", "-c", "sha256sum /data/late.bin"], ct);
            var s = await rig.WaitExitedAsync(late, ct);
            var log = Path.Combine(podConfig.LogDirectory, "late.log");
            var output = PodRig.ReadStdout(log);
            if (s.ExitCode != 0 || !output.StartsWith(img.LateSha256, StringComparison.Ordinal))
                failure = $"exit {s.ExitCode}, stdout [{output}], stderr [{PodRig.ReadStream(log, "stderr")}]";
        }
        catch (RpcException e)
        {
            failure = e.Status.Detail;
        }
        Assert.True(failure != null, "late.bin was read after a restart without persisted credentials: the registry is not private?");
        TestContext.Current.TestOutputHelper?.WriteLine($"without persisted credentials, after the restart: {failure}");
        // Because the private registry refused the daemon (which had no credentials to answer with): a layer error.
        // What the container sees: EIO on the read (the layers themselves were restored from their stored TOCs).
        Assert.Contains("Input/output error", failure);
        var refused = await E2eHelpers.WaitLogLineAsync(rig.Daemon, "asked for Basic auth for", "/e2e/private-nopersist@sha256:");
        Assert.True(refused != null, $"no refusal by the registry in the daemon's log:\n{rig.Tail()}");
        Assert.True(await rig.MetricAsync("stargz_layer_errors") > 0, "no layer error counted");
        Assert.False(File.Exists(rig.CredentialsFile));
        Assert.DoesNotContain(PodRig.Password, rig.Daemon.Log);
    }

    /// <summary>
    /// 20 pods of 5 private images at once, each as kubelet starts one (PullImage with the pull secret through the
    /// daemon's CRI proxy, RunPodSandbox, CreateContainer, StartContainer): all run and print their own pod's and
    /// image's line; the images' layers are lazy mounts, shared by the pods of an image; all is freed afterwards.
    /// </summary>
    [Fact]
    public async Task TwentyPodsOfFivePrivateImagesStartedAtOnceAllRunWithTheRightOutput()
    {
        const int Pods = 20, Images = 5;
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await PodRig.StartAsync();
        var busybox = rig.Work.Sub("base");
        TestImages.WriteBusybox(busybox);
        var images = new string[Images];
        var layers = new HashSet<string>(StringComparer.Ordinal);
        for (var j = 0; j < Images; j++)
        {
            var own = rig.Work.Sub($"own-{j}");
            Directory.CreateDirectory(Path.Combine(own, "etc"));
            await File.WriteAllTextAsync(Path.Combine(own, "etc", "id"), $"image-{j}\n", ct);
            images[j] = await rig.PushEstargzAsync($"e2e/load-{j}", [busybox, own]);
            foreach (var (d, _) in await DaemonMetrics.ManifestLayersAsync(rig.Registry.Host, $"e2e/load-{j}", "esgz")) layers.Add(d);
        }
        await rig.GoPrivateAsync(persist: true);

        var pods = new Task<(string Pod, string Image, int Exit, string Out)>[Pods];
        for (var i = 0; i < Pods; i++)
        {
            var n = i;
            pods[i] = Task.Run(async () =>
            {
                var id = await rig.PullAsync(images[n % Images], ct: ct);
                var (pod, cfg) = await rig.RunPodAsync($"load-{n}", ct);
                var c = await rig.StartContainerAsync(pod, cfg, "main", id, ["/bin/sh", "-c", $"echo pod-{n} $(cat /etc/id)"], ct);
                var s = await rig.WaitExitedAsync(c, ct);
                return (pod, id, s.ExitCode, PodRig.ReadStdout(Path.Combine(cfg.LogDirectory, "main.log")));
            }, ct);
        }
        var done = await Task.WhenAll(pods);
        for (var i = 0; i < Pods; i++)
        {
            Assert.True(done[i].Exit == 0, $"pod {i} exited {done[i].Exit}: [{done[i].Out}]\n{rig.Tail()}");
            Assert.Equal($"pod-{i} image-{i % Images}\n", done[i].Out);
        }
        // One lazy mount per distinct layer, however many pods use it; no layer blob in containerd's content store.
        Assert.Equal(layers.Count, rig.FuseMounts().Count);
        var content = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "content", "ls", "-q")).EnsureSuccess("ctr content ls").StdOut;
        foreach (var d in layers) Assert.DoesNotContain(d, content);
        Assert.Equal(0, await rig.MetricAsync("stargz_layer_errors"));

        foreach (var (pod, _, _, _) in done) await rig.RemovePodAsync(pod, ct);
        foreach (var id in done.Select(d => d.Image).Distinct()) await rig.RemoveImageAsync(id, ct);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while ((rig.FuseMounts().Count > 0 || PodRig.CountFiles(rig.CacheChunks) > 0) && DateTime.UtcNow < deadline) await Task.Delay(250, ct);
        Assert.Empty(rig.FuseMounts());
        Assert.Equal(0, PodRig.CountFiles(rig.CacheChunks));
        Assert.False(File.Exists(rig.CredentialsFile));
        Assert.DoesNotContain(PodRig.Password, rig.Daemon.Log);
        Assert.Null(rig.Daemon.ExitCode);
    }

    /// <summary>The sum of the daemon's Usage (snapshots API) over its remote snapshots.</summary>
    private static async Task<long> RemoteUsageAsync(PodRig rig, CancellationToken ct)
    {
        using var ch = Client.Channel(rig.Daemon.Socket);
        var sn = new Snapshots.SnapshotsClient(ch);
        long total = 0;
        using var list = sn.List(new ListSnapshotsRequest { Snapshotter = "stargz" }, cancellationToken: ct);
        await foreach (var r in list.ResponseStream.ReadAllAsync(ct))
            foreach (var i in r.Info)
                if (i.Labels.TryGetValue("containerd.io/snapshot/remote", out var v) && v == "remote snapshot")
                    total += (await sn.UsageAsync(new UsageRequest { Snapshotter = "stargz", Key = i.Name }, cancellationToken: ct)).Size;
        return total;
    }

    private static async Task<ContainerStatus> ContainerStatusAsync(PodRig rig, string id, CancellationToken ct)
        => (await rig.Cri.Runtime.ContainerStatusAsync(new ContainerStatusRequest { ContainerId = id }, cancellationToken: ct)).Status;

    private static async Task<uint> OwnerAsync(string path)
    {
        var st = await ProcessRunner.RunAsync(Requires.Command("stat"), ["-c", "%u", path], TimeSpan.FromSeconds(10));
        return uint.Parse(st.EnsureSuccess("stat").StdOut.Trim(), System.Globalization.CultureInfo.InvariantCulture);
    }
}
