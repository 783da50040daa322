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
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1, l2, l3]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "snap/plain:v1");
        var image = $"{registry.Host}/snap/plain:v1";

        await using var daemon = await LocalDaemon.StartAsync();
        await using var ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket);

        var pull = await ctd.CtrAsync("image", "pull", "--plain-http", "--snapshotter", "stargz", image);
        pull.EnsureSuccess($"ctr pull --snapshotter stargz\ndaemon log:\n{daemon.Log}");
        var run = await ctd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, "run-1", "/bin/cat", "/data/hello.txt", "/data/more.txt");
        run.EnsureSuccess($"ctr run\ndaemon log:\n{daemon.Log}\ncontainerd log:\n{ctd.ReadLog()}");
        Assert.Equal("hello from layer 2\nand layer 3", run.StdOut.Trim());

        // The layers live in our store: three committed snapshots, keyed as containerd's proxy sends them.
        using (var ch = Client.Channel(daemon.Socket))
        {
            var committed = await Client.ListAll(new Snapshots.SnapshotsClient(ch), Ct, "kind==committed");
            Assert.Equal(3, committed.Count);
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
    }
}
