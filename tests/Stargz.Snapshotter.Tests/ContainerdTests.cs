using System.Text.Json;
using Containerd.Services.Snapshots.V1;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// Real containerd 1.6 (proxy plugin `stargz` -> our daemon process) + real runc + a real registry: what a user does
/// with `ctr --snapshotter stargz`.
/// </summary>
public class ContainerdTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task PlainGzipImagePullsAndRunsThroughOurSnapshotter_AndStillRunsAfterADaemonRestartWithoutTheRegistry()
    {
        Requires.Root();
        Requires.Command("containerd");
        Requires.Command("runc");
        var registry = await LocalRegistry.StartAsync();
        await using var registryCleanup = registry;
        using var work = new TempDir("sgs-img");
        var l1 = work.Sub("layer1");
        TestImages.WriteBusybox(l1);
        var l2 = work.Sub("layer2");
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        await File.WriteAllTextAsync(Path.Combine(l2, "data", "hello.txt"), "hello from layer 2\n", Ct);
        var l3 = work.Sub("layer3");
        Directory.CreateDirectory(Path.Combine(l3, "data"));
        await File.WriteAllTextAsync(Path.Combine(l3, "data", "more.txt"), "and layer 3\n", Ct);
        // Layer 2 adds a file that a fourth layer deletes (an OCI whiteout): the container must not see it.
        await File.WriteAllTextAsync(Path.Combine(l2, "data", "gone.txt"), "deleted above\n", Ct);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1, l2, l3]);
        (await ProcessRunner.RunAsync(Requires.Command("umoci"), ["insert", "--image", $"{layout}:v1", "--no-history", "--whiteout", "/data/gone.txt"]))
            .EnsureSuccess("umoci insert --whiteout");
        await TestImages.PushAsync(layout, "v1", registry.Host, "snap/plain:v1");
        var image = $"{registry.Host}/snap/plain:v1";

        await using var daemon = await LocalDaemon.StartAsync();
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);

        var pull = await ctd.CtrAsync("image", "pull", "--plain-http", "--snapshotter", "stargz", image);
        pull.EnsureSuccess($"ctr pull --snapshotter stargz\ndaemon log:\n{daemon.Log}");
        var run = await ctd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, "run-1", "/bin/cat", "/data/hello.txt", "/data/more.txt");
        run.EnsureSuccess($"ctr run\ndaemon log:\n{daemon.Log}\ncontainerd log:\n{ctd.ReadLog()}");
        Assert.Equal("hello from layer 2\nand layer 3", run.StdOut.Trim());
        var ls = await ctd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, "run-ls", "/bin/ls", "/data");
        ls.EnsureSuccess("ctr run ls");
        Assert.Equal(["hello.txt", "more.txt"], ls.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));

        // The layers live in our store: three committed snapshots, keyed as containerd's proxy sends them.
        using (var ch = Client.Channel(daemon.Socket))
        {
            var committed = await Client.ListAll(new Snapshots.SnapshotsClient(ch), Ct, "kind==committed");
            Assert.Equal(4, committed.Count);
            Assert.All(committed, i => Assert.StartsWith("default/", i.Name));
        }

        // Restart the daemon (SIGTERM drains and closes the store), take the registry away: the image still runs.
        Assert.Equal(0, await daemon.StopAsync());
        await registry.DisposeAsync();
        await daemon.RestartAsync();
        ProcessResult? again = null;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        for (int i = 0; DateTime.UtcNow < deadline; i++)
        {
            // containerd's proxy client may still be in reconnect backoff for a while.
            again = await ctd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, $"run-2-{i}", "/bin/cat", "/data/hello.txt");
            if (again.ExitCode == 0) break;
            await Task.Delay(1000, Ct);
        }
        Assert.NotNull(again);
        again.EnsureSuccess($"ctr run after restart\ndaemon log:\n{daemon.Log}");
        Assert.Equal("hello from layer 2", again.StdOut.Trim());

        // SIGKILL (no shutdown code at all), start again: still runnable.
        await daemon.KillAsync();
        await daemon.RestartAsync();
        var third = await RunUntilReachable(ctd, image, "run-3", "/bin/cat", "/data/more.txt");
        third.EnsureSuccess($"ctr run after SIGKILL\ndaemon log:\n{daemon.Log}");
        Assert.Equal("and layer 3", third.StdOut.Trim());
    }

    /// <summary>`ctr run` retried while containerd's proxy client is in reconnect backoff after our daemon restarted.</summary>
    private static async Task<ProcessResult> RunUntilReachable(LocalContainerd ctd, string image, string id, params string[] cmd)
    {
        ProcessResult r = null!;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        for (int i = 0; DateTime.UtcNow < deadline; i++)
        {
            r = await ctd.CtrAsync(["run", "--rm", "--snapshotter", "stargz", image, $"{id}-{i}", .. cmd]);
            if (r.ExitCode == 0) break;
            await Task.Delay(1000, Ct);
        }
        return r;
    }

    /// <summary>
    /// The remote path against real containerd and the real reference client: `ctr-remote image rpull` sends the stargz
    /// labels, our snapshotter mounts each layer through the seam (here the bind-mount test double serving the layer's
    /// source dir in place of the lazy layer), commits it under the chainID and answers AlreadyExists; containerd finds it
    /// with its Walk filter, skips the download, and `ctr run` works on the remote layers.
    /// </summary>
    [Fact]
    public async Task RpullMakesRemoteSnapshotsThatContainerdUsesWithoutDownloadingTheLayers()
    {
        Requires.Root();
        Requires.Command("containerd");
        Requires.Command("runc");
        Requires.Command("ctr-remote");
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("sgs-img");
        var l1 = work.Sub("layer1");
        TestImages.WriteBusybox(l1);
        var l2 = work.Sub("layer2");
        Directory.CreateDirectory(Path.Combine(l2, "data"));
        await File.WriteAllTextAsync(Path.Combine(l2, "data", "hello.txt"), "served remotely\n", Ct);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1, l2]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "snap/remote:v1");
        var image = $"{registry.Host}/snap/remote:v1";
        var digests = await LayerDigests(registry.Host, "snap/remote", "v1");
        Assert.Equal(2, digests.Count);

        var seam = new BindMountRemoteFileSystemDouble();
        seam.AddLayer(digests[0], l1);
        seam.AddLayer(digests[1], l2);
        await using var sn = await InProcessSnapshotter.StartAsync(seam);
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: sn.Socket);

        (await ctd.CtrRemoteAsync("image", "rpull", "--plain-http", "--snapshotter", "stargz", image)).EnsureSuccess("ctr-remote rpull");
        Assert.Equal(1, seam.MountCalls(digests[0]));
        Assert.Equal(1, seam.MountCalls(digests[1]));
        var remote = await Client.ListAll(sn.Client, Ct, "labels.\"containerd.io/snapshot/remote\"==\"remote snapshot\"");
        Assert.Equal(2, remote.Count);
        Assert.All(remote, i => Assert.StartsWith("sha256:", i.Name)); // committed under the bare chainID

        // No layer blob was downloaded into containerd's content store.
        var content = (await ctd.CtrAsync("content", "ls", "-q")).EnsureSuccess("ctr content ls").StdOut;
        Assert.DoesNotContain(digests[0], content);
        Assert.DoesNotContain(digests[1], content);

        var run = await ctd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, "remote-run", "/bin/cat", "/data/hello.txt");
        run.EnsureSuccess($"ctr run on remote snapshots\ncontainerd log:\n{ctd.ReadLog()}");
        Assert.Equal("served remotely", run.StdOut.Trim());

        // Restart the snapshotter: the remote layers are mounted again from the store and a new container runs.
        var seam2 = new BindMountRemoteFileSystemDouble();
        seam2.AddLayer(digests[0], l1);
        seam2.AddLayer(digests[1], l2);
        await sn.ReopenAsync(seam2);
        Assert.Equal(1, seam2.MountCalls(digests[0]));
        Assert.Equal(1, seam2.MountCalls(digests[1]));
        var after = await RunUntilReachable(ctd, image, "remote-run-2", "/bin/cat", "/data/hello.txt");
        after.EnsureSuccess($"ctr run after restore\ncontainerd log:\n{ctd.ReadLog()}");
        Assert.Equal("served remotely", after.StdOut.Trim());
    }

    /// <summary>Layer digests of REPO:TAG, bottom first, from the registry's manifest.</summary>
    private static async Task<List<string>> LayerDigests(string host, string repo, string tag)
    {
        using var http = new HttpClient();
        var req = new HttpRequestMessage(HttpMethod.Get, $"http://{host}/v2/{repo}/manifests/{tag}");
        req.Headers.Accept.ParseAdd("application/vnd.oci.image.manifest.v1+json");
        req.Headers.Accept.ParseAdd("application/vnd.docker.distribution.manifest.v2+json");
        using var resp = await http.SendAsync(req, Ct);
        resp.EnsureSuccessStatusCode();
        using var doc = JsonDocument.Parse(await resp.Content.ReadAsStringAsync(Ct));
        return doc.RootElement.GetProperty("layers").EnumerateArray().Select(l => l.GetProperty("digest").GetString()!).ToList();
    }
}

