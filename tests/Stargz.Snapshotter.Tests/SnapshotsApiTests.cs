using Containerd.Services.Snapshots.V1;
using Containerd.Types;
using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// Every snapshots API call through a real gRPC client on a real unix socket, against LiteDB on disk, with containerd's
/// overlayfs-snapshotter semantics and error codes.
/// </summary>
public class SnapshotsApiTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static PrepareSnapshotRequest Prep(string key, string parent = "", Dictionary<string, string>? labels = null)
    {
        var r = new PrepareSnapshotRequest { Snapshotter = "stargz", Key = key, Parent = parent };
        if (labels != null) r.Labels.Add(labels);
        return r;
    }

    private static CommitSnapshotRequest Commit(string name, string key, Dictionary<string, string>? labels = null)
    {
        var r = new CommitSnapshotRequest { Snapshotter = "stargz", Name = name, Key = key };
        if (labels != null) r.Labels.Add(labels);
        return r;
    }

    /// <summary>Prepare a layer, write files into the returned dir, commit it: the base layer of a chain.</summary>
    private static async Task<string> CommittedLayer(Snapshots.SnapshotsClient c, string name, string parent, Dictionary<string, string> files)
    {
        var key = "extract-" + name;
        var m = (await c.PrepareAsync(Prep(key, parent), cancellationToken: Ct)).Mounts.Single();
        string dir;
        if (m.Type == "bind") dir = m.Source;
        else dir = m.Options.Single(o => o.StartsWith("upperdir=", StringComparison.Ordinal))["upperdir=".Length..];
        foreach (var (path, content) in files)
        {
            var full = Path.Combine(dir, path);
            Directory.CreateDirectory(Path.GetDirectoryName(full)!);
            await File.WriteAllTextAsync(full, content, Ct);
        }
        await c.CommitAsync(Commit(name, key), cancellationToken: Ct);
        return name;
    }

    [Fact]
    public async Task PrepareWithoutParentIsWritableBindMountAndCommitRecordsUsage()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        var m = (await c.PrepareAsync(Prep("default/1/extract-a", labels: new() { ["x"] = "1" }), cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("bind", m.Type);
        Assert.Equal(["rw", "rbind"], m.Options);
        Assert.True(Directory.Exists(m.Source));
        Assert.Empty(Directory.GetFileSystemEntries(m.Source));
        await File.WriteAllBytesAsync(Path.Combine(m.Source, "data.bin"), new byte[100_000], Ct);

        var active = (await c.StatAsync(new StatSnapshotRequest { Snapshotter = "stargz", Key = "default/1/extract-a" }, cancellationToken: Ct)).Info;
        Assert.Equal(Kind.Active, active.Kind);
        Assert.Equal("1", active.Labels["x"]);
        var activeUsage = await c.UsageAsync(new UsageRequest { Key = "default/1/extract-a" }, cancellationToken: Ct);
        Assert.True(activeUsage.Size >= 100_000, $"active usage {activeUsage.Size}");

        await c.CommitAsync(Commit("default/2/sha256:aaa", "default/1/extract-a", new() { ["y"] = "2" }), cancellationToken: Ct);
        var info = (await c.StatAsync(new StatSnapshotRequest { Key = "default/2/sha256:aaa" }, cancellationToken: Ct)).Info;
        Assert.Equal(Kind.Committed, info.Kind);
        Assert.Equal("", info.Parent);
        // Commit replaces labels, as containerd's storage does.
        Assert.Equal(new Dictionary<string, string> { ["y"] = "2" }, info.Labels.ToDictionary());
        var usage = await c.UsageAsync(new UsageRequest { Key = "default/2/sha256:aaa" }, cancellationToken: Ct);
        Assert.True(usage.Size >= 100_000, $"usage {usage.Size}");
        Assert.Equal(2, usage.Inodes); // the fs dir and the file
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.StatAsync(new StatSnapshotRequest { Key = "default/1/extract-a" }, cancellationToken: Ct)));
    }

    [Fact]
    public async Task PrepareOnAChainGivesAnOverlayThatShowsEveryLayerAndWritesToItsUpperDir()
    {
        Requires.Root();
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        await CommittedLayer(c, "l1", "", new() { ["a.txt"] = "from l1", ["shadowed.txt"] = "old" });
        await CommittedLayer(c, "l2", "l1", new() { ["b.txt"] = "from l2", ["shadowed.txt"] = "new" });
        var m = (await c.PrepareAsync(Prep("container-1", "l2"), cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("overlay", m.Type);
        var lower = m.Options.Single(o => o.StartsWith("lowerdir=", StringComparison.Ordinal))["lowerdir=".Length..].Split(':');
        Assert.Equal(2, lower.Length);
        Assert.Contains(m.Options, o => o.StartsWith("upperdir=", StringComparison.Ordinal));
        Assert.Contains(m.Options, o => o.StartsWith("workdir=", StringComparison.Ordinal));

        // Mount it as containerd would and look at it as a container would.
        using var target = new TempDir("sgs-mnt");
        await MountAsync(m, target.Path);
        try
        {
            Assert.Equal("from l1", await File.ReadAllTextAsync(Path.Combine(target.Path, "a.txt"), Ct));
            Assert.Equal("from l2", await File.ReadAllTextAsync(Path.Combine(target.Path, "b.txt"), Ct));
            Assert.Equal("new", await File.ReadAllTextAsync(Path.Combine(target.Path, "shadowed.txt"), Ct));
            await File.WriteAllTextAsync(Path.Combine(target.Path, "written.txt"), "by the container", Ct);
        }
        finally { Mounts.UnmountAllUnder(target.Path); }
        var upper = m.Options.Single(o => o.StartsWith("upperdir=", StringComparison.Ordinal))["upperdir=".Length..];
        Assert.Equal("by the container", await File.ReadAllTextAsync(Path.Combine(upper, "written.txt"), Ct));

        // Mounts returns the same answer later.
        var again = (await c.MountsAsync(new MountsRequest { Key = "container-1" }, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal(m, again);
    }

    [Fact]
    public async Task ViewsAreReadOnly_BindForOneParent_OverlayLowerdirsForMore()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        await CommittedLayer(c, "l1", "", new() { ["a"] = "1" });
        await CommittedLayer(c, "l2", "l1", new() { ["b"] = "2" });
        var v1 = (await c.ViewAsync(new ViewSnapshotRequest { Key = "view-1", Parent = "l1" }, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("bind", v1.Type);
        Assert.Equal(["ro", "rbind"], v1.Options);
        Assert.True(File.Exists(Path.Combine(v1.Source, "a")));

        var v2 = (await c.ViewAsync(new ViewSnapshotRequest { Key = "view-2", Parent = "l2" }, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("overlay", v2.Type);
        Assert.DoesNotContain(v2.Options, o => o.StartsWith("upperdir=", StringComparison.Ordinal));
        var lower = v2.Options.Single(o => o.StartsWith("lowerdir=", StringComparison.Ordinal))["lowerdir=".Length..].Split(':');
        Assert.True(File.Exists(Path.Combine(lower[0], "b")), "top layer first in lowerdir");
        Assert.True(File.Exists(Path.Combine(lower[1], "a")));

        var info = (await c.StatAsync(new StatSnapshotRequest { Key = "view-2" }, cancellationToken: Ct)).Info;
        Assert.Equal(Kind.View, info.Kind);
        Assert.Equal("l2", info.Parent);
        // A view cannot be committed.
        Assert.Equal(StatusCode.FailedPrecondition, await Client.CodeOf(async () =>
            await c.CommitAsync(Commit("v-committed", "view-2"), cancellationToken: Ct)));
    }

    [Fact]
    public async Task ErrorsMapToTheCodesContainerdExpects()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        await CommittedLayer(c, "base", "", new() { ["f"] = "x" });
        await c.PrepareAsync(Prep("active-1", "base"), cancellationToken: Ct);

        Assert.Equal(StatusCode.AlreadyExists, await Client.CodeOf(async () => await c.PrepareAsync(Prep("active-1", "base"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.AlreadyExists, await Client.CodeOf(async () => await c.PrepareAsync(Prep("base"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.PrepareAsync(Prep("k2", "no-such-parent"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.InvalidArgument, await Client.CodeOf(async () => await c.PrepareAsync(Prep("k3", "active-1"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.InvalidArgument, await Client.CodeOf(async () => await c.PrepareAsync(Prep(""), cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.CommitAsync(Commit("n", "no-such-key"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.FailedPrecondition, await Client.CodeOf(async () => await c.CommitAsync(Commit("n", "base"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.AlreadyExists, await Client.CodeOf(async () => await c.CommitAsync(Commit("base", "active-1"), cancellationToken: Ct)));
        Assert.Equal(StatusCode.FailedPrecondition, await Client.CodeOf(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Key = "base" }, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Key = "nope" }, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.StatAsync(new StatSnapshotRequest { Key = "nope" }, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.MountsAsync(new MountsRequest { Key = "nope" }, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.UsageAsync(new UsageRequest { Key = "nope" }, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () => await c.UpdateAsync(
            new UpdateSnapshotRequest { Info = new Info { Name = "nope" } }, cancellationToken: Ct)));
        var badMask = new UpdateSnapshotRequest { Info = new Info { Name = "base", Parent = "x" }, UpdateMask = new FieldMask() };
        badMask.UpdateMask.Paths.Add("parent");
        Assert.Equal(StatusCode.InvalidArgument, await Client.CodeOf(async () => await c.UpdateAsync(badMask, cancellationToken: Ct)));
        Assert.Equal(StatusCode.InvalidArgument, await Client.CodeOf(async () => await Client.ListAll(c, Ct, "labels.\"unterminated")));

        // The failed calls changed nothing: one committed, one active, in that order.
        var all = await Client.ListAll(c, Ct);
        Assert.Equal(["base", "active-1"], all.Select(i => i.Name));

        // Once the child is gone the parent can go, and its dir with it.
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "active-1" }, cancellationToken: Ct);
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "base" }, cancellationToken: Ct);
        Assert.Empty(await Client.ListAll(c, Ct));
        Assert.Empty(Directory.GetDirectories(Path.Combine(s.Root, "snapshots")));
    }

    [Fact]
    public async Task UpdateChangesOnlyTheLabelsNamedByFieldPaths()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        await c.PrepareAsync(Prep("k", labels: new() { ["keep"] = "1", ["change"] = "old", ["drop"] = "x" }), cancellationToken: Ct);
        var before = (await c.StatAsync(new StatSnapshotRequest { Key = "k" }, cancellationToken: Ct)).Info;

        var req = new UpdateSnapshotRequest { Info = new Info { Name = "k" }, UpdateMask = new FieldMask() };
        req.Info.Labels.Add(new Dictionary<string, string> { ["change"] = "new", ["added"] = "yes", ["keep"] = "ignored" });
        req.UpdateMask.Paths.Add("labels.change");
        req.UpdateMask.Paths.Add("labels.added");
        req.UpdateMask.Paths.Add("labels.drop");
        var updated = (await c.UpdateAsync(req, cancellationToken: Ct)).Info;
        Assert.Equal(new Dictionary<string, string> { ["keep"] = "1", ["change"] = "new", ["added"] = "yes" }, updated.Labels.ToDictionary());
        Assert.Equal(Kind.Active, updated.Kind);
        Assert.True(updated.UpdatedAt.ToDateTime() >= before.UpdatedAt.ToDateTime());
        Assert.Equal(before.CreatedAt, updated.CreatedAt);

        // No mask: the labels are replaced.
        var replace = new UpdateSnapshotRequest { Info = new Info { Name = "k" } };
        replace.Info.Labels.Add("only", "this");
        await c.UpdateAsync(replace, cancellationToken: Ct);
        var after = (await c.StatAsync(new StatSnapshotRequest { Key = "k" }, cancellationToken: Ct)).Info;
        Assert.Equal(new Dictionary<string, string> { ["only"] = "this" }, after.Labels.ToDictionary());
    }

    [Fact]
    public async Task ListFiltersAsContainerdSendsThem()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        await CommittedLayer(c, "sha256:p", "", new());
        var key = "default/7/extract-1 sha256:c";
        await c.PrepareAsync(Prep(key, "sha256:p", new() { ["containerd.io/snapshot.ref"] = "sha256:c" }), cancellationToken: Ct);
        await c.CommitAsync(Commit("sha256:c", key, new() { ["containerd.io/snapshot.ref"] = "sha256:c", ["containerd.io/gc.root"] = "x" }), cancellationToken: Ct);
        await c.PrepareAsync(Prep("container", "sha256:c"), cancellationToken: Ct);

        // The filter containerd's metadata layer uses to find a remote snapshot after AlreadyExists.
        var found = await Client.ListAll(c, Ct, "labels.\"containerd.io/snapshot.ref\"==sha256:c,parent==\"sha256:p\"");
        Assert.Equal(["sha256:c"], found.Select(i => i.Name));
        Assert.Empty(await Client.ListAll(c, Ct, "labels.\"containerd.io/snapshot.ref\"==sha256:c,parent==\"other\""));
        Assert.Equal(["container"], (await Client.ListAll(c, Ct, "kind==active")).Select(i => i.Name));
        Assert.Equal(["sha256:p", "sha256:c"], (await Client.ListAll(c, Ct, "kind==committed")).Select(i => i.Name));
        // Several filters are OR-ed; a bare field tests presence; != and ~= work.
        Assert.Equal(["sha256:p", "container"], (await Client.ListAll(c, Ct, "name==sha256:p", "name==container")).Select(i => i.Name));
        Assert.Equal(["sha256:c"], (await Client.ListAll(c, Ct, "labels.\"containerd.io/gc.root\"")).Select(i => i.Name));
        Assert.Equal(["sha256:p", "container"], (await Client.ListAll(c, Ct, "name!=sha256:c")).Select(i => i.Name));
        Assert.Equal(["sha256:p", "sha256:c"], (await Client.ListAll(c, Ct, "name~=^sha256:")).Select(i => i.Name));
    }

    [Fact]
    public async Task ContainerdKeysMeanTheSameSnapshotWithOrWithoutTheHeader()
    {
        // containerd sends the header on calls from its own namespaced contexts (CRI's unpack) and not on calls it
        // forwards from ctr: a snapshot made under one must be seen under the other (regression: CRI-pulled layers
        // were invisible to `ctr -n k8s.io snapshots ls` and `ctr -n k8s.io run`).
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        var k8s = Client.Ns("k8s.io");
        // A layer committed without a header under its bare chainID (as remote snapshots are) is shared.
        await CommittedLayer(c, "sha256:base", "", new() { ["base.txt"] = "base" });
        Assert.Equal("sha256:base", (await c.StatAsync(new StatSnapshotRequest { Key = "sha256:base" }, k8s, cancellationToken: Ct)).Info.Name);

        await c.PrepareAsync(Prep("k8s.io/1/key", "sha256:base", new() { ["from"] = "cri" }), k8s, cancellationToken: Ct);
        var st = (await c.StatAsync(new StatSnapshotRequest { Key = "k8s.io/1/key" }, cancellationToken: Ct)).Info;
        Assert.Equal(("cri", "sha256:base"), (st.Labels["from"], st.Parent));
        Assert.Equal(["sha256:base", "k8s.io/1/key"], (await Client.ListAll(c, Ct)).Select(i => i.Name));
        Assert.Equal(["sha256:base", "k8s.io/1/key"], (await Client.ListAll(c, k8s, Ct)).Select(i => i.Name));
        // The filter containerd's metadata layer walks with after a remote Prepare answers AlreadyExists.
        Assert.Equal(["k8s.io/1/key"], (await Client.ListAll(c, k8s, Ct, "parent==\"sha256:base\",labels.from==cri")).Select(i => i.Name));

        await c.CommitAsync(Commit("k8s.io/2/sha256:top", "k8s.io/1/key"), k8s, cancellationToken: Ct);
        Assert.Equal(Kind.Committed, (await c.StatAsync(new StatSnapshotRequest { Key = "k8s.io/2/sha256:top" }, cancellationToken: Ct)).Info.Kind);
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "k8s.io/2/sha256:top" }, cancellationToken: Ct);
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.StatAsync(new StatSnapshotRequest { Key = "k8s.io/2/sha256:top" }, k8s, cancellationToken: Ct)));
        // Another namespace's containerd keys are not the header's: a direct client under "other" does not reach them.
        await c.PrepareAsync(Prep("default/3/key"), cancellationToken: Ct);
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.StatAsync(new StatSnapshotRequest { Key = "default/3/key" }, Client.Ns("other"), cancellationToken: Ct)));
        Assert.DoesNotContain("default/3/key", (await Client.ListAll(c, k8s, Ct)).Select(i => i.Name));
    }

    [Fact]
    public async Task DirectClientsOfDifferentNamespacesAreKeptApart()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        var a = Client.Ns("a");
        var b = Client.Ns("b");
        await CommittedLayer(c, "shared", "", new() { ["shared.txt"] = "shared" });
        await c.PrepareAsync(Prep("x/private"), cancellationToken: Ct);

        // Namespace a: a committed base with a child on top of it, and a view on the shared layer.
        var m = (await c.PrepareAsync(Prep("extract"), a, cancellationToken: Ct)).Mounts.Single();
        await File.WriteAllTextAsync(Path.Combine(m.Source, "a.txt"), "from a", Ct);
        await c.CommitAsync(Commit("base", "extract"), a, cancellationToken: Ct);
        var child = (await c.PrepareAsync(Prep("child", "base"), a, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("overlay", child.Type);
        var lower = child.Options.Single(o => o.StartsWith("lowerdir=", StringComparison.Ordinal))["lowerdir=".Length..];
        Assert.Equal("from a", await File.ReadAllTextAsync(Path.Combine(lower, "a.txt"), Ct));
        await c.ViewAsync(new ViewSnapshotRequest { Key = "view", Parent = "shared" }, a, cancellationToken: Ct);
        var info = (await c.StatAsync(new StatSnapshotRequest { Key = "child" }, a, cancellationToken: Ct)).Info;
        Assert.Equal(("child", "base"), (info.Name, info.Parent));
        Assert.Equal(["shared", "base", "child", "view"], (await Client.ListAll(c, a, Ct)).Select(i => i.Name));
        Assert.Equal(["child"], (await Client.ListAll(c, a, Ct, "parent==base")).Select(i => i.Name));

        // Namespace b sees none of a's snapshots and may use the same names for its own.
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.StatAsync(new StatSnapshotRequest { Key = "base" }, b, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.RemoveAsync(new RemoveSnapshotRequest { Key = "base" }, b, cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.PrepareAsync(Prep("other", "base"), b, cancellationToken: Ct)));
        await c.PrepareAsync(Prep("child"), b, cancellationToken: Ct);
        Assert.Equal(["shared", "child"], (await Client.ListAll(c, b, Ct)).Select(i => i.Name));
        Assert.Equal(Kind.Active, (await c.StatAsync(new StatSnapshotRequest { Key = "child" }, b, cancellationToken: Ct)).Info.Kind);
        Assert.Equal("base", (await c.StatAsync(new StatSnapshotRequest { Key = "child" }, a, cancellationToken: Ct)).Info.Parent);

        // Parent/child rules hold inside a namespace; without a header every snapshot is listed (the admin's view).
        Assert.Equal(StatusCode.FailedPrecondition, await Client.CodeOf(async () =>
            await c.RemoveAsync(new RemoveSnapshotRequest { Key = "base" }, a, cancellationToken: Ct)));
        Assert.Equal(["shared", "x/private", "a//base", "a//child", "a//view", "b//child"], (await Client.ListAll(c, Ct)).Select(i => i.Name));
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "child" }, a, cancellationToken: Ct);
        await c.RemoveAsync(new RemoveSnapshotRequest { Key = "base" }, a, cancellationToken: Ct);
        Assert.Equal(Kind.Active, (await c.StatAsync(new StatSnapshotRequest { Key = "child" }, b, cancellationToken: Ct)).Info.Kind);
    }

    [Fact]
    public async Task ErrorsUnderTheNamespaceHeaderQuoteTheCallersKeys()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        var b = Client.Ns("b");
        await c.PrepareAsync(Prep("extract"), b, cancellationToken: Ct);
        await c.CommitAsync(Commit("base", "extract"), b, cancellationToken: Ct);
        await c.PrepareAsync(Prep("child", "base"), b, cancellationToken: Ct);

        // Stored as b//KEY; every message names the key as the client sent it.
        (StatusCode, string)[] expected =
        [
            (StatusCode.NotFound, "snapshot k does not exist"),
            (StatusCode.NotFound, "snapshot k does not exist"),
            (StatusCode.NotFound, "snapshot nope (in a parent chain) does not exist"),
            (StatusCode.AlreadyExists, "snapshot child already exists"),
            (StatusCode.InvalidArgument, "parent child is not a committed snapshot"),
            (StatusCode.FailedPrecondition, "snapshot base is not active (Committed)"),
            (StatusCode.AlreadyExists, "snapshot base already exists"),
            (StatusCode.FailedPrecondition, "cannot remove snapshot base: it has children"),
            (StatusCode.NotFound, "snapshot k does not exist"),
        ];
        (StatusCode, string)[] actual =
        [
            await Client.ErrorOf(async () => await c.StatAsync(new StatSnapshotRequest { Key = "k" }, b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.MountsAsync(new MountsRequest { Key = "k" }, b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.PrepareAsync(Prep("x", "nope"), b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.PrepareAsync(Prep("child", "base"), b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.PrepareAsync(Prep("y", "child"), b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.CommitAsync(Commit("n", "base"), b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.CommitAsync(Commit("base", "child"), b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Key = "base" }, b, cancellationToken: Ct)),
            await Client.ErrorOf(async () => await c.UpdateAsync(new UpdateSnapshotRequest { Info = new Info { Name = "k" } }, b, cancellationToken: Ct)),
        ];
        Assert.Equal(expected, actual);

        // Without the header the same snapshots are named as stored, and so are they in messages.
        Assert.Equal((StatusCode.FailedPrecondition, "cannot remove snapshot b//base: it has children"),
            await Client.ErrorOf(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Key = "b//base" }, cancellationToken: Ct)));
    }

    [Fact]
    public async Task SnapshotsSurviveReopenAndCleanupRemovesOnlyOrphanDirs()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        await CommittedLayer(c, "l1", "", new() { ["keep.txt"] = "kept" });
        var orphan = Path.Combine(s.Root, "snapshots", "new-leftover");
        Directory.CreateDirectory(Path.Combine(orphan, "fs"));
        var orphanId = Path.Combine(s.Root, "snapshots", "999");
        Directory.CreateDirectory(Path.Combine(orphanId, "fs"));

        await s.ReopenAsync(null);
        c = s.Client;
        var v = (await c.ViewAsync(new ViewSnapshotRequest { Key = "v", Parent = "l1" }, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("kept", await File.ReadAllTextAsync(Path.Combine(v.Source, "keep.txt"), Ct));

        await c.CleanupAsync(new CleanupRequest { Snapshotter = "stargz" }, cancellationToken: Ct);
        Assert.False(Directory.Exists(orphan));
        Assert.False(Directory.Exists(orphanId));
        Assert.Equal("kept", await File.ReadAllTextAsync(Path.Combine(v.Source, "keep.txt"), Ct));
        Assert.Equal(2, (await Client.ListAll(c, Ct)).Count);
    }

    [Fact]
    public async Task SocketIsOwnerOnlyAndAStaleSocketIsReplaced()
    {
        using var dir = new TempDir("sgs");
        var sock = Path.Combine(dir.Path, "s.sock");
        // A stale socket file nobody listens on, as a crashed daemon leaves it (python does not unlink it on exit).
        (await ProcessRunner.RunAsync(Requires.Command("python3"), ["-c", "import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])", sock]))
            .EnsureSuccess("bind a stale socket");
        Assert.True(File.Exists(sock));
        await using var sn = await StargzSnapshotter.OpenAsync(new SnapshotterOptions { Root = dir.Sub("root") }, null, Ct);
        var opt = new SnapshotterServerOptions { SocketPath = sock };
        await using var app = SnapshotterServer.Build(sn, opt);
        await SnapshotterServer.StartAsync(app, opt, Ct);
        try
        {
            Assert.Equal((UnixFileMode)0b110_000_000, File.GetUnixFileMode(sock));
            using var ch = Client.Channel(sock);
            var c = new Snapshots.SnapshotsClient(ch);
            Assert.Empty(await Client.ListAll(c, Ct));
            // A second server on a live socket refuses instead of stealing it.
            var e = Assert.Throws<IOException>(() => SnapshotterServer.Listen(new SnapshotterServerOptions { SocketPath = sock }));
            Assert.Contains("another process is serving", e.Message);
            Assert.Empty(await Client.ListAll(c, Ct));
        }
        finally { await app.StopAsync(Ct); }
    }

    [Fact]
    public async Task ACallDialledBeforeTheHostIsBuiltIsAnsweredAndStoppingRemovesTheSocket()
    {
        using var dir = new TempDir("sgs");
        var sock = Path.Combine(dir.Path, "s.sock");
        var opt = new SnapshotterServerOptions { SocketPath = sock };
        // The daemon binds first, then opens its root and builds the host: a client may dial in between.
        opt.Listening = SnapshotterServer.Listen(opt);
        Assert.Equal((UnixFileMode)0b110_000_000, File.GetUnixFileMode(sock));
        using var ch = Client.Channel(sock);
        var c = new Snapshots.SnapshotsClient(ch);
        var early = c.StatAsync(new StatSnapshotRequest { Key = "missing" }, cancellationToken: Ct).ResponseAsync;
        await Task.Delay(300, Ct);
        Assert.False(early.IsCompleted, "answered before anything serves the socket");
        await using var sn = await StargzSnapshotter.OpenAsync(new SnapshotterOptions { Root = dir.Sub("root") }, null, Ct);
        await using var app = SnapshotterServer.Build(sn, opt);
        await SnapshotterServer.StartAsync(app, opt, Ct);
        var e = await Assert.ThrowsAsync<RpcException>(() => early);
        Assert.Equal(StatusCode.NotFound, e.StatusCode);
        await app.StopAsync(Ct);
        Assert.False(File.Exists(sock), "the socket file outlived the server");
    }

    [Fact]
    public async Task ConcurrentCommitsToOneNameOrOfOneKey_ExactlyOneWins()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        for (int i = 0; i < 6; i++) await c.PrepareAsync(Prep($"k{i}"), cancellationToken: Ct);
        var sameName = await Task.WhenAll(Enumerable.Range(0, 6).Select(i =>
            Client.CodeOf(async () => await c.CommitAsync(Commit("the-layer", $"k{i}"), cancellationToken: Ct))));
        Assert.Equal(1, sameName.Count(x => x == StatusCode.OK));
        Assert.Equal(5, sameName.Count(x => x == StatusCode.AlreadyExists));

        await c.PrepareAsync(Prep("one-key"), cancellationToken: Ct);
        var sameKey = await Task.WhenAll(Enumerable.Range(0, 6).Select(i =>
            Client.CodeOf(async () => await c.CommitAsync(Commit($"name-{i}", "one-key"), cancellationToken: Ct))));
        Assert.Equal(1, sameKey.Count(x => x == StatusCode.OK));
        Assert.Equal(5, sameKey.Count(x => x == StatusCode.NotFound));
        Assert.Equal(2, (await Client.ListAll(c, Ct, "kind==committed")).Count);
    }

    [Fact]
    public async Task ASecondSnapshotterOnTheSameRootIsRefused()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var e = await Assert.ThrowsAsync<IOException>(async () =>
            await StargzSnapshotter.OpenAsync(new SnapshotterOptions { Root = s.Root }, null, Ct));
        Assert.Contains("in use by another snapshotter", e.Message);
        // The first one is unaffected.
        await s.Client.PrepareAsync(Prep("still-works"), cancellationToken: Ct);
    }

    [Fact]
    public async Task ANewUpperDirTakesTheOwnerOfItsParentsRoot()
    {
        Requires.Root();
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        var m = (await c.PrepareAsync(Prep("k"), cancellationToken: Ct)).Mounts.Single();
        (await ProcessRunner.RunAsync(Requires.Command("chown"), ["1234:2345", m.Source])).EnsureSuccess("chown");
        await c.CommitAsync(Commit("owned", "k"), cancellationToken: Ct);
        var child = (await c.PrepareAsync(Prep("child", "owned"), cancellationToken: Ct)).Mounts.Single();
        var upper = child.Options.Single(o => o.StartsWith("upperdir=", StringComparison.Ordinal))["upperdir=".Length..];
        var stat = await ProcessRunner.RunAsync(Requires.Command("stat"), ["-c", "%u:%g", upper]);
        Assert.Equal("1234:2345", stat.EnsureSuccess("stat").StdOut.Trim());
    }

    internal static async Task MountAsync(Mount m, string target)
    {
        var mount = Requires.Command("mount");
        (await ProcessRunner.RunAsync(mount, ["-t", m.Type, m.Source, target, "-o", string.Join(',', m.Options)]))
            .EnsureSuccess($"mount {m.Type} at {target}");
    }
}
