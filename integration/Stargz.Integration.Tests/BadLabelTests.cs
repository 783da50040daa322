using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The daemon's snapshots API driven directly over gRPC with the labels containerd would pass, but wrong: a bad
/// reference, a bad digest, a layer the registry does not have, a plain gzip layer, a blob that is not a layer at all,
/// a missing or wrong TOC digest. Each falls back to an ordinary active snapshot with a log line naming the layer and
/// the reason; the daemon never crashes and keeps serving; a good layer still mounts afterwards.
/// </summary>
public class BadLabelTests
{
    private const string Ref = "containerd.io/snapshot.ref";
    private const string StargzRef = "containerd.io/snapshot/remote/stargz.reference";
    private const string StargzDigest = "containerd.io/snapshot/remote/stargz.digest";
    private const string TocDigest = "containerd.io/snapshot/stargz/toc.digest";

    [Fact]
    public async Task GarbageLabelsFallBackOrFailWithTheRightCodeAndTheDaemonKeepsServing()
    {
        Requires.Fuse();
        var ct = TestContext.Current.CancellationToken;
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("badlabels");
        var l1 = work.Sub("l1");
        TestImages.WriteBusybox(l1);
        await File.WriteAllTextAsync(Path.Combine(l1, "etc", "motd"), "labels\n", ct);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "bad/img:v1");
        var plainRef = $"{registry.Host}/bad/img:v1";
        var esgzRef = $"{registry.Host}/bad/img:esgz";
        await E2eHelpers.ConvertWithOursAsync(plainRef, esgzRef, work.Sub("convert"), ct);
        var (plainLayer, _, plainConfig) = await ManifestAsync(registry.Host, "bad/img", "v1", ct);
        var (esgzLayer, toc, _) = await ManifestAsync(registry.Host, "bad/img", "esgz", ct);
        Assert.NotNull(toc);
        var missing = "sha256:" + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes("no such blob")));

        await using var daemon = await LocalDaemon.StartAsync();
        using var channel = E2eHelpers.Channel(daemon.Socket);
        var client = new Snapshots.SnapshotsClient(channel);
        var ns = new Metadata { { "containerd-namespace", "default" } };
        int FuseMounts() => Mounts.Under(daemon.Root).Count(m => m.FsType.StartsWith("fuse", StringComparison.Ordinal));

        var cases = new (string Name, Dictionary<string, string> Labels, string Digest, string Reason)[]
        {
            ("bad reference", new() { [StargzRef] = "NOT a reference//::", [StargzDigest] = esgzLayer, [TocDigest] = toc! }, esgzLayer, "bad image reference"),
            ("bad digest", new() { [StargzRef] = esgzRef, [StargzDigest] = "sha256:not-hex", [TocDigest] = toc! }, "sha256:not-hex", ""),
            ("unknown layer", new() { [StargzRef] = esgzRef, [StargzDigest] = missing, [TocDigest] = toc! }, missing, ""),
            ("plain gzip layer", new() { [StargzRef] = plainRef, [StargzDigest] = plainLayer, [TocDigest] = toc! }, plainLayer, ""),
            ("not a layer (config JSON)", new() { [StargzRef] = plainRef, [StargzDigest] = plainConfig, [TocDigest] = toc! }, plainConfig, ""),
            ("missing TOC digest", new() { [StargzRef] = esgzRef, [StargzDigest] = esgzLayer }, esgzLayer, "no TOC digest label"),
            ("wrong TOC digest", new() { [StargzRef] = esgzRef, [StargzDigest] = esgzLayer, [TocDigest] = missing }, esgzLayer, "does not match"),
        };
        for (int i = 0; i < cases.Length; i++)
        {
            var (name, labels, digest, reason) = cases[i];
            var target = $"sha256:chain-bad-{i}";
            labels[Ref] = target;
            var req = new PrepareSnapshotRequest { Key = $"default/{i}/extract-bad-{i} {target}" };
            req.Labels.Add(labels);
            var resp = await client.PrepareAsync(req, ns, cancellationToken: ct);
            // Fallback: an ordinary active snapshot for containerd to apply the layer into, and nothing mounted.
            Assert.NotEmpty(resp.Mounts);
            var info = (await client.StatAsync(new StatSnapshotRequest { Key = req.Key }, ns, cancellationToken: ct)).Info;
            Assert.Equal(Kind.Active, info.Kind);
            Assert.False(info.Labels.ContainsKey("containerd.io/snapshot/remote"), name);
            Assert.Equal(0, FuseMounts());
            Assert.True(daemon.ExitCode == null, $"daemon exited after the {name} case:\n{daemon.Log}");
            var line = await E2eHelpers.WaitLogLineAsync(daemon, $"layer {digest} for {target} ");
            Assert.True(line != null, $"{name}: no log line for {digest}:\n{daemon.Log}");
            Assert.Contains("falling back to an ordinary snapshot", line);
            Assert.Contains(reason, line);
        }

        // Wrong calls get the gRPC status containerd expects.
        Assert.Equal(StatusCode.InvalidArgument, await CodeAsync(() => client.PrepareAsync(new PrepareSnapshotRequest { Key = "" }, ns, cancellationToken: ct).ResponseAsync));
        Assert.Equal(StatusCode.NotFound, await CodeAsync(() => client.PrepareAsync(
            new PrepareSnapshotRequest { Key = "orphan", Parent = "sha256:no-such-parent" }, ns, cancellationToken: ct).ResponseAsync));
        Assert.Equal(StatusCode.AlreadyExists, await CodeAsync(() => client.PrepareAsync(
            new PrepareSnapshotRequest { Key = "default/0/extract-bad-0 sha256:chain-bad-0" }, ns, cancellationToken: ct).ResponseAsync));

        // Still serving: the good labels mount the layer remotely (AlreadyExists = committed by us), once.
        var good = new PrepareSnapshotRequest { Key = "default/9/extract-good sha256:chain-good" };
        good.Labels.Add(new Dictionary<string, string> { [Ref] = "sha256:chain-good", [StargzRef] = esgzRef, [StargzDigest] = esgzLayer, [TocDigest] = toc! });
        Assert.Equal(StatusCode.AlreadyExists, await CodeAsync(() => client.PrepareAsync(good, ns, cancellationToken: ct).ResponseAsync));
        var committed = (await client.StatAsync(new StatSnapshotRequest { Key = "sha256:chain-good" }, ns, cancellationToken: ct)).Info;
        Assert.Equal(Kind.Committed, committed.Kind);
        Assert.Equal("remote snapshot", committed.Labels["containerd.io/snapshot/remote"]);
        Assert.Equal(1, FuseMounts());
        good.Key = "default/10/extract-good-again sha256:chain-good";
        Assert.Equal(StatusCode.AlreadyExists, await CodeAsync(() => client.PrepareAsync(good, ns, cancellationToken: ct).ResponseAsync));
        Assert.Equal(1, FuseMounts());
        Assert.Null(daemon.ExitCode);
    }

    private static async Task<StatusCode> CodeAsync(Func<Task> call)
    {
        try
        {
            await call();
            return StatusCode.OK;
        }
        catch (RpcException e)
        {
            return e.StatusCode;
        }
    }

    /// <summary>The single layer's digest and TOC digest annotation, and the config digest, as the registry serves them.</summary>
    private static async Task<(string Layer, string? Toc, string Config)> ManifestAsync(string host, string repo, string tag, CancellationToken ct)
    {
        using var http = new HttpClient();
        using var req = new HttpRequestMessage(HttpMethod.Get, $"http://{host}/v2/{repo}/manifests/{tag}");
        req.Headers.Accept.ParseAdd("application/vnd.oci.image.manifest.v1+json");
        using var resp = await http.SendAsync(req, ct);
        resp.EnsureSuccessStatusCode();
        using var doc = JsonDocument.Parse(await resp.Content.ReadAsStringAsync(ct));
        var layer = doc.RootElement.GetProperty("layers").EnumerateArray().Single();
        string? toc = null;
        if (layer.TryGetProperty("annotations", out var a) && a.TryGetProperty(TocDigest, out var t)) toc = t.GetString();
        return (layer.GetProperty("digest").GetString()!, toc, doc.RootElement.GetProperty("config").GetProperty("digest").GetString()!);
    }
}