/// <summary>Long keys and many labels sent through real containerd 1.6's snapshots service to our snapshotter.</summary>
public class ContainerdLongKeyTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task ALongKeyAndTenThousandLabelsWorkThroughContainerd()
    {
        Requires.Root();
        Requires.Command("containerd");
        await using var sn = await InProcessSnapshotter.StartAsync();
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: sn.Socket);
        using var ch = Client.Channel(ctd.Socket);
        var c = new Snapshots.SnapshotsClient(ch);
        var ns = Client.Ns("default");
        var key = "long-" + new string('k', 100_000);
        // containerd passes on only labels under containerd.io/snapshot/ (and snapshot.ref).
        var labels = Enumerable.Range(0, 10_000).ToDictionary(i => $"containerd.io/snapshot/test.label-{i:D5}", i => "value-" + i);
        // containerd's GC (which the Remove below starts) collects snapshots that no lease or GC root holds. A lease
        // cannot hold these (containerd keeps leased keys as bolt keys, which refuse over 32 KiB): a GC-root label
        // does, and containerd keeps it to itself.
        var gcRoot = new KeyValuePair<string, string>("containerd.io/gc.root", DateTime.UtcNow.ToString("o"));
        var req = new PrepareSnapshotRequest { Snapshotter = "stargz", Key = key };
        req.Labels.Add(labels);
        req.Labels.Add(gcRoot.Key, gcRoot.Value);
        var prep = await c.PrepareAsync(req, ns, cancellationToken: Ct);
        var dir = prep.Mounts.Single().Source;
        await File.WriteAllTextAsync(Path.Combine(dir, "f.txt"), "through containerd", Ct);

        var info = (await c.StatAsync(new StatSnapshotRequest { Snapshotter = "stargz", Key = key }, ns, cancellationToken: Ct)).Info;
        Assert.Equal(key, info.Name);
        Assert.Equal(new Dictionary<string, string>(labels) { [gcRoot.Key] = gcRoot.Value }, info.Labels.ToDictionary());
        // In our store, under containerd's namespaced form of the key, with every label.
        var ours = (await Client.ListAll(sn.Client, Ct)).Single();
        Assert.EndsWith("/" + key, ours.Name);
        Assert.Equal(labels, ours.Labels.ToDictionary());

        // containerd itself keeps the name of a snapshot with a parent as a bolt key in the parent's record, and bolt
        // refuses keys over 32 KiB ("key too large", before containerd asks us): children's names stay under that.
        var name = "committed-" + new string('c', 30_000);
        var commit = new CommitSnapshotRequest { Snapshotter = "stargz", Name = name, Key = key };
        commit.Labels.Add(gcRoot.Key, gcRoot.Value);
        await c.CommitAsync(commit, ns, cancellationToken: Ct);
        var viewKey = "view-" + new string('v', 30_000);
        var view = (await c.ViewAsync(new ViewSnapshotRequest { Snapshotter = "stargz", Key = viewKey, Parent = name }, ns, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("through containerd", await File.ReadAllTextAsync(Path.Combine(view.Source, "f.txt"), Ct));
        await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = viewKey }, ns, cancellationToken: Ct);
        await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = name }, ns, cancellationToken: Ct);
    }
}
