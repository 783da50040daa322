using System.Text.Json;
using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The <c>containerd.io/snapshot/remote/urls</c> label (a layer descriptor's <c>urls</c>, as rpull and containerd pass
/// them): the daemon fetches the layer from there, so a layer whose registry is unreachable is still mounted lazily.
/// </summary>
public class UrlsLabelTests
{
    private const string Ref = "containerd.io/snapshot.ref";
    private const string StargzRef = "containerd.io/snapshot/remote/stargz.reference";
    private const string StargzDigest = "containerd.io/snapshot/remote/stargz.digest";
    private const string TocDigest = "containerd.io/snapshot/stargz/toc.digest";
    private const string Urls = "containerd.io/snapshot/remote/urls";

    [Fact]
    public async Task ALayerIsServedFromTheUrlsOfItsLabelWhenItsRegistryIsUnreachable()
    {
        Requires.Fuse();
        var ct = TestContext.Current.CancellationToken;
        await using var registry = await LocalRegistry.StartAsync();
        using var work = new TempDir("urls-label");
        var l1 = work.Sub("l1");
        TestImages.WriteBusybox(l1);
        await File.WriteAllTextAsync(Path.Combine(l1, "etc", "motd"), "served from a URL\n", ct);
        var layout = Path.Combine(work.Path, "oci");
        await TestImages.BuildAsync(layout, "v1", [l1]);
        await TestImages.PushAsync(layout, "v1", registry.Host, "urls/img:v1");
        await E2eHelpers.ConvertWithOursAsync($"{registry.Host}/urls/img:v1", $"{registry.Host}/urls/img:esgz", work.Sub("convert"), ct);
        using var http = new HttpClient();
        using var mreq = new HttpRequestMessage(HttpMethod.Get, $"http://{registry.Host}/v2/urls/img/manifests/esgz");
        mreq.Headers.Accept.ParseAdd("application/vnd.oci.image.manifest.v1+json");
        using var mresp = await http.SendAsync(mreq, ct);
        using var manifest = JsonDocument.Parse(await mresp.EnsureSuccessStatusCode().Content.ReadAsStringAsync(ct));
        var layer = manifest.RootElement.GetProperty("layers").EnumerateArray().Single();
        var digest = layer.GetProperty("digest").GetString()!;
        var toc = layer.GetProperty("annotations").GetProperty(TocDigest).GetString()!;

        await using var daemon = await LocalDaemon.StartAsync("[blob]\nmax_retries = 1\noutage_timeout_sec = 2\n");
        using var channel = E2eHelpers.Channel(daemon.Socket);
        var client = new Snapshots.SnapshotsClient(channel);
        var ns = new Metadata { { "containerd-namespace", "default" } };
        // The image's own registry name resolves nowhere; only the URL (a registry's blob URL here, a CDN in life) serves it.
        const string unreachable = "stargz-origin.invalid/urls/img:esgz";
        var labels = new Dictionary<string, string>
        {
            [Ref] = "sha256:chain-urls", [StargzRef] = unreachable, [StargzDigest] = digest, [TocDigest] = toc,
            [Urls] = $"http://127.0.0.1:1/nothing-here,http://{registry.Host}/v2/urls/img/blobs/{digest}",
        };
        // First without the label: the layer cannot be reached, it falls back, saying the registry failed (or did not
        // answer within the outage timeout: a name that does not resolve is retried until then).
        var noUrls = new Dictionary<string, string>(labels) { [Ref] = "sha256:chain-no-urls" };
        noUrls.Remove(Urls);
        var plain = new PrepareSnapshotRequest { Key = "default/2/extract-no-urls sha256:chain-no-urls" };
        plain.Labels.Add(noUrls);
        Assert.NotEmpty((await client.PrepareAsync(plain, ns, cancellationToken: ct)).Mounts);
        Assert.DoesNotContain(Mounts.Under(daemon.Root), m => m.FsType.StartsWith("fuse", StringComparison.Ordinal));
        var line = await E2eHelpers.WaitLogLineAsync(daemon, $"layer {digest} for sha256:chain-no-urls ", "falling back to an ordinary snapshot (");
        Assert.True(line != null && (line.Contains("(registry_error)", StringComparison.Ordinal) || line.Contains("(timeout)", StringComparison.Ordinal)),
            line ?? daemon.Log);

        // Then with it: mounted remotely from the URL.
        var req = new PrepareSnapshotRequest { Key = "default/1/extract-urls sha256:chain-urls" };
        req.Labels.Add(labels);
        var e = await Assert.ThrowsAsync<RpcException>(async () => await client.PrepareAsync(req, ns, cancellationToken: ct));
        Assert.True(e.StatusCode == StatusCode.AlreadyExists, $"{e.Status}\n{daemon.Log}"); // committed as a remote snapshot
        var fuse = Mounts.Under(daemon.Root).Where(m => m.FsType.StartsWith("fuse", StringComparison.Ordinal)).ToList();
        var mount = Assert.Single(fuse);
        Assert.Equal("served from a URL\n", await File.ReadAllTextAsync(Path.Combine(mount.MountPoint, "etc", "motd"), ct));

        // Unmount before the daemon's root goes away.
        await client.RemoveAsync(new RemoveSnapshotRequest { Key = plain.Key }, ns, cancellationToken: ct);
        await client.RemoveAsync(new RemoveSnapshotRequest { Key = "sha256:chain-urls" }, ns, cancellationToken: ct);
    }
}
