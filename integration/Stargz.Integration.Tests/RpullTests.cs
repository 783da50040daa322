using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// Our `stargz image rpull` against the real registry, containerd 1.6 (its content, snapshots, diff, leases and images
/// APIs on its own socket) and our daemon behind the `stargz` proxy plugin; containers started by runc via `ctr run`.
/// </summary>
public class RpullTests
{
    [Fact]
    public async Task RpullOfEstargzImageMakesEveryLayerARemoteSnapshotAndTheContainerRuns()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var layers = ThreeLayers(rig, "esgz", "from the top layer of the eStargz image");
        var image = await rig.PushEstargzAsync("e2e/rpull-esgz", layers);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);
        Assert.Equal(3, manifest.Count);

        var pull = (await Rpull(rig, image, extra: ["--label", "rpull.test=esgz"])).EnsureSuccess("stargz image rpull");
        Assert.Contains("(3 remote, 0 applied, 0 existing layers)", pull.StdOut);
        // Not a terminal: one plain line per layer (no progress bars, no terminal control sequences).
        foreach (var (digest, _) in manifest) Assert.Contains($"layer {digest[..15]}... remote snapshot\n", pull.StdOut);
        Assert.DoesNotContain("\u001b[", pull.StdOut);
        var listed = (await rig.Containerd.CtrAsync("images", "ls")).EnsureSuccess("ctr images ls").StdOut;
        Assert.Contains("rpull.test=esgz", listed.Split('\n').Single(l => l.StartsWith(image + " ", StringComparison.Ordinal)));

        // Every layer is one of our FUSE mounts, committed by the daemon as a remote snapshot, and none of the layer
        // blobs went into containerd's content store.
        Assert.Equal(manifest.Count, rig.FuseMounts().Count);
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd);
        Assert.Equal(manifest.Count, snapshots.Count);
        foreach (var s in snapshots) Assert.Contains("remote snapshot", await SnapshotInfoAsync(rig, s));

        await AssertImageRecordedAsync(rig, image, snapshots);
        Assert.Equal("from the top layer of the eStargz image",
            (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-esgz-1", "/bin/cat", "/etc/rpull.txt")).Trim());

        // Once the pull's lease is gone, only containerd's GC labels keep content and snapshots: collect and run again.
        await CollectGarbageAsync(rig);
        Assert.Equal(manifest.Count, (await E2eHelpers.StargzSnapshotsAsync(rig.Containerd)).Count);
        Assert.Equal("from the top layer of the eStargz image",
            (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-esgz-2", "/bin/cat", "/etc/rpull.txt")).Trim());
        content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);

        // A second rpull finds every snapshot in place.
        var again = (await Rpull(rig, image)).EnsureSuccess("second stargz image rpull");
        Assert.Contains("(0 remote, 0 applied, 3 existing layers)", again.StdOut);
        Assert.Null(rig.Daemon.ExitCode);
    }

    [Fact]
    public async Task RpullOfALargeEstargzImageRunsAProgramWhileFetchingLittleOfIt()
    {
        var ct = TestContext.Current.CancellationToken;
        // Background fetch off, so what is fetched is what the run needed (as in LazyPullTests, there with ctr-remote).
        await using var rig = await E2eRig.StartAsync("no_background_fetch = true\n");
        var layers = TestImages.WritePythonLayers(rig.Work.Path, dataMegabytes: 80);
        var image = await rig.PushEstargzAsync("e2e/rpull-python", layers);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);

        var pull = (await Rpull(rig, image)).EnsureSuccess("stargz image rpull of the python image");
        Assert.Contains($"({manifest.Count} remote, 0 applied, 0 existing layers)", pull.StdOut);
        var run = await rig.Containerd.CtrAsync("run", "--rm", "--snapshotter", "stargz", image, "rpull-python",
            "/usr/bin/python3", "-c", "import json, hashlib; print(json.dumps({'sha': hashlib.sha256(open('/data/message.txt','rb').read()).hexdigest()}))");
        run.EnsureSuccess("ctr run python on the rpulled image");
        var expected = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(
            await File.ReadAllBytesAsync(Path.Combine(layers[2], "data", "message.txt"), ct)));
        Assert.Equal($"{{\"sha\": \"{expected}\"}}", run.StdOut.Trim());

        var total = manifest.Sum(l => l.Size);
        var fetched = await rig.MetricAsync("stargz_layer_fetched_bytes");
        Assert.True(fetched > 0, "nothing fetched: the container's files did not come through our layers");
        Assert.True(fetched < total * 0.2, $"fetched {fetched} of {total} bytes: not lazy");
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.DoesNotContain(digest, content);
    }

    [Fact]
    public async Task RpullOfPlainGzipImageFallsBackToAppliedLayersAndTheContainerRuns()
    {
        await using var rig = await E2eRig.StartAsync();
        var layers = ThreeLayers(rig, "plain", "from the top layer of the plain image");
        var image = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-plain", layers);
        var manifest = await LazyPullTests.ManifestLayersAsync(rig, image);

        var pull = (await Rpull(rig, image)).EnsureSuccess("stargz image rpull of a plain image");
        Assert.Contains("(0 remote, 3 applied, 0 existing layers)", pull.StdOut);
        foreach (var (digest, _) in manifest)
        {
            Assert.Contains($"fetching {digest[..15]}... ", pull.StdOut);
            Assert.Contains($"layer {digest[..15]}... applied\n", pull.StdOut);
        }
        Assert.DoesNotContain("\u001b[", pull.StdOut);

        // No FUSE mount: every layer went through containerd's content store and its differ into ordinary snapshots.
        Assert.Empty(rig.FuseMounts());
        var content = await rig.ContentDigestsAsync();
        foreach (var (digest, _) in manifest) Assert.Contains(digest, content);
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd);
        Assert.Equal(manifest.Count, snapshots.Count);
        foreach (var s in snapshots) Assert.DoesNotContain("remote snapshot", await SnapshotInfoAsync(rig, s));

        await AssertImageRecordedAsync(rig, image, snapshots);
        Assert.Equal("from the top layer of the plain image",
            (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-plain-1", "/bin/cat", "/etc/rpull.txt")).Trim());

        // The layer blobs carry containerd's uncompressed label, and survive a GC once the lease is gone.
        await CollectGarbageAsync(rig);
        var ls = (await rig.Containerd.CtrAsync("content", "ls")).EnsureSuccess("ctr content ls").StdOut;
        foreach (var (digest, _) in manifest)
            Assert.Contains("containerd.io/uncompressed=sha256:", LineOf(ls, digest));
        Assert.Equal("from the top layer of the plain image",
            (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-plain-2", "/bin/cat", "/etc/rpull.txt")).Trim());
        Assert.Null(rig.Daemon.ExitCode);
    }

    [Fact]
    public async Task RpullOfZstdChunkedAndDockerSchema2ImagesRuns()
    {
        await using var rig = await E2eRig.StartAsync();
        var layers = ThreeLayers(rig, "fmt", "from the top layer, any format");
        var plain = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-fmt", layers);

        // zstd:chunked, converted by the reference tool: our daemon mounts those layers too.
        var zstd = await rig.Containerd.ConvertWithReferenceAsync(plain, $"{rig.Registry.Host}/e2e/rpull-fmt:zstd", zstdChunked: true);
        await rig.ForgetImagesAsync(plain, zstd);
        var z = (await Rpull(rig, zstd)).EnsureSuccess("stargz image rpull of zstd:chunked");
        Assert.Contains("(3 remote, 0 applied, 0 existing layers)", z.StdOut);
        Assert.Equal("from the top layer, any format", (await E2eHelpers.RunAsync(rig.Containerd, zstd, "rpull-zstd", "/bin/cat", "/etc/rpull.txt")).Trim());

        // Docker schema 2 media types (manifest and tar.gzip layers): applied through containerd's differ.
        var layout = Path.Combine(rig.Work.Path, "oci-e2e-rpull-fmt");
        var docker = $"{rig.Registry.Host}/e2e/rpull-fmt:docker";
        (await ProcessRunner.RunAsync(Requires.Command("skopeo"), ["copy", "--quiet", "--format", "v2s2", "--dest-tls-verify=false",
            $"oci:{layout}:v1", $"docker://{docker}"], TimeSpan.FromMinutes(5))).EnsureSuccess("skopeo copy --format v2s2");
        var d = (await Rpull(rig, docker)).EnsureSuccess("stargz image rpull of a docker schema 2 image");
        // (The zstd:chunked conversion rewrote the tars, so no chain is shared with it.)
        Assert.Contains("(0 remote, 3 applied, 0 existing layers)", d.StdOut);
        var line = (await rig.Containerd.CtrAsync("images", "ls")).EnsureSuccess("ctr images ls").StdOut
            .Split('\n').Single(l => l.StartsWith(docker + " ", StringComparison.Ordinal));
        Assert.Contains("application/vnd.docker.distribution.manifest.v2+json", line);
        Assert.Equal("from the top layer, any format", (await E2eHelpers.RunAsync(rig.Containerd, docker, "rpull-docker", "/bin/cat", "/etc/rpull.txt")).Trim());
    }

    [Fact]
    public async Task RpullIntoAnotherNamespaceStaysThere()
    {
        await using var rig = await E2eRig.StartAsync();
        var esgz = await rig.PushEstargzAsync("e2e/rpull-ns", ThreeLayers(rig, "ns", "in namespace other"));
        (await StargzCli.RunAsync(["image", "rpull", "--address", rig.Containerd.Socket, "--namespace", "other", "--plain-http", esgz]))
            .EnsureSuccess("stargz image rpull --namespace other");
        Assert.Contains(esgz, (await rig.Containerd.CtrInNamespaceAsync("other", "images", "ls", "-q")).EnsureSuccess("ctr -n other images ls").StdOut);
        Assert.DoesNotContain(esgz, (await rig.Containerd.CtrAsync("images", "ls", "-q")).EnsureSuccess("ctr images ls").StdOut);
        Assert.Equal(3, (await E2eHelpers.StargzSnapshotsAsync(rig.Containerd, "other")).Count);
        Assert.Empty(await E2eHelpers.StargzSnapshotsAsync(rig.Containerd));
        var run = (await rig.Containerd.CtrInNamespaceAsync("other", "run", "--rm", "--snapshotter", "stargz", esgz, "rpull-ns", "/bin/cat", "/etc/rpull.txt"))
            .EnsureSuccess("ctr -n other run");
        Assert.Equal("in namespace other", run.StdOut.Trim());
    }

    [Fact]
    public async Task HostsDirSendsTheRegistryRequestsWhereItSays()
    {
        await using var rig = await E2eRig.StartAsync();
        var plain = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-hosts", ThreeLayers(rig, "hosts", "through hosts.toml"));
        // localhost:1 has nothing listening; its hosts.toml sends pulls to the real registry (containerd's certs.d layout).
        var hostsDir = rig.Work.Sub("certs.d");
        Directory.CreateDirectory(Path.Combine(hostsDir, "localhost:1"));
        File.WriteAllText(Path.Combine(hostsDir, "localhost:1", "hosts.toml"), $"server = \"http://{rig.Registry.Host}\"\n");
        var image = plain.Replace(rig.Registry.Host, "localhost:1", StringComparison.Ordinal);

        var without = await Rpull(rig, image);
        Assert.Equal(1, without.ExitCode);
        Assert.Contains("localhost:1", without.StdErr);

        var with = (await Rpull(rig, image, extra: ["--hosts-dir", hostsDir])).EnsureSuccess("stargz image rpull --hosts-dir");
        // Our daemon does not know that hosts dir: it cannot reach localhost:1 and falls back; the layers are applied.
        Assert.Contains("(0 remote, 3 applied, 0 existing layers)", with.StdOut);
        Assert.Equal("through hosts.toml", (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-hosts", "/bin/cat", "/etc/rpull.txt")).Trim());
    }

    [Fact]
    public async Task RpullFailsWithAClearMessageAndNonZeroExit()
    {
        await using var rig = await E2eRig.StartAsync();
        var layers = ThreeLayers(rig, "err", "unused");
        var image = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-err", layers);

        var noSocket = await StargzCli.RunAsync(["image", "rpull", "--address", Path.Combine(rig.Work.Path, "none.sock"), "--plain-http", image]);
        Assert.Equal(1, noSocket.ExitCode);
        Assert.Contains("none.sock does not exist", noSocket.StdErr);

        // A socket file nobody listens on (containerd died without removing it).
        var stale = Path.Combine(rig.Work.Path, "stale.sock");
        // python leaves the file behind on close (a .NET socket would unlink what it bound).
        (await ProcessRunner.RunAsync(Requires.Command("python3"), "-c",
            $"import socket; s = socket.socket(socket.AF_UNIX); s.bind('{stale}'); s.close()")).EnsureSuccess("make a stale socket");
        Assert.True(File.Exists(stale));
        var dead = await StargzCli.RunAsync(["image", "rpull", "--address", stale, "--plain-http", image]);
        Assert.Equal(1, dead.ExitCode);
        Assert.Contains($"cannot reach containerd at {stale}: Connection refused", dead.StdErr);

        var missing = await Rpull(rig, $"{rig.Registry.Host}/e2e/no-such-image:v1");
        Assert.Equal(1, missing.ExitCode);
        Assert.Contains("not found", missing.StdErr);

        var unknown = await Rpull(rig, image, snapshotter: "no-such-snapshotter");
        Assert.Equal(1, unknown.ExitCode);
        Assert.Contains("snapshotter \"no-such-snapshotter\" is not known to containerd", unknown.StdErr);

        var usage = await StargzCli.RunAsync(["image", "rpull", "--address", rig.Containerd.Socket]);
        Assert.Equal(2, usage.ExitCode);
        Assert.Contains("needs an image reference", usage.StdErr);

        // Our daemon stopped: containerd's proxy plugin cannot reach it.
        Assert.Equal(0, await rig.Daemon.StopAsync());
        var down = await Rpull(rig, image);
        Assert.Equal(1, down.ExitCode);
        // The whole stderr on failure (Assert.Contains cuts it). This failed now and then with "update labels of
        // content ...: NotFound" (GC took the config the earlier pulls left): ContentContainerdHasAlreadyIsHeldByThePullsLease.
        Assert.True(down.StdErr.Contains("snapshotter \"stargz\" is unavailable (is its daemon running?)", StringComparison.Ordinal), down.StdErr);

        // None of the failures left an image behind or a lease open.
        Assert.DoesNotContain(image, (await rig.Containerd.CtrAsync("images", "ls", "-q")).EnsureSuccess("ctr images ls").StdOut);
        Assert.DoesNotContain("stargz-rpull-", (await rig.Containerd.CtrAsync("leases", "ls")).EnsureSuccess("ctr leases ls").StdOut);
    }

    [Fact]
    public async Task ContentContainerdHasAlreadyIsHeldByThePullsLease()
    {
        // Content another pull stored may belong to nothing a moment later (that pull's lease ended, its image was
        // removed); containerd's GC then takes it. A second pull that only looked it up and set labels on it failed
        // now and then with "update labels of content ...: NotFound". Held by this pull's lease, GC cannot take it.
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var image = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-lease", ThreeLayers(rig, "lease", "leased"));
        (await Rpull(rig, image)).EnsureSuccess("first rpull");

        var hosts = new Stargz.Registry.RegistryHostsConfig();
        hosts.Set(rig.Registry.Host, new Stargz.Registry.HostConfig { Origin = new Stargz.Registry.EndpointConfig { Host = rig.Registry.Host, PlainHttp = true } });
        using var registry = new Stargz.Registry.RegistryClient(hosts);
        using var containerd = new Stargz.Containerd.ContainerdClient(rig.Containerd.Socket, rig.Containerd.Namespace);
        using var channel = E2eHelpers.Channel(rig.Containerd.Socket);
        var leases = new global::Containerd.Services.Leases.V1.Leases.LeasesClient(channel);
        var headers = new Grpc.Core.Metadata { { "containerd-namespace", rig.Containerd.Namespace } };
        // What the pull's lease holds, looked at on every progress line (the pull is paused meanwhile).
        var held = new HashSet<string>(StringComparer.Ordinal);
        var probe = new LineProbe(_ =>
        {
            if (containerd.LeaseId is not { } id) return;
            foreach (var r in leases.ListResources(new() { Id = id }, headers, cancellationToken: ct).Resources)
                if (r.Type == "content") held.Add(r.Id);
        });
        var result = await new Stargz.Containerd.ImagePuller(registry, containerd, progress: probe)
            .PullAsync(Stargz.Registry.ImageReference.Parse(image), new Stargz.Containerd.RpullOptions { Snapshotter = "stargz" }, ct);

        Assert.Contains(result.ConfigDigest, held);
        Assert.Contains(result.Target.Digest, held);
        Assert.DoesNotContain("stargz-rpull-", (await rig.Containerd.CtrAsync("leases", "ls")).EnsureSuccess("ctr leases ls").StdOut);
    }

    /// <summary>A progress writer that calls <c>onLine</c> for every line written.</summary>
    private sealed class LineProbe(Action<string> onLine) : StringWriter(System.Globalization.CultureInfo.InvariantCulture)
    {
        public override void WriteLine(string? value) => onLine(value ?? "");
    }

    [Fact]
    public async Task RpullOfAnIndexStoresIndexAndPlatformManifestAndRuns()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var esgz = await rig.PushEstargzAsync("e2e/rpull-idx", ThreeLayers(rig, "idx", "from the image behind an index"));
        // An index whose first entry is for another platform and names the plain gzip manifest: taking it would
        // give applied layers instead of remote ones.
        using var registry = new Stargz.Registry.RegistryClient();
        var m = await registry.ResolveAsync(Stargz.Registry.ImageReference.Parse(esgz), Stargz.Registry.Platform.Parse("linux/amd64"), ct);
        var other = await registry.ResolveAsync(Stargz.Registry.ImageReference.Parse($"{rig.Registry.Host}/e2e/rpull-idx:v1"), null, ct);
        var indexJson = System.Text.Encoding.UTF8.GetBytes($$$"""
            {"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
             {"mediaType":"{{{other.MediaType}}}","digest":"{{{other.Digest}}}","size":{{{other.Raw.Length}}},"platform":{"architecture":"arm64","os":"linux"}},
             {"mediaType":"{{{m.MediaType}}}","digest":"{{{m.Digest}}}","size":{{{m.Raw.Length}}},"platform":{"architecture":"amd64","os":"linux"}}]}
            """);
        var image = $"{rig.Registry.Host}/e2e/rpull-idx:index";
        var indexDigest = await registry.PushManifestAsync(Stargz.Registry.ImageReference.Parse(image), indexJson,
            Stargz.Registry.MediaTypes.OciIndex, "index", ct);

        var pull = (await Rpull(rig, image, extra: ["--platform", "linux/amd64"])).EnsureSuccess("stargz image rpull of an index");
        Assert.Contains("(3 remote, 0 applied, 0 existing layers)", pull.StdOut);
        var line = (await rig.Containerd.CtrAsync("images", "ls")).EnsureSuccess("ctr images ls").StdOut
            .Split('\n').Single(l => l.StartsWith(image + " ", StringComparison.Ordinal));
        Assert.Contains("application/vnd.oci.image.index.v1+json", line);
        Assert.Contains(indexDigest, line);

        // Once only GC labels hold them: the index keeps the platform's manifest, which keeps the config.
        await CollectGarbageAsync(rig);
        var content = (await rig.Containerd.CtrAsync("content", "ls")).EnsureSuccess("ctr content ls").StdOut;
        Assert.Contains($"containerd.io/gc.ref.content.m.0={m.Digest}", LineOf(content, indexDigest));
        Assert.Contains($"containerd.io/gc.ref.content.config={m.Config.Digest}", LineOf(content, m.Digest));
        Assert.Contains("containerd.io/gc.ref.snapshot.stargz=sha256:", LineOf(content, m.Config.Digest));
        Assert.Equal("from the image behind an index",
            (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-idx", "/bin/cat", "/etc/rpull.txt")).Trim());
    }

    [Fact]
    public async Task SnapshotLabelsAreTheSameAsAfterTheReferenceCtrRemoteRpull()
    {
        await using var rig = await E2eRig.StartAsync();
        var plain = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-same-plain", ThreeLayers(rig, "same-plain", "plain"));
        var esgz = await rig.PushEstargzAsync("e2e/rpull-same-esgz", ThreeLayers(rig, "same-esgz", "esgz"));
        foreach (var image in new[] { plain, esgz })
        {
            (await rig.Containerd.CtrRemoteAsync("image", "rpull", "--plain-http", image)).EnsureSuccess("ctr-remote rpull");
            var theirs = await SnapshotLabelsAsync(rig);
            await rig.ForgetImagesAsync(image);
            await FallbackTests.WaitNoSnapshotsAsync(rig);

            (await Rpull(rig, image)).EnsureSuccess("stargz image rpull");
            var ours = await SnapshotLabelsAsync(rig);
            // One deliberate difference: we also pass the layer's io.containers.estargz.uncompressed-size (containerd's
            // unpacker keeps only containerd.io/snapshot/ annotations); containerd records it, and strips it again
            // before the snapshotter sees it.
            foreach (var labels in ours.Values)
                if (labels.Remove("io.containers.estargz.uncompressed-size", out var size))
                    Assert.True(image == esgz && long.TryParse(size, out var n) && n > 0, $"uncompressed-size {size} on {image}");
            Assert.Equal(theirs.Keys.Order(), ours.Keys.Order());
            foreach (var (name, labels) in theirs)
            {
                // ctr-remote also sends empty url labels (a manifest without URLs); we leave those out.
                var want = labels.Where(kv => kv.Value.Length > 0).OrderBy(kv => kv.Key).ToList();
                var got = ours[name].Where(kv => kv.Value.Length > 0).OrderBy(kv => kv.Key).ToList();
                Assert.Equal(want, got);
            }
            await rig.ForgetImagesAsync(image);
            await FallbackTests.WaitNoSnapshotsAsync(rig);
        }
    }

    [Fact]
    public async Task ALayerThatDoesNotMatchItsDiffIdFailsThePullAndLeavesNothingHalfDone()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await E2eRig.StartAsync();
        var plain = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-bad", ThreeLayers(rig, "bad", "unused"));
        // The same image with the top layer's diffID in the config replaced: the layer unpacks to something else.
        using var registry = new Stargz.Registry.RegistryClient();
        var m = await registry.ResolveAsync(Stargz.Registry.ImageReference.Parse(plain), null, ct);
        var config = System.Text.Json.Nodes.JsonNode.Parse(await registry.FetchBlobBytesAsync(m.Reference, m.Config.Digest, ct: ct))!;
        var bogus = "sha256:" + new string('b', 64);
        config["rootfs"]!["diff_ids"]![2] = bogus;
        var configBytes = System.Text.Encoding.UTF8.GetBytes(config.ToJsonString());
        var configDigest = (await registry.PushBlobAsync(m.Reference, configBytes, ct: ct)).Digest;
        var manifest = System.Text.Json.Nodes.JsonNode.Parse(m.Raw.Span)!;
        manifest["config"]!["digest"] = configDigest;
        manifest["config"]!["size"] = configBytes.Length;
        var bad = $"{rig.Registry.Host}/e2e/rpull-bad:bad";
        await registry.PushManifestAsync(Stargz.Registry.ImageReference.Parse(bad), System.Text.Encoding.UTF8.GetBytes(manifest.ToJsonString()),
            m.MediaType, "bad", ct);

        var r = await Rpull(rig, bad);
        Assert.Equal(1, r.ExitCode);
        Assert.Contains($"but the config says its diffID is {bogus}", r.StdErr);
        // The third layer's extraction snapshot is gone, no write is left open, and neither a lease nor an image
        // record exists (the two good layers' snapshots are left to containerd's GC with the lease).
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd);
        Assert.DoesNotContain(snapshots, s => s.StartsWith("extract-", StringComparison.Ordinal));
        Assert.DoesNotContain("sha256:", (await rig.Containerd.CtrAsync("content", "active")).EnsureSuccess("ctr content active").StdOut);
        Assert.DoesNotContain("stargz-rpull-", (await rig.Containerd.CtrAsync("leases", "ls")).EnsureSuccess("ctr leases ls").StdOut);
        Assert.DoesNotContain(bad, (await rig.Containerd.CtrAsync("images", "ls", "-q")).EnsureSuccess("ctr images ls").StdOut);
        // The good image still pulls and runs.
        (await Rpull(rig, plain)).EnsureSuccess("stargz image rpull of the good image");
        Assert.Equal("unused", (await E2eHelpers.RunAsync(rig.Containerd, plain, "rpull-good", "/bin/cat", "/etc/rpull.txt")).Trim());
    }

    [Fact]
    public async Task CtrlCDuringRpullExits130AndHandsTheLeaseBack()
    {
        await using var rig = await E2eRig.StartAsync();
        var plain = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-cancel", ThreeLayers(rig, "cancel", "unused"));
        // Through a proxy that stops answering: the pull hangs on the registry after it has taken its lease.
        await using var proxy = new CountingProxy(rig.Registry.Host);
        proxy.Down();
        var image = plain.Replace(rig.Registry.Host, proxy.Host, StringComparison.Ordinal);
        var (file, args) = await StargzCli.CommandAsync();
        // Ctrl-C reaches a foreground command whose SIGINT acts by default; a test runner started in the background
        // by a non-interactive shell has it ignored, and exec passes that on: env puts the default back.
        var psi = new System.Diagnostics.ProcessStartInfo(Requires.Command("env"))
        {
            UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true,
        };
        args.InsertRange(0, ["--default-signal=INT", file]);
        args.AddRange(["image", "rpull", "--address", rig.Containerd.Socket, "--plain-http", image]);
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = System.Diagnostics.Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        try
        {
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
            while (!(await rig.Containerd.CtrAsync("leases", "ls")).StdOut.Contains("stargz-rpull-", StringComparison.Ordinal))
            {
                Assert.True(DateTime.UtcNow < deadline && !p.HasExited, "rpull never took a lease");
                await Task.Delay(100, TestContext.Current.CancellationToken);
            }
            Assert.Equal(0, kill(p.Id, 2)); // SIGINT, as Ctrl-C
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            await p.WaitForExitAsync(cts.Token);
        }
        finally
        {
            if (!p.HasExited) p.Kill();
        }
        var err = await stderr;
        Assert.True(p.ExitCode == 130, $"rpull exited {p.ExitCode}, not 130:\n{err}");
        Assert.Contains("rpull cancelled", err);
        Assert.DoesNotContain("stargz-rpull-", (await rig.Containerd.CtrAsync("leases", "ls")).EnsureSuccess("ctr leases ls").StdOut);
        Assert.DoesNotContain(image, (await rig.Containerd.CtrAsync("images", "ls", "-q")).EnsureSuccess("ctr images ls").StdOut);
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);

    [Fact]
    public async Task ConcurrentRpullsOfOneImageAllSucceedAndLeaveOneChain()
    {
        await using var rig = await E2eRig.StartAsync();
        var plain = await E2eHelpers.PushPlainAsync(rig, "e2e/rpull-conc-plain", ThreeLayers(rig, "conc-plain", "plain, pulled three times at once"));
        var esgz = await rig.PushEstargzAsync("e2e/rpull-conc-esgz", ThreeLayers(rig, "conc-esgz", "esgz, pulled three times at once"));
        foreach (var (image, text) in new[] { (plain, "plain, pulled three times at once"), (esgz, "esgz, pulled three times at once") })
        {
            // Same blobs, same chainIDs, same ingest refs: the losers of each race must wait or find the winner's work.
            var runs = await Task.WhenAll(Enumerable.Range(0, 3).Select(_ => Rpull(rig, image)));
            foreach (var r in runs) r.EnsureSuccess($"one of three concurrent rpulls of {image}");
            Assert.Equal(text, (await E2eHelpers.RunAsync(rig.Containerd, image, "rpull-conc", "/bin/cat", "/etc/rpull.txt")).Trim());
        }
        // One chain per image (3 layers each), nothing half-made left: no extract-* snapshots, no ingests, no leases.
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd);
        Assert.Equal(6, snapshots.Count);
        Assert.DoesNotContain(snapshots, s => s.StartsWith("extract-", StringComparison.Ordinal));
        Assert.Equal(3, rig.FuseMounts().Count);
        var active = (await rig.Containerd.CtrAsync("content", "active")).EnsureSuccess("ctr content active").StdOut;
        Assert.DoesNotContain("sha256:", active);
        Assert.DoesNotContain("stargz-rpull-", (await rig.Containerd.CtrAsync("leases", "ls")).EnsureSuccess("ctr leases ls").StdOut);
    }

    /// <summary>Name → labels of every snapshot of the `stargz` snapshotter, as containerd reports them.</summary>
    private static async Task<Dictionary<string, Dictionary<string, string>>> SnapshotLabelsAsync(E2eRig rig)
    {
        var result = new Dictionary<string, Dictionary<string, string>>();
        foreach (var s in await E2eHelpers.StargzSnapshotsAsync(rig.Containerd))
        {
            using var doc = System.Text.Json.JsonDocument.Parse(await SnapshotInfoAsync(rig, s));
            var labels = new Dictionary<string, string>();
            if (doc.RootElement.TryGetProperty("Labels", out var l) && l.ValueKind == System.Text.Json.JsonValueKind.Object)
                foreach (var p in l.EnumerateObject()) labels[p.Name] = p.Value.GetString() ?? "";
            result[s] = labels;
        }
        return result;
    }

    internal static Task<ProcessResult> Rpull(E2eRig rig, string image, string snapshotter = "stargz", string[]? extra = null) =>
        StargzCli.RunAsync(["image", "rpull", "--address", rig.Containerd.Socket, "--namespace", rig.Containerd.Namespace,
            "--snapshotter", snapshotter, "--plain-http", "--log-level", "debug", .. extra ?? [], image]);

    /// <summary>busybox, a middle layer, and a top layer holding /etc/rpull.txt.</summary>
    private static IReadOnlyList<string> ThreeLayers(E2eRig rig, string name, string topText)
    {
        var l1 = rig.Work.Sub($"{name}-l1");
        TestImages.WriteBusybox(l1);
        var l2 = rig.Work.Sub($"{name}-l2");
        Directory.CreateDirectory(Path.Combine(l2, "etc"));
        File.WriteAllText(Path.Combine(l2, "etc", "middle.txt"), "middle layer\n");
        var l3 = rig.Work.Sub($"{name}-l3");
        Directory.CreateDirectory(Path.Combine(l3, "etc"));
        File.WriteAllText(Path.Combine(l3, "etc", "rpull.txt"), topText + "\n");
        return [l1, l2, l3];
    }

    internal static async Task<string> SnapshotInfoAsync(E2eRig rig, string key) =>
        (await rig.Containerd.CtrAsync("snapshots", "--snapshotter", "stargz", "info", key)).EnsureSuccess($"ctr snapshots info {key}").StdOut;

    /// <summary>The image is listed, no rpull lease is left, and its config carries the snapshot GC label naming the
    /// top of the chain (the one snapshot that is no other's parent).</summary>
    private static async Task AssertImageRecordedAsync(E2eRig rig, string image, List<string> snapshots)
    {
        var images = (await rig.Containerd.CtrAsync("images", "ls", "-q")).EnsureSuccess("ctr images ls").StdOut;
        Assert.Contains(image, images.Split('\n', StringSplitOptions.TrimEntries));
        Assert.DoesNotContain("stargz-rpull-", (await rig.Containerd.CtrAsync("leases", "ls")).EnsureSuccess("ctr leases ls").StdOut);

        var ls = (await rig.Containerd.CtrAsync("snapshots", "--snapshotter", "stargz", "ls")).EnsureSuccess("ctr snapshots ls").StdOut;
        var parents = ls.Split('\n', StringSplitOptions.RemoveEmptyEntries).Skip(1)
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)).Where(p => p.Length >= 3).Select(p => p[1]).ToHashSet();
        var top = Assert.Single(snapshots, s => !parents.Contains(s));
        var content = (await rig.Containerd.CtrAsync("content", "ls")).EnsureSuccess("ctr content ls").StdOut;
        Assert.Contains($"containerd.io/gc.ref.snapshot.stargz={top}", content);
    }

    /// <summary>Runs containerd's GC now: deleting a lease with --sync collects everything unreferenced.</summary>
    private static async Task CollectGarbageAsync(E2eRig rig)
    {
        var id = "rpull-test-gc";
        (await rig.Containerd.CtrAsync("leases", "create", "--id", id)).EnsureSuccess("ctr leases create");
        (await rig.Containerd.CtrAsync("leases", "delete", "--sync", id)).EnsureSuccess("ctr leases delete --sync");
    }

    private static string LineOf(string output, string digest) =>
        output.Split('\n').FirstOrDefault(l => l.StartsWith(digest, StringComparison.Ordinal)) ?? $"(no line for {digest})";
}
