using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// The remote-snapshot logic through gRPC, with <see cref="BindMountRemoteFileSystemDouble"/> standing in for the lazy
/// layer (a bind mount of a prepared dir). The requests carry the labels containerd and ctr-remote send.
/// </summary>
public class RemoteSnapshotTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static PrepareSnapshotRequest RemotePrep(string key, string chainId, string digest, string parent = "")
    {
        var r = new PrepareSnapshotRequest { Snapshotter = "stargz", Key = key, Parent = parent };
        r.Labels.Add(new Dictionary<string, string>
        {
            ["containerd.io/snapshot.ref"] = chainId,
            ["containerd.io/snapshot/remote/stargz.reference"] = "127.0.0.1:5000/img:esgz",
            [BindMountRemoteFileSystemDouble.DigestLabel] = digest,
            ["containerd.io/snapshot/remote/stargz.layers"] = "sha256:l1,sha256:l2",
            ["containerd.io/snapshot/stargz/toc.digest"] = "sha256:toc-" + digest[7..],
        });
        return r;
    }

    private static string Layer(TempDir dir, string name, string file, string content)
    {
        var d = dir.Sub(name);
        File.WriteAllText(Path.Combine(d, file), content);
        return d;
    }

    [Fact]
    public async Task PrepareWithSnapshotRefMountsTheLayerCommitsItUnderTheRefAndAnswersAlreadyExists()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "one.txt", "layer one"));
        fs.AddLayer("sha256:l2", Layer(layers, "l2", "two.txt", "layer two"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        var c = s.Client;

        var e1 = await Assert.ThrowsAsync<RpcException>(async () =>
            await c.PrepareAsync(RemotePrep("default/1/extract-1 sha256:c1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));
        Assert.Equal(StatusCode.AlreadyExists, e1.StatusCode);
        var e2 = await Assert.ThrowsAsync<RpcException>(async () =>
            await c.PrepareAsync(RemotePrep("default/2/extract-2 sha256:c2", "sha256:c2", "sha256:l2", parent: "sha256:c1"), cancellationToken: Ct));
        Assert.Equal(StatusCode.AlreadyExists, e2.StatusCode);

        // What containerd's metadata layer does next: walk for the committed target with its ref label and parent.
        var found = await Client.ListAll(c, Ct, "labels.\"containerd.io/snapshot.ref\"==sha256:c2,parent==\"sha256:c1\"");
        var info = Assert.Single(found);
        Assert.Equal("sha256:c2", info.Name);
        Assert.Equal(Kind.Committed, info.Kind);
        Assert.Equal("remote snapshot", info.Labels["containerd.io/snapshot/remote"]);
        // The extract keys were consumed by the commit.
        Assert.Equal(["sha256:c1", "sha256:c2"], (await Client.ListAll(c, Ct)).Select(i => i.Name));

        // A container on top sees both remote layers through overlay.
        var m = (await c.PrepareAsync(new PrepareSnapshotRequest { Key = "container", Parent = "sha256:c2" }, cancellationToken: Ct)).Mounts.Single();
        using var target = new TempDir("sgs-mnt");
        await SnapshotsApiTests.MountAsync(m, target.Path);
        try
        {
            Assert.Equal("layer one", await File.ReadAllTextAsync(Path.Combine(target.Path, "one.txt"), Ct));
            Assert.Equal("layer two", await File.ReadAllTextAsync(Path.Combine(target.Path, "two.txt"), Ct));
        }
        finally { Mounts.UnmountAllUnder(target.Path); }

        // Remove unmounts the layer before its dir goes.
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "container" }, cancellationToken: Ct);
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "sha256:c2" }, cancellationToken: Ct);
        Assert.Single(fs.Mounted);
        Assert.Single(Mounts.Under(Path.Combine(s.Root, "snapshots")));
        Assert.True(File.Exists(Path.Combine(layers.Path, "l2", "two.txt")), "the layer's source must not be deleted through the mount");
    }

    [Fact]
    public async Task WhenTheLayerCannotBeServedPrepareFallsBackToAnOrdinaryActiveSnapshot()
    {
        Requires.Root();
        var fs = new BindMountRemoteFileSystemDouble(); // knows no layers: every mount is refused
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        var c = s.Client;
        var resp = await c.PrepareAsync(RemotePrep("default/1/extract-1 sha256:c1", "sha256:c1", "sha256:plain-gzip"), cancellationToken: Ct);
        var m = resp.Mounts.Single();
        Assert.Equal("bind", m.Type);
        Assert.Equal(["rw", "rbind"], m.Options);
        Assert.Equal(1, fs.MountCalls("sha256:plain-gzip"));
        var info = (await c.StatAsync(new StatSnapshotRequest { Key = "default/1/extract-1 sha256:c1" }, cancellationToken: Ct)).Info;
        Assert.Equal(Kind.Active, info.Kind);
        Assert.False(info.Labels.ContainsKey("containerd.io/snapshot/remote"));
        // containerd then applies the layer and commits it itself.
        await File.WriteAllTextAsync(Path.Combine(m.Source, "applied.txt"), "downloaded", Ct);
        await c.CommitAsync(new CommitSnapshotRequest { Name = "sha256:c1", Key = "default/1/extract-1 sha256:c1" }, cancellationToken: Ct);
        Assert.Empty(Mounts.Under(s.Root));
    }

    [Fact]
    public async Task ConcurrentPreparesOfOneChainIdMountOnceAndAllSeeAlreadyExists()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble { MountDelay = TimeSpan.FromMilliseconds(300) };
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "f", "x"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        var c = s.Client;
        var calls = Enumerable.Range(0, 8).Select(i => Client.CodeOf(async () =>
            await c.PrepareAsync(RemotePrep($"default/{i}/extract-{i} sha256:c1", "sha256:c1", "sha256:l1"), cancellationToken: Ct))).ToList();
        var codes = await Task.WhenAll(calls);
        Assert.All(codes, code => Assert.Equal(StatusCode.AlreadyExists, code));
        Assert.Equal(1, fs.MountCalls("sha256:l1"));
        Assert.Single(fs.Mounted);
        var all = await Client.ListAll(c, Ct);
        Assert.Equal(["sha256:c1"], all.Select(i => i.Name)); // no stray active snapshots from the losers
    }

    [Fact]
    public async Task AnUnhealthyRemoteLayerMakesCallsOnTopOfItUnavailable_ChecksAreCachedForValidInterval()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "f", "x"));
        // valid_interval long enough that a loaded machine does not expire it between two calls of this test.
        await using var s = await InProcessSnapshotter.StartAsync(fs, validInterval: TimeSpan.FromSeconds(3));
        var c = s.Client;
        await Client.CodeOf(async () => await c.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));
        await c.PrepareAsync(new PrepareSnapshotRequest { Key = "container", Parent = "sha256:c1" }, cancellationToken: Ct);
        // Just mounted: the check is fresh, no Check call needed.
        Assert.Equal(0, fs.CheckCalls);

        fs.SetUnhealthy("sha256:l1", true);
        // Within valid_interval the last good check still stands.
        await c.MountsAsync(new MountsRequest { Key = "container" }, cancellationToken: Ct);
        Assert.Equal(0, fs.CheckCalls);
        await Task.Delay(3100, Ct);
        var e = await Assert.ThrowsAsync<RpcException>(async () => await c.MountsAsync(new MountsRequest { Key = "container" }, cancellationToken: Ct));
        Assert.Equal(StatusCode.Unavailable, e.StatusCode);
        Assert.Contains("sha256:l1", e.Status.Detail);
        Assert.Equal(StatusCode.Unavailable, await Client.CodeOf(async () =>
            await c.ViewAsync(new ViewSnapshotRequest { Key = "v", Parent = "sha256:c1" }, cancellationToken: Ct)));
        Assert.Equal(StatusCode.Unavailable, await Client.CodeOf(async () =>
            await c.PrepareAsync(new PrepareSnapshotRequest { Key = "c2", Parent = "sha256:c1" }, cancellationToken: Ct)));

        fs.SetUnhealthy("sha256:l1", false);
        await c.MountsAsync(new MountsRequest { Key = "container" }, cancellationToken: Ct);
        var checks = fs.CheckCalls;
        await c.MountsAsync(new MountsRequest { Key = "container" }, cancellationToken: Ct);
        await c.MountsAsync(new MountsRequest { Key = "container" }, cancellationToken: Ct);
        Assert.Equal(checks, fs.CheckCalls); // within valid_interval: cached
    }

    [Fact]
    public async Task RestartRemountsRemoteSnapshots_WithoutARemoteFsTheyAreReportedAndUnavailable()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "f.txt", "restored"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        await Client.CodeOf(async () => await s.Client.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));
        var fsDir = Path.Combine(s.Root, "snapshots", "1", "fs");
        Assert.True(File.Exists(Path.Combine(fsDir, "f.txt")));

        // Shutdown unmounts; the next start mounts again.
        var fs2 = new BindMountRemoteFileSystemDouble();
        fs2.AddLayer("sha256:l1", Path.Combine(layers.Path, "l1"));
        await s.ReopenAsync(fs2);
        Assert.Equal(1, fs2.MountCalls("sha256:l1"));
        Assert.Equal("restored", await File.ReadAllTextAsync(Path.Combine(fsDir, "f.txt"), Ct));
        Assert.Empty(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);

        // A daemon without a remote filesystem keeps the snapshot, reports it, and answers Unavailable on top of it.
        await s.ReopenAsync(null);
        Assert.Single(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        Assert.Equal("sha256:c1", (await s.Client.StatAsync(new StatSnapshotRequest { Key = "sha256:c1" }, cancellationToken: Ct)).Info.Name);
        Assert.Equal(StatusCode.Unavailable, await Client.CodeOf(async () =>
            await s.Client.PrepareAsync(new PrepareSnapshotRequest { Key = "container", Parent = "sha256:c1" }, cancellationToken: Ct)));
        Assert.Empty(Mounts.Under(Path.Combine(s.Root, "snapshots")));
    }

    [Fact]
    public async Task StaleMountsUnderTheRootAreUnmountedAtStart()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "f.txt", "x"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        await Client.CodeOf(async () => await s.Client.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));
        // Mount something extra under the root, as a daemon killed mid-way would leave; a new start must clear it.
        var stray = Path.Combine(s.Root, "snapshots", "1", "fs");
        var fs2 = new BindMountRemoteFileSystemDouble();
        fs2.AddLayer("sha256:l1", Path.Combine(layers.Path, "l1"));
        await fs2.MountAsync(stray, new Dictionary<string, string> { [BindMountRemoteFileSystemDouble.DigestLabel] = "sha256:l1" }, Ct);
        Assert.Equal(2, Mounts.Under(stray).Count); // the live one and the stray on top
        var fs3 = new BindMountRemoteFileSystemDouble();
        fs3.AddLayer("sha256:l1", Path.Combine(layers.Path, "l1"));
        await s.ReopenAsync(fs3);
        Assert.Single(Mounts.Under(stray));
    }

    [Fact]
    public async Task ShutdownLetsAnInFlightPrepareFinishAndKeepsItsSnapshot()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble { MountDelay = TimeSpan.FromSeconds(1.5) };
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "f", "x"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        var inFlight = Client.CodeOf(async () => await s.Client.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));
        while (fs.MountCalls("sha256:l1") == 0) await Task.Delay(10, Ct);
        await s.StopAsync(); // graceful stop while the mount is under way
        Assert.Equal(StatusCode.AlreadyExists, await inFlight);

        var fs2 = new BindMountRemoteFileSystemDouble();
        fs2.AddLayer("sha256:l1", Path.Combine(layers.Path, "l1"));
        await s.ReopenAsync(fs2);
        Assert.Equal("remote snapshot", (await s.Client.StatAsync(new StatSnapshotRequest { Key = "sha256:c1" }, cancellationToken: Ct)).Info.Labels["containerd.io/snapshot/remote"]);
    }

    [Fact]
    public async Task RemovingARemoteSnapshotReleasesItsLayer_ShutdownOnlyUnmounts()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "one.txt", "layer one"));
        fs.AddLayer("sha256:l2", Layer(layers, "l2", "two.txt", "layer two"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        var c = s.Client;
        Assert.Equal(StatusCode.AlreadyExists, await Client.CodeOf(async () =>
            await c.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.AlreadyExists, await Client.CodeOf(async () =>
            await c.PrepareAsync(RemotePrep("k2", "sha256:c2", "sha256:l2", parent: "sha256:c1"), cancellationToken: Ct)));
        var fs1 = Path.Combine(s.Root, "snapshots", "1", "fs");
        var fs2 = Path.Combine(s.Root, "snapshots", "2", "fs");
        Assert.Equal("sha256:l2", fs.Mounted[fs2]);

        // Remove (what containerd's GC sends) releases the layer: unmount and free its cache, not a plain unmount.
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "sha256:c2" }, cancellationToken: Ct);
        Assert.Equal([fs2], fs.Releases);
        Assert.Empty(fs.Unmounts);
        Assert.False(fs.Mounted.ContainsKey(fs2));
        Assert.True(fs.Mounted.ContainsKey(fs1));

        // Shutdown unmounts what is left (its cache must survive the restart): UnmountAsync, never ReleaseAsync.
        await s.StopAsync();
        Assert.Equal([fs1], fs.Unmounts);
        Assert.Equal([fs2], fs.Releases);
        Assert.Empty(fs.Mounted);
    }

    private sealed class UnmountOnlyRemoteFileSystem : IRemoteFileSystem
    {
        public List<string> Unmounted { get; } = [];
        public Task MountAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct) => Task.CompletedTask;
        public Task CheckAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct) => Task.CompletedTask;
        public Task UnmountAsync(string mountpoint, CancellationToken ct)
        {
            Unmounted.Add(mountpoint);
            return Task.CompletedTask;
        }
    }

    [Fact]
    public async Task ARemoteFileSystemWithoutReleaseIsUnmountedOnRelease()
    {
        IRemoteFileSystem fs = new UnmountOnlyRemoteFileSystem();
        await fs.ReleaseAsync("/mnt/layer", Ct);
        Assert.Equal(["/mnt/layer"], ((UnmountOnlyRemoteFileSystem)fs).Unmounted);
    }

    [Fact]
    public async Task CleanupUnmountsAndRemovesADirNoSnapshotOwns()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", Layer(layers, "l1", "f.txt", "must survive"));
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        // A layer mount left in a dir with no metadata (e.g. a crash after mounting, before the commit).
        var orphan = Path.Combine(s.Root, "snapshots", "new-crashed", "fs");
        await fs.MountAsync(orphan, new Dictionary<string, string> { [BindMountRemoteFileSystemDouble.DigestLabel] = "sha256:l1" }, Ct);
        Assert.Single(Mounts.Under(orphan));

        await s.Client.CleanupAsync(new CleanupRequest(), cancellationToken: Ct);
        Assert.Empty(Mounts.Under(Path.Combine(s.Root, "snapshots")));
        Assert.False(Directory.Exists(Path.GetDirectoryName(orphan)));
        Assert.Equal("must survive", await File.ReadAllTextAsync(Path.Combine(layers.Path, "l1", "f.txt"), Ct));
    }
}
