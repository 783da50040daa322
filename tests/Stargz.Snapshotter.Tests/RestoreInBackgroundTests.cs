using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// A start whose remote layers cannot be mounted quickly (a registry that does not answer) must still serve:
/// the restore goes on in the background (and on demand), ordinary snapshots work meanwhile.
/// </summary>
public class RestoreInBackgroundTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static PrepareSnapshotRequest RemotePrep(string key, string chainId, string digest)
    {
        var r = new PrepareSnapshotRequest { Snapshotter = "stargz", Key = key };
        r.Labels.Add(new Dictionary<string, string>
        {
            ["containerd.io/snapshot.ref"] = chainId,
            ["containerd.io/snapshot/remote/stargz.reference"] = "127.0.0.1:5000/img:esgz",
            [BindMountRemoteFileSystemDouble.DigestLabel] = digest,
            ["containerd.io/snapshot/stargz/toc.digest"] = "sha256:toc-" + digest[7..],
        });
        return r;
    }

    [Fact]
    public async Task StartServesWhileARemoteLayerMountHangsAndTheRestoreFinishesInTheBackground()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var dir = layers.Sub("l1");
        await File.WriteAllTextAsync(Path.Combine(dir, "f.txt"), "restored", Ct);
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", dir);
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        await Client.CodeOf(async () => await s.Client.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));
        var fsDir = Path.Combine(s.Root, "snapshots", "1", "fs");
        Assert.True(File.Exists(Path.Combine(fsDir, "f.txt")));

        // The next start's mount takes far longer than the start may wait (the reference default fetching timeout is
        // 300 s per layer): the start returns (bounded here at 60 s; a blocking restore would take 300 s).
        var slow = new BindMountRemoteFileSystemDouble { MountDelay = TimeSpan.FromSeconds(300) };
        slow.AddLayer("sha256:l1", dir);
        await s.ReopenAsync(slow).WaitAsync(TimeSpan.FromSeconds(60), Ct);
        Assert.Single(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        Assert.Equal("sha256:c1", (await s.Client.StatAsync(new StatSnapshotRequest { Key = "sha256:c1" }, cancellationToken: Ct)).Info.Name);
        var plain = await s.Client.PrepareAsync(new PrepareSnapshotRequest { Key = "plain" }, cancellationToken: Ct);
        Assert.NotEmpty(plain.Mounts);

        // A mount that finishes after the start's wait: the background restore completes it without any call.
        var late = new BindMountRemoteFileSystemDouble { MountDelay = TimeSpan.FromSeconds(15) };
        late.AddLayer("sha256:l1", dir);
        await s.ReopenAsync(late).WaitAsync(TimeSpan.FromSeconds(60), Ct);
        Assert.Single(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(120);
        while (s.Snapshotter.Remote.UnrestoredRemoteSnapshots.Count > 0 && DateTime.UtcNow < deadline) await Task.Delay(200, Ct);
        Assert.Empty(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        Assert.Equal(1, late.MountCalls("sha256:l1"));
        Assert.Equal("restored", await File.ReadAllTextAsync(Path.Combine(fsDir, "f.txt"), Ct));

        // A Prepare on top while the background restore is still mounting waits for that one mount (no second mount).
        var third = new BindMountRemoteFileSystemDouble { MountDelay = TimeSpan.FromSeconds(15) };
        third.AddLayer("sha256:l1", dir);
        await s.ReopenAsync(third).WaitAsync(TimeSpan.FromSeconds(60), Ct);
        var top = await s.Client.PrepareAsync(new PrepareSnapshotRequest { Key = "top", Parent = "sha256:c1" }, cancellationToken: Ct);
        Assert.NotEmpty(top.Mounts);
        Assert.Empty(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        Assert.Equal(1, third.MountCalls("sha256:l1"));
        Assert.Single(Mounts.Under(fsDir));
    }
    [Fact]
    public async Task RemoveWhileTheLayerIsBeingRestoredIsRefusedThenWorksAndLeavesNoMount()
    {
        Requires.Root();
        using var layers = new TempDir("sgs-layers");
        var dir = layers.Sub("l1");
        await File.WriteAllTextAsync(Path.Combine(dir, "f.txt"), "x", Ct);
        var fs = new BindMountRemoteFileSystemDouble();
        fs.AddLayer("sha256:l1", dir);
        await using var s = await InProcessSnapshotter.StartAsync(fs);
        await Client.CodeOf(async () => await s.Client.PrepareAsync(RemotePrep("k1", "sha256:c1", "sha256:l1"), cancellationToken: Ct));

        var slow = new BindMountRemoteFileSystemDouble { MountDelay = TimeSpan.FromSeconds(15) };
        slow.AddLayer("sha256:l1", dir);
        await s.ReopenAsync(slow).WaitAsync(TimeSpan.FromSeconds(60), Ct);
        Assert.Single(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        Assert.Equal(StatusCode.FailedPrecondition, await Client.CodeOf(async () =>
            await s.Client.RemoveAsync(new RemoveSnapshotRequest { Key = "sha256:c1" }, cancellationToken: Ct)));

        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(120);
        while (s.Snapshotter.Remote.UnrestoredRemoteSnapshots.Count > 0 && DateTime.UtcNow < deadline) await Task.Delay(200, Ct);
        Assert.Empty(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        await s.Client.RemoveAsync(new RemoveSnapshotRequest { Key = "sha256:c1" }, cancellationToken: Ct);
        Assert.Empty(Mounts.Under(Path.Combine(s.Root, "snapshots")));
        Assert.Empty(s.Snapshotter.Remote.UnrestoredRemoteSnapshots);
        Assert.Equal((0, 0), s.Snapshotter.Remote.RemoteSnapshotCounts());
    }
}
