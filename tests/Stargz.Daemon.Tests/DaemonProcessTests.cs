using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Stargz.Snapshotter;
using Stargz.TestSupport;

namespace Stargz.Daemon.Tests;

/// <summary>
/// The real daemon binary as a child process: crashes between the steps of an API call (SIGKILL at a named point or at
/// a random moment under load), restarts, and the invariants a user relies on afterwards.
/// </summary>
public class DaemonProcessTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static Dictionary<string, string> CrashAt(string point) => new() { [FaultInjection.Variable] = point };

    [Fact]
    public async Task UnderNohupTheSupervisorStillTakesSighupAsTheUpgradeCommand()
    {
        // SIGHUP ignored from the start (nohup): without taking it back, the upgrade never comes and the old daemon runs on.
        await using var d = await LocalDaemon.StartAsync(supervised: true, underNohup: true);
        var first = d.ChildPid;
        Assert.NotEqual(0, first);
        var next = await d.SignalAndWaitRestartAsync(1, toSupervisor: true, TimeSpan.FromSeconds(30));
        Assert.NotEqual(first, next);
        Assert.Contains($"upgrade: the daemon (pid {first}) hands its mounts over", d.Log);
        Assert.Equal(0, await d.StopAsync());
    }

    private static Snapshots.SnapshotsClient Connect(LocalDaemon d, out IDisposable channel)
    {
        var ch = Client.Channel(d.Socket);
        channel = ch;
        return new Snapshots.SnapshotsClient(ch);
    }

    /// <summary>What must hold after any crash: every snapshot has its dirs, every parent exists, Cleanup leaves exactly the live dirs.</summary>
    private static async Task AssertInvariants(LocalDaemon d, Snapshots.SnapshotsClient c)
    {
        var all = await Client.ListAll(c, Ct);
        var names = all.Select(i => i.Name).ToHashSet();
        foreach (var i in all)
        {
            if (i.Parent.Length > 0) Assert.Contains(i.Parent, names);
            var m = i.Kind == Kind.Committed
                ? (await c.ViewAsync(new ViewSnapshotRequest { Key = "check-" + Guid.NewGuid(), Parent = i.Name }, cancellationToken: Ct)).Mounts.Single()
                : (await c.MountsAsync(new MountsRequest { Key = i.Name }, cancellationToken: Ct)).Mounts.Single();
            foreach (var dir in MountDirs(m)) Assert.True(Directory.Exists(dir), $"{i.Name}: {dir} missing");
        }
        await c.CleanupAsync(new CleanupRequest(), cancellationToken: Ct);
        var dirs = Directory.GetDirectories(Path.Combine(d.Root, "snapshots")).Select(Path.GetFileName).ToList();
        Assert.All(dirs, n => Assert.True(long.TryParse(n, out _), $"leftover dir {n} after Cleanup"));
        foreach (var v in (await Client.ListAll(c, Ct, "kind==view")).Where(i => i.Name.StartsWith("check-", StringComparison.Ordinal)))
            await c.RemoveAsync(new RemoveSnapshotRequest { Key = v.Name }, cancellationToken: Ct);
        var after = (await Client.ListAll(c, Ct)).Count;
        Assert.Equal(after, Directory.GetDirectories(Path.Combine(d.Root, "snapshots")).Length);
    }

    private static IEnumerable<string> MountDirs(Containerd.Types.Mount m)
    {
        if (m.Type == "bind") return [m.Source];
        return m.Options.Where(o => o.Contains('=')).SelectMany(o => o.Split('=', 2) switch
        {
            ["lowerdir", var v] => v.Split(':'),
            ["upperdir", var v] => [v],
            ["workdir", var v] => [v],
            _ => Array.Empty<string>(),
        });
    }

    private static async Task<StatusCode> Code(Func<Task> f) => await Client.CodeOf(f);

    [Fact]
    public async Task CrashAfterDirRenameBeforeMetadataCommit_SnapshotDoesNotExistAndItsIdIsReusedCleanly()
    {
        await using var d = await LocalDaemon.StartAsync(env: CrashAt("create:after-rename"));
        IDisposable ch;
        var c = Connect(d, out ch);
        using (ch)
        {
            var code = await Code(async () => await c.PrepareAsync(new PrepareSnapshotRequest { Key = "k1" }, cancellationToken: Ct));
            Assert.NotEqual(StatusCode.OK, code);
        }
        Assert.Equal(137, await d.WaitExitAsync(TimeSpan.FromSeconds(20)));
        Assert.True(Directory.Exists(Path.Combine(d.Root, "snapshots", "1", "fs")), "the crash left the renamed dir behind");

        await d.RestartAsync();
        c = Connect(d, out ch);
        using (ch)
        {
            Assert.Equal(StatusCode.NotFound, await Code(async () => await c.StatAsync(new StatSnapshotRequest { Key = "k1" }, cancellationToken: Ct)));
            var m = (await c.PrepareAsync(new PrepareSnapshotRequest { Key = "k1" }, cancellationToken: Ct)).Mounts.Single();
            Assert.Empty(Directory.GetFileSystemEntries(m.Source));
            await AssertInvariants(d, c);
        }
    }

    [Fact]
    public async Task CrashInsideRemove_TheSnapshotAndItsFilesAreStillThereAfterRestart()
    {
        await using var d = await LocalDaemon.StartAsync();
        IDisposable ch;
        var c = Connect(d, out ch);
        using (ch)
        {
            var m = (await c.PrepareAsync(new PrepareSnapshotRequest { Key = "x" }, cancellationToken: Ct)).Mounts.Single();
            await File.WriteAllTextAsync(Path.Combine(m.Source, "file"), "precious", Ct);
            await c.CommitAsync(new CommitSnapshotRequest { Name = "layer", Key = "x" }, cancellationToken: Ct);
        }
        Assert.Equal(0, await d.StopAsync());

        await d.RestartAsync(env: CrashAt("remove:after-rename"));
        c = Connect(d, out ch);
        using (ch)
            Assert.NotEqual(StatusCode.OK, await Code(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Key = "layer" }, cancellationToken: Ct)));
        Assert.Equal(137, await d.WaitExitAsync(TimeSpan.FromSeconds(20)));

        await d.RestartAsync();
        c = Connect(d, out ch);
        using (ch)
        {
            Assert.Equal(Kind.Committed, (await c.StatAsync(new StatSnapshotRequest { Key = "layer" }, cancellationToken: Ct)).Info.Kind);
            var v = (await c.ViewAsync(new ViewSnapshotRequest { Key = "v", Parent = "layer" }, cancellationToken: Ct)).Mounts.Single();
            Assert.Equal("precious", await File.ReadAllTextAsync(Path.Combine(v.Source, "file"), Ct));
            await AssertInvariants(d, c);
        }
    }

    [Fact]
    public async Task CrashAfterRemoveCommitOrDuringCommit_LeavesAConsistentStore()
    {
        await using var d = await LocalDaemon.StartAsync();
        IDisposable ch;
        var c = Connect(d, out ch);
        using (ch)
        {
            await c.PrepareAsync(new PrepareSnapshotRequest { Key = "gone" }, cancellationToken: Ct);
            var m = (await c.PrepareAsync(new PrepareSnapshotRequest { Key = "to-commit" }, cancellationToken: Ct)).Mounts.Single();
            await File.WriteAllTextAsync(Path.Combine(m.Source, "f"), "data", Ct);
        }
        Assert.Equal(0, await d.StopAsync());

        await d.RestartAsync(env: CrashAt("remove:after-commit"));
        c = Connect(d, out ch);
        using (ch)
            await Code(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Key = "gone" }, cancellationToken: Ct));
        Assert.Equal(137, await d.WaitExitAsync(TimeSpan.FromSeconds(20)));

        await d.RestartAsync(env: CrashAt("commit:after-usage"));
        c = Connect(d, out ch);
        using (ch)
        {
            Assert.Equal(StatusCode.NotFound, await Code(async () => await c.StatAsync(new StatSnapshotRequest { Key = "gone" }, cancellationToken: Ct)));
            await Code(async () => await c.CommitAsync(new CommitSnapshotRequest { Name = "committed", Key = "to-commit" }, cancellationToken: Ct));
        }
        Assert.Equal(137, await d.WaitExitAsync(TimeSpan.FromSeconds(20)));

        await d.RestartAsync();
        c = Connect(d, out ch);
        using (ch)
        {
            // The commit never happened: still active, and committing now works and keeps the data.
            Assert.Equal(Kind.Active, (await c.StatAsync(new StatSnapshotRequest { Key = "to-commit" }, cancellationToken: Ct)).Info.Kind);
            Assert.Equal(StatusCode.NotFound, await Code(async () => await c.StatAsync(new StatSnapshotRequest { Key = "committed" }, cancellationToken: Ct)));
            await c.CommitAsync(new CommitSnapshotRequest { Name = "committed", Key = "to-commit" }, cancellationToken: Ct);
            var v = (await c.ViewAsync(new ViewSnapshotRequest { Key = "v", Parent = "committed" }, cancellationToken: Ct)).Mounts.Single();
            Assert.Equal("data", await File.ReadAllTextAsync(Path.Combine(v.Source, "f"), Ct));
            await AssertInvariants(d, c);
        }
    }

    [Fact]
    public async Task SigkillUnderConcurrentLoad_RestartFindsAConsistentStore()
    {
        await using var d = await LocalDaemon.StartAsync();
        IDisposable ch;
        var c = Connect(d, out ch);
        var stop = new CancellationTokenSource();
        var done = 0;
        var acknowledged = new System.Collections.Concurrent.ConcurrentBag<string>();
        async Task Worker(int w)
        {
            var parent = "";
            for (int i = 0; !stop.IsCancellationRequested; i++)
            {
                try
                {
                    var key = $"w{w}-active-{i}";
                    var m = (await c.PrepareAsync(new PrepareSnapshotRequest { Key = key, Parent = parent }, cancellationToken: stop.Token)).Mounts.Single();
                    var dir = m.Type == "bind" ? m.Source : MountDirs(m).First(p => p.EndsWith("/fs", StringComparison.Ordinal) && m.Options.Contains("upperdir=" + p));
                    await File.WriteAllTextAsync(Path.Combine(dir, $"f{i}"), $"{w}/{i}", stop.Token);
                    var name = $"w{w}-layer-{i}";
                    await c.CommitAsync(new CommitSnapshotRequest { Name = name, Key = key }, cancellationToken: stop.Token);
                    acknowledged.Add(name);
                    if (i % 3 == 2)
                    {
                        await c.PrepareAsync(new PrepareSnapshotRequest { Key = $"w{w}-tmp-{i}", Parent = name }, cancellationToken: stop.Token);
                        await c.RemoveAsync(new RemoveSnapshotRequest { Key = $"w{w}-tmp-{i}" }, cancellationToken: stop.Token);
                    }
                    parent = name;
                    Interlocked.Increment(ref done);
                }
                catch (Exception e) when (e is RpcException or OperationCanceledException or IOException) { return; }
            }
        }
        var workers = Enumerable.Range(0, 4).Select(Worker).ToList();
        // Kill once some work is done (bounded wait: the machine is shared), at whatever step each worker is in.
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (Volatile.Read(ref done) < 20 && DateTime.UtcNow < until) await Task.Delay(50, Ct);
        await Task.Delay(Random.Shared.Next(0, 40), Ct);
        await d.KillAsync();
        await stop.CancelAsync();
        await Task.WhenAll(workers);
        ch.Dispose();
        Assert.True(done >= 20, $"only {done} layers before the kill");

        await d.RestartAsync();
        c = Connect(d, out ch);
        using (ch)
        {
            await AssertInvariants(d, c);
            // Every commit the daemon acknowledged before it died is still there.
            var committedNames = (await Client.ListAll(c, Ct, "kind==committed")).Select(i => i.Name).ToHashSet();
            Assert.All(acknowledged, n => Assert.Contains(n, committedNames));
            // Every committed layer still holds the file written before its commit.
            foreach (var i in await Client.ListAll(c, Ct, "kind==committed"))
            {
                var v = (await c.ViewAsync(new ViewSnapshotRequest { Key = "read-" + i.Name, Parent = i.Name }, cancellationToken: Ct)).Mounts.Single();
                var n = i.Name.Split('-');
                var top = v.Type == "bind" ? v.Source : MountDirs(v).First();
                Assert.Equal($"{n[0][1..]}/{n[2]}", await File.ReadAllTextAsync(Path.Combine(top, $"f{n[2]}"), Ct));
            }
        }
    }

    [Fact]
    public async Task AMalformedRequestOnTheDaemonsSocketGetsInvalidArgument()
    {
        await using var d = await LocalDaemon.StartAsync();
        using var ch = Client.Channel(d.Socket);
        // Raw bytes as the request message: grpc framing around something that is not a PrepareSnapshotRequest
        // (field 2, the key, claims 100 bytes and carries 3).
        var raw = Marshallers.Create<byte[]>(b => b, b => b);
        var prepare = new Method<byte[], byte[]>(MethodType.Unary, "containerd.services.snapshots.v1.Snapshots", "Prepare", raw, raw);
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
            await ch.CreateCallInvoker().AsyncUnaryCall(prepare, null, new CallOptions(cancellationToken: Ct), [0x12, 100, (byte)'a', (byte)'b', (byte)'c']));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("PrepareSnapshotRequest", e.Status.Detail);

        // The daemon goes on serving well-formed calls.
        var c = new Snapshots.SnapshotsClient(ch);
        await c.PrepareAsync(new PrepareSnapshotRequest { Key = "after" }, cancellationToken: Ct);
        Assert.Equal(["after"], (await Client.ListAll(c, Ct)).Select(i => i.Name));
        // Stopped first, so that all it wrote has been read: the refusal is in its log, naming the message type.
        Assert.Equal(0, await d.StopAsync());
        Assert.Contains("refused a request that is not a valid PrepareSnapshotRequest message", d.Log);
    }

    /// <summary>
    /// The status API and the CRI image service proxy (v1 and v1alpha2) refuse a request that is not valid protobuf as
    /// the snapshots service does: InvalidArgument naming the method and the message, a warning in the log, and the
    /// daemon goes on serving well-formed calls.
    /// </summary>
    [Fact]
    public async Task AMalformedRequestToTheStatusAndCriServicesGetsInvalidArgumentNamingTheMessage()
    {
        using var dir = new TempDir("malformed-cri");
        // [cri_keychain] serves the CRI proxy; its backend is not there (a well-formed call gets Unavailable naming it).
        var backend = Path.Combine(dir.Path, "no-backend.sock");
        await using var d = await LocalDaemon.StartAsync($"[cri_keychain]\nenable_keychain = true\nimage_service_path = \"unix://{backend}\"\n");
        using var ch = Client.Channel(d.Socket);
        var invoker = ch.CreateCallInvoker();
        var raw = Marshallers.Create<byte[]>(b => b, b => b);
        // A tag of wire type 7, which does not exist; field 1, length-delimited, claiming 100 bytes and carrying 3.
        byte[][] malformed = [[0x0f, 0x01], [0x0a, 100, (byte)'a', (byte)'b', (byte)'c']];
        (string Service, string Method, string Message)[] calls =
        [
            ("stargz.status.v1.Status", "Get", "GetStatusRequest"),
            ("runtime.v1.ImageService", "PullImage", "PullImageRequest"),
            ("runtime.v1.ImageService", "ImageStatus", "ImageStatusRequest"),
            ("runtime.v1alpha2.ImageService", "PullImage", "PullImageRequest"),
            ("runtime.v1alpha2.ImageService", "ListImages", "ListImagesRequest"),
        ];
        foreach (var (service, method, message) in calls)
            foreach (var body in malformed)
            {
                var m = new Method<byte[], byte[]>(MethodType.Unary, service, method, raw, raw);
                var e = await Assert.ThrowsAsync<RpcException>(async () =>
                    await invoker.AsyncUnaryCall(m, null, new CallOptions(cancellationToken: Ct), body));
                Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
                Assert.Contains($"{service}/{method}", e.Status.Detail);
                Assert.Contains($"not a valid {message} message", e.Status.Detail);
            }

        // Well-formed calls still reach their handlers: the status API answers, the CRI proxy tries its backend.
        var status = await new Stargz.StatusApi.V1.Status.StatusClient(ch).GetAsync(new Stargz.StatusApi.V1.GetStatusRequest(), cancellationToken: Ct);
        Assert.Empty(status.Layers);
        foreach (var service in new[] { "runtime.v1.ImageService", "runtime.v1alpha2.ImageService" })
        {
            var list = new Method<byte[], byte[]>(MethodType.Unary, service, "ListImages", raw, raw);
            var e = await Assert.ThrowsAsync<RpcException>(async () =>
                await invoker.AsyncUnaryCall(list, null, new CallOptions(deadline: DateTime.UtcNow.AddSeconds(30), cancellationToken: Ct), []));
            Assert.Equal(StatusCode.Unavailable, e.StatusCode);
            Assert.Contains(backend, e.Status.Detail);
        }
        // Stopped first, so that all it wrote has been read.
        Assert.Equal(0, await d.StopAsync());
        Assert.Contains("stargz.status.v1.Status/Get: refused a request that is not a valid GetStatusRequest message", d.Log);
        Assert.Contains("runtime.v1alpha2.ImageService/ListImages: refused a request that is not a valid ListImagesRequest message", d.Log);
    }

    [Fact]
    public async Task SigtermKeepsEverySnapshotForTheNextStart()
    {
        await using var d = await LocalDaemon.StartAsync();
        IDisposable ch;
        var c = Connect(d, out ch);
        using (ch)
        {
            var m = (await c.PrepareAsync(new PrepareSnapshotRequest { Key = "a" }, cancellationToken: Ct)).Mounts.Single();
            await File.WriteAllTextAsync(Path.Combine(m.Source, "f"), "kept", Ct);
            await c.CommitAsync(new CommitSnapshotRequest { Name = "L", Key = "a" }, cancellationToken: Ct);
            await c.PrepareAsync(new PrepareSnapshotRequest { Key = "container", Parent = "L" }, cancellationToken: Ct);
        }
        Assert.Equal(0, await d.StopAsync());
        Assert.Contains("closing the metadata store", d.Log);

        await d.RestartAsync();
        c = Connect(d, out ch);
        using (ch)
        {
            Assert.Equal(["L", "container"], (await Client.ListAll(c, Ct)).Select(i => i.Name));
            var v = (await c.ViewAsync(new ViewSnapshotRequest { Key = "v", Parent = "L" }, cancellationToken: Ct)).Mounts.Single();
            Assert.Equal("kept", await File.ReadAllTextAsync(Path.Combine(v.Source, "f"), Ct));
        }
    }
}
