using System.Net.Http;
using System.Text;
using System.Text.Json.Nodes;
using Stargz.Estargz;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// eStargz layers whose manifest carries no TOC digest (legacy stargz, or annotations lost on the way): the daemon
/// mounts them lazily only when its config has <c>allow_no_verification</c> and the pull asked for it with
/// <c>--skip-content-verify</c> (our rpull or the reference's ctr-remote); otherwise they are pulled the ordinary way.
/// </summary>
public class SkipVerifyTests
{
    private const string SkipVerifyLabel = "containerd.io/snapshot/remote/stargz.skipverify";

    [Fact]
    public async Task ALayerWithoutTocDigestIsMountedLazilyOnlyWithSkipContentVerify()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync("allow_no_verification = true\n");
        var l1 = rig.Work.Sub("sv-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub("sv-l2");
        Directory.CreateDirectory(Path.Combine(l2, "etc"));
        await File.WriteAllTextAsync(Path.Combine(l2, "etc", "motd"), "no toc digest here\n", ct);
        var esgz = await rig.PushEstargzAsync("e2e/notoc", [l1, l2]);
        var image = await RetagWithoutTocDigestAsync(rig.Registry.Host, "e2e/notoc", "esgz", "notoc", ct);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);
        Assert.Equal(2, manifest.Count);

        // Without the flag the daemon refuses to mount unverified layers; the pull still works, the ordinary way.
        var plain = (await RpullTests.Rpull(rig, image)).EnsureSuccess("stargz image rpull without --skip-content-verify");
        Assert.Contains("(0 remote, 2 applied, 0 existing layers)", plain.StdOut);
        Assert.Empty(rig.FuseMounts());
        Assert.Equal("no toc digest here", (await E2eHelpers.RunAsync(rig.Containerd, image, "sv-plain", "/bin/cat", "/etc/motd")).Trim());
        foreach (var (digest, _) in manifest)
        {
            var line = await E2eHelpers.WaitLogLineAsync(rig.Daemon, $"layer {digest} for ", SkipVerifyLabel);
            Assert.True(line != null, $"no log line saying why {digest} was not mounted:\n{rig.Daemon.Log}");
        }
        await rig.ForgetImagesAsync(image);
        await FallbackTests.WaitNoSnapshotsAsync(rig);

        // With it, both layers are remote snapshots (FUSE mounts), labelled as the reference labels them.
        var lazy = (await RpullTests.Rpull(rig, image, extra: ["--skip-content-verify"])).EnsureSuccess("stargz image rpull --skip-content-verify");
        Assert.Contains("(2 remote, 0 applied, 0 existing layers)", lazy.StdOut);
        Assert.Equal(2, rig.FuseMounts().Count);
        foreach (var s in await E2eHelpers.StargzSnapshotsAsync(rig.Containerd))
            Assert.Contains(SkipVerifyLabel, await RpullTests.SnapshotInfoAsync(rig, s));
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);
        Assert.Equal("no toc digest here", (await E2eHelpers.RunAsync(rig.Containerd, image, "sv-lazy", "/bin/cat", "/etc/motd")).Trim());
        await rig.ForgetImagesAsync(image);
        await FallbackTests.WaitNoSnapshotsAsync(rig);
        Assert.Empty(rig.FuseMounts());

        // The reference's ctr-remote sends the same label.
        (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", "--skip-content-verify", image))
            .EnsureSuccess("ctr-remote image rpull --skip-content-verify");
        Assert.Equal(2, rig.FuseMounts().Count);
        Assert.Equal("no toc digest here", (await E2eHelpers.RunAsync(rig.Containerd, image, "sv-ref", "/bin/cat", "/etc/motd")).Trim());

        // The image with its TOC digests is still verified as usual (and needs no flag).
        var verified = (await RpullTests.Rpull(rig, esgz)).EnsureSuccess("stargz image rpull of the annotated image");
        Assert.Contains("(0 remote, 0 applied, 2 existing layers)", verified.StdOut);
        Assert.Null(rig.Daemon.ExitCode);
    }

    /// <summary>Pushes REPO:TAG's manifest again as REPO:NEWTAG without the TOC digest annotations; returns the new reference.</summary>
    private static async Task<string> RetagWithoutTocDigestAsync(string host, string repo, string tag, string newTag, CancellationToken ct)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(30) };
        using var get = new HttpRequestMessage(HttpMethod.Get, $"http://{host}/v2/{repo}/manifests/{tag}");
        get.Headers.Accept.ParseAdd("application/vnd.oci.image.manifest.v1+json");
        using var got = await http.SendAsync(get, ct);
        got.EnsureSuccessStatusCode();
        var mediaType = got.Content.Headers.ContentType?.MediaType ?? "application/vnd.oci.image.manifest.v1+json";
        var manifest = JsonNode.Parse(await got.Content.ReadAsStringAsync(ct))!.AsObject();
        var removed = 0;
        foreach (var layer in manifest["layers"]!.AsArray())
            if (layer!["annotations"] is JsonObject a && a.Remove(LayerLabels.TocDigestAnnotation)) removed++;
        Assert.True(removed > 0, $"{repo}:{tag} had no {LayerLabels.TocDigestAnnotation} annotations to remove");
        using var put = new HttpRequestMessage(HttpMethod.Put, $"http://{host}/v2/{repo}/manifests/{newTag}")
        {
            Content = new StringContent(manifest.ToJsonString(), Encoding.UTF8, mediaType),
        };
        put.Content.Headers.ContentType!.CharSet = null;
        using var put2 = await http.SendAsync(put, ct);
        put2.EnsureSuccessStatusCode();
        return $"{host}/{repo}:{newTag}";
    }
}
