using System.Security.Cryptography.X509Certificates;
using System.Text;
using Stargz.Cri.V1;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The CRI keychain end to end, the way a Kubernetes node with a private registry uses it: a docker-registry with
/// htpasswd Basic auth holding an eStargz image, containerd 1.6 with CRI on the `stargz` snapshotter, and our daemon
/// with NO docker config credentials. kubelet's PullImage (with AuthConfig) goes to the daemon's socket
/// (--image-service-endpoint), which keeps the credentials and forwards the pull to containerd's CRI.
/// </summary>
public class CriKeychainTests
{
    private const string User = "kubelet";
    private const string Password = "n0t-in-any-log";

    /// <summary>With [cri_keychain]: the pull succeeds, every layer is a lazy FUSE mount read from the auth registry,
    /// and a file of the image is read in a container. The image calls kubelet makes go through the proxy.</summary>
    /// <param name="criVersion">kubelet's CRI version: v1, or v1alpha2 (kubelets before 1.26), served alike.</param>
    [Theory]
    [InlineData("v1")]
    [InlineData("v1alpha2")]
    public async Task PullWithAuthConfigThroughTheDaemonServesEveryLayerLazilyFromAnAuthRegistry(string criVersion)
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await AuthRig.StartAsync(keychain: true);

        // The registry really wants credentials (nothing below works by reaching it anonymously).
        using (var http = new HttpClient())
        using (var anon = await http.GetAsync($"http://{rig.Registry.Host}/v2/{rig.Repository}/manifests/esgz", ct))
            Assert.Equal(System.Net.HttpStatusCode.Unauthorized, anon.StatusCode);

        using var cri = new CriClient(rig.Daemon.Socket, criVersion);
        var pulled = await cri.Images.PullImageAsync(new PullImageRequest
        {
            Image = new ImageSpec { Image = rig.Image },
            // As a URL: containerd's CRI parses server_address as one and compares its host with the registry's.
            Auth = new AuthConfig { Username = User, Password = Password, ServerAddress = $"http://{rig.Registry.Host}" },
        }, cancellationToken: ct);
        Assert.StartsWith("sha256:", pulled.ImageRef);

        // Every layer is one of our FUSE mounts; no layer blob went into containerd's content store (k8s.io).
        var mounts = rig.FuseMounts().Count;
        Assert.True(rig.Layers.Count == mounts, $"{mounts} FUSE mounts for {rig.Layers.Count} layers; daemon:\n{Tail(rig.Daemon.Log)}");
        var content = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "content", "ls", "-q")).EnsureSuccess("ctr -n k8s.io content ls").StdOut;
        foreach (var (digest, _) in rig.Layers) Assert.DoesNotContain(digest, content);
        var snapshots = await E2eHelpers.StargzSnapshotsAsync(rig.Containerd, "k8s.io");
        Assert.Equal(rig.Layers.Count, snapshots.Count);
        foreach (var s in snapshots)
        {
            var info = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "snapshots", "--snapshotter", "stargz", "info", s)).EnsureSuccess("snapshots info").StdOut;
            Assert.Contains("remote snapshot", info);
        }

        // A file of the image, read in a container: its bytes come from the auth registry through our layers.
        var run = await rig.Containerd.CtrInNamespaceAsync("k8s.io", "run", "--rm", "--snapshotter", "stargz", rig.Image, "cri-keychain",
            "/bin/cat", "/etc/motd");
        run.EnsureSuccess("ctr -n k8s.io run of the image pulled through the CRI keychain");
        Assert.Equal(Motd, run.StdOut.Trim());
        Assert.True(await DaemonMetrics.ReadAsync(rig.MetricsPort, "stargz_layer_fetched_bytes") > 0, "no layer bytes fetched from the registry");
        Assert.Equal(0, await DaemonMetrics.ReadAsync(rig.MetricsPort, "stargz_layer_errors"));

        // kubelet's other image calls go through the same socket to containerd.
        var status = await cri.Images.ImageStatusAsync(new ImageStatusRequest { Image = new ImageSpec { Image = rig.Image } }, cancellationToken: ct);
        Assert.Equal(pulled.ImageRef, status.Image.Id);
        var list = await cri.Images.ListImagesAsync(new ListImagesRequest(), cancellationToken: ct);
        Assert.Contains(list.Images, i => i.RepoTags.Contains(rig.Image));
        var fs = await cri.Images.ImageFsInfoAsync(new ImageFsInfoRequest(), cancellationToken: ct);
        Assert.NotEmpty(fs.ImageFilesystems);

        // The daemon logged the pull and the kind of credentials, never the password.
        Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "CRI PullImage", "basic"));
        Assert.DoesNotContain(Password, rig.Daemon.Log);

        await cri.Images.RemoveImageAsync(new RemoveImageRequest { Image = new ImageSpec { Image = rig.Image } }, cancellationToken: ct);
        Assert.NotNull(await E2eHelpers.WaitLogLineAsync(rig.Daemon, "CRI RemoveImage", "credentials are dropped"));
        list = await cri.Images.ListImagesAsync(new ListImagesRequest(), cancellationToken: ct);
        Assert.DoesNotContain(list.Images, i => i.RepoTags.Contains(rig.Image));
        Assert.Null(rig.Daemon.ExitCode);
    }

    /// <summary>
    /// What a user sees without [cri_keychain] (kubelet talking to containerd directly, daemon without credentials):
    /// containerd pulls with the AuthConfig itself, but our daemon cannot read the layers (401), so every layer falls
    /// back to an ordinary snapshot and its whole blob is downloaded: the image runs, nothing is lazy.
    /// </summary>
    [Fact]
    public async Task WithoutTheKeychainTheLayersOfAnAuthRegistryAreDownloadedNotServedLazily()
    {
        var ct = TestContext.Current.CancellationToken;
        await using var rig = await AuthRig.StartAsync(keychain: false);

        // Without the keychain the daemon serves no ImageService: kubelet cannot be pointed at it.
        using (var toDaemon = new CriClient(rig.Daemon.Socket))
        {
            var e = await Assert.ThrowsAsync<Grpc.Core.RpcException>(async () =>
                await toDaemon.Images.ListImagesAsync(new ListImagesRequest(), cancellationToken: ct));
            Assert.Equal(Grpc.Core.StatusCode.Unimplemented, e.StatusCode);
        }

        using var cri = new CriClient(rig.Containerd.Socket);
        var pulled = await cri.Images.PullImageAsync(new PullImageRequest
        {
            Image = new ImageSpec { Image = rig.Image },
            Auth = new AuthConfig { Username = User, Password = Password },
        }, cancellationToken: ct);
        Assert.StartsWith("sha256:", pulled.ImageRef);

        Assert.Empty(rig.FuseMounts());
        var content = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "content", "ls", "-q")).EnsureSuccess("ctr -n k8s.io content ls").StdOut;
        foreach (var (digest, _) in rig.Layers) Assert.Contains(digest, content);
        foreach (var (digest, _) in rig.Layers)
        {
            var line = await E2eHelpers.WaitLogLineAsync(rig.Daemon, $"layer {digest} for ", "falling back to an ordinary snapshot");
            Assert.True(line != null, $"no fallback log line for {digest}:\n{Tail(rig.Daemon.Log)}");
            // The reason names the registry's refusal.
            Assert.Contains("no credentials", line);
        }
        var run = await rig.Containerd.CtrInNamespaceAsync("k8s.io", "run", "--rm", "--snapshotter", "stargz", rig.Image, "cri-nokeychain",
            "/bin/cat", "/etc/motd");
        run.EnsureSuccess("ctr -n k8s.io run of the image pulled without the keychain");
        Assert.Equal(Motd, run.StdOut.Trim());
        Assert.Equal(0, await DaemonMetrics.ReadAsync(rig.MetricsPort, "stargz_layers_mounted"));
    }

    /// <summary>A node whose docker config names a credential helper (as EKS nodes do with ecr-login): without the CRI
    /// keychain, the daemon asks the helper and serves the layers of the auth registry lazily.</summary>
    [Fact]
    public async Task WithACredentialHelperInTheDaemonsDockerConfigTheLayersOfAnAuthRegistryAreServedLazily()
    {
        await using var rig = await AuthRig.StartAsync(keychain: false, credentialHelper: true);
        await PullThroughContainerdAndRunLazilyAsync(rig, "cri-helper", "the helper's credentials");
        Assert.True(File.Exists(rig.HelperAskedFile), "the credential helper was never run");
    }

    /// <summary>With [kubeconfig_keychain] and no other credentials: the cluster's image pull secret (listed from the
    /// Kubernetes API with the kubeconfig's client certificate) opens the auth registry's layers lazily.</summary>
    [Fact]
    public async Task WithTheKubeconfigKeychainAnImagePullSecretServesTheLayersOfAnAuthRegistryLazily()
    {
        await using var rig = await AuthRig.StartAsync(keychain: false, kubeSecrets: true);
        await PullThroughContainerdAndRunLazilyAsync(rig, "kube-secret", "the pull secret's credentials");
        Assert.True(rig.KubeApi!.Lists >= 1);
    }

    /// <summary>kubelet's pull straight to containerd (the daemon only gets the snapshots calls): every layer must be a
    /// FUSE mount, none in containerd's content store, and a container reads the image's file; no secret is logged.</summary>
    private static async Task PullThroughContainerdAndRunLazilyAsync(AuthRig rig, string container, string credentials)
    {
        var ct = TestContext.Current.CancellationToken;
        using var cri = new CriClient(rig.Containerd.Socket);
        try
        {
            await cri.Images.PullImageAsync(new PullImageRequest
            {
                Image = new ImageSpec { Image = rig.Image },
                Auth = new AuthConfig { Username = User, Password = Password }, // containerd's own manifest fetch
            }, cancellationToken: ct);
        }
        catch (Grpc.Core.RpcException e)
        {
            // Seen once in CI: containerd could not reach the daemon's socket. Say what the daemon was doing.
            throw new Xunit.Sdk.XunitException($"PullImage failed: {e.Status}; daemon exit code {rig.Daemon.ExitCode?.ToString() ?? "none (running)"}:\n{Tail(rig.Daemon.Log)}");
        }

        Assert.Equal(rig.Layers.Count, rig.FuseMounts().Count);
        var content = (await rig.Containerd.CtrInNamespaceAsync("k8s.io", "content", "ls", "-q")).EnsureSuccess("ctr -n k8s.io content ls").StdOut;
        foreach (var (digest, _) in rig.Layers) Assert.DoesNotContain(digest, content);
        var run = await rig.Containerd.CtrInNamespaceAsync("k8s.io", "run", "--rm", "--snapshotter", "stargz", rig.Image, container,
            "/bin/cat", "/etc/motd");
        run.EnsureSuccess($"ctr -n k8s.io run of the image served with {credentials}");
        Assert.Equal(Motd, run.StdOut.Trim());
        Assert.DoesNotContain(Password, rig.Daemon.Log);
    }

    /// <summary>The daemon starts before its backing CRI service (as under systemd, where containerd may come later);
    /// kubelet's calls meanwhile fail as Unavailable naming the backend, not as a hang or an internal error.</summary>
    [Fact]
    public async Task ABackendThatIsNotUpYetIsUnavailableNamingIt()
    {
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("crikc-nobackend");
        var missing = Path.Combine(dir.Path, "containerd-not-yet.sock");
        await using var daemon = await LocalDaemon.StartAsync($"[cri_keychain]\nenable_keychain = true\nimage_service_path = \"unix://{missing}\"\n");
        using var cri = new CriClient(daemon.Socket);
        var e = await Assert.ThrowsAsync<Grpc.Core.RpcException>(async () => await cri.Images.PullImageAsync(new PullImageRequest
        {
            Image = new ImageSpec { Image = "127.0.0.1:1/none/app:v1" },
            Auth = new AuthConfig { Username = User, Password = Password },
        }, deadline: DateTime.UtcNow.AddSeconds(30), cancellationToken: ct));
        Assert.Equal(Grpc.Core.StatusCode.Unavailable, e.StatusCode);
        Assert.Contains(missing, e.Status.Detail);
        Assert.DoesNotContain(Password, daemon.Log);
        Assert.Null(daemon.ExitCode);
    }

    private const string Motd = "pulled lazily with kubelet's credentials";

    private static string Tail(string log) => log.Length <= 6000 ? log : log[^6000..];

    /// <summary>
    /// The rig: the image is built, converted by the reference ctr-remote and pushed while the registry is open; then
    /// the registry is restarted on the same port and storage with htpasswd auth, and (with the keychain) the daemon
    /// is restarted with [cri_keychain] pointing at containerd's socket, which only exists once containerd runs.
    /// </summary>
    private sealed class AuthRig : IAsyncDisposable
    {
        public required LocalRegistry Registry { get; set; }
        public required LocalDaemon Daemon { get; init; }
        public required LocalContainerd Containerd { get; init; }
        public required int MetricsPort { get; init; }
        public required TempDir Work { get; init; }
        public string Repository => "e2e/private";
        public string Image => $"{Registry.Host}/{Repository}:esgz";
        public List<(string Digest, long Size)> Layers { get; private set; } = [];
        /// <summary>Written by the credential helper (when the rig has one) each time the daemon runs it.</summary>
        public string HelperAskedFile => Path.Combine(Work.Path, "helper-asked");
        /// <summary>The Kubernetes API stand-in, when the rig serves an image pull secret.</summary>
        public KubeApiServer? KubeApi { get; private set; }

        public List<Mounts.MountInfo> FuseMounts() =>
            Mounts.Under(Daemon.Root).Where(m => m.FsType.StartsWith("fuse", StringComparison.Ordinal)).ToList();

        /// <param name="credentialHelper">give the daemon a docker config whose credsStore is a helper that knows the
        /// registry's credentials (a real program on the daemon's PATH).</param>
        /// <param name="kubeSecrets">serve the registry's credentials as an image pull secret from a Kubernetes API
        /// stand-in and turn the daemon's kubeconfig keychain on.</param>
        public static async Task<AuthRig> StartAsync(bool keychain, bool credentialHelper = false, bool kubeSecrets = false)
        {
            Requires.Fuse();
            var htpasswd = Requires.Command("htpasswd");
            var work = new TempDir("e2e-crikc");
            var storage = work.Sub("registry-storage");
            var dockerConfigDir = work.Sub("docker-config");
            // The daemon gets its own docker config dir (empty unless the rig has a helper): root's ~/.docker cannot help.
            var env = new Dictionary<string, string> { ["DOCKER_CONFIG"] = dockerConfigDir };
            if (credentialHelper)
            {
                var bin = work.Sub("helper-bin");
                CredentialHelperScript.Write(bin, "e2e", $$"""
                    read server
                    echo "$server" >> '{{Path.Combine(work.Path, "helper-asked")}}'
                    printf '{"ServerURL":"%s","Username":"{{User}}","Secret":"{{Password}}"}' "$server"
                    """);
                await File.WriteAllTextAsync(Path.Combine(dockerConfigDir, "config.json"), "{\"credsStore\": \"e2e\"}");
                env["PATH"] = bin + ":" + (Environment.GetEnvironmentVariable("PATH") ?? "/usr/sbin:/usr/bin:/sbin:/bin");
            }
            var metricsPort = LocalRegistry.FreePort();
            var baseToml = $"metrics_address = \"127.0.0.1:{metricsPort}\"\n";
            var registry = await LocalRegistry.StartAsync(storageDir: storage);
            LocalDaemon? daemon = null;
            LocalContainerd? ctd = null;
            KubeApiServer? kubeApi = null;
            try
            {
                daemon = await LocalDaemon.StartAsync(baseToml, env: env);
                ctd = await LocalContainerd.StartAsync(stargzSocket: daemon.Socket, enableCri: true);
                var rig = new AuthRig { Registry = registry, Daemon = daemon, Containerd = ctd, MetricsPort = metricsPort, Work = work };

                var l1 = work.Sub("l1");
                TestImages.WriteBusybox(l1);
                var l2 = work.Sub("l2");
                Directory.CreateDirectory(Path.Combine(l2, "etc"));
                await File.WriteAllTextAsync(Path.Combine(l2, "etc", "motd"), Motd + "\n");
                Assert.Equal(rig.Image, await E2eHelpers.PushEstargzAsync(registry, ctd, work.Path, rig.Repository, [l1, l2]));
                rig.Layers = await DaemonMetrics.ManifestLayersAsync(registry.Host, rig.Repository, "esgz");

                // From now on the registry wants Basic credentials.
                var line = (await ProcessRunner.RunAsync(htpasswd, ["-Bbn", User, Password], TimeSpan.FromSeconds(30))).EnsureSuccess("htpasswd").StdOut.Trim();
                var file = Path.Combine(work.Path, "htpasswd");
                await File.WriteAllTextAsync(file, line + "\n");
                var port = registry.Port;
                await registry.DisposeAsync();
                registry = await LocalRegistry.StartAsync(authYaml: LocalRegistry.HtpasswdAuthYaml(file), storageDir: storage, port: port);
                rig.Registry = registry;

                if (kubeSecrets)
                {
                    // The cluster's image pull secret holds the registry's credentials; the daemon reads it through a
                    // kubeconfig with a client certificate, as a node's snapshotter config would name one.
                    var pki = await Pki.CreateAsync(work.Sub("pki"));
                    rig.KubeApi = kubeApi = await KubeApiServer.StartAsync(pki);
                    rig.KubeApi.ClientThumbprint = X509Certificate2.CreateFromPemFile(pki.ClientCert, pki.ClientKey).Thumbprint;
                    var auth = Convert.ToBase64String(Encoding.UTF8.GetBytes(User + ":" + Password));
                    rig.KubeApi.Put("team", "regcred", $$"""{"auths": {"{{registry.Host}}": {"auth": "{{auth}}"} } }""");
                    var kubeconfig = Path.Combine(work.Path, "kubeconfig");
                    await File.WriteAllTextAsync(kubeconfig, $"""
                        apiVersion: v1
                        kind: Config
                        current-context: node
                        contexts:
                        - name: node
                          context:
                            cluster: c
                            user: u
                        clusters:
                        - name: c
                          cluster:
                            server: {rig.KubeApi.Server}
                            certificate-authority: {pki.CaCert}
                        users:
                        - name: u
                          user:
                            client-certificate: {pki.ClientCert}
                            client-key: {pki.ClientKey}
                        """);
                    await File.WriteAllTextAsync(daemon.ConfigPath, LocalDaemon.WithErofsDefault(
                        baseToml + $"[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = \"{kubeconfig}\"\n"));
                    Assert.Equal(0, await daemon.StopAsync());
                    await daemon.RestartAsync(env: env);
                    Assert.True(await E2eHelpers.WaitLogLineAsync(daemon, "1 image pull secret(s) from") != null,
                        "the daemon did not list the image pull secret:\n" + daemon.Log);
                    // Restarted under the running containerd (seen in CI: the pull's Prepare refused by its backoff).
                    await E2eHelpers.WaitContainerdReachesDaemonAsync(ctd, daemon, "k8s.io");
                }
                if (keychain)
                {
                    await File.WriteAllTextAsync(daemon.ConfigPath, LocalDaemon.WithErofsDefault(
                        baseToml + $"[cri_keychain]\nenable_keychain = true\nimage_service_path = \"{ctd.Socket}\"\n"));
                    Assert.Equal(0, await daemon.StopAsync());
                    await daemon.RestartAsync(env: env);
                    // Logged just before "serving containerd snapshots API", but through the other output stream: wait for it.
                    Assert.True(await E2eHelpers.WaitLogLineAsync(daemon, "serving CRI ImageService on") != null,
                        "no CRI ImageService in the daemon log:\n" + daemon.Log);
                    await E2eHelpers.WaitContainerdReachesDaemonAsync(ctd, daemon, "k8s.io");
                }
                return rig;
            }
            catch
            {
                if (kubeApi != null) await kubeApi.DisposeAsync();
                if (ctd != null) await ctd.DisposeAsync();
                if (daemon != null) await daemon.DisposeAsync();
                await registry.DisposeAsync();
                work.Dispose();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            if (KubeApi != null) await KubeApi.DisposeAsync();
            await Containerd.DisposeAsync();
            await Daemon.DisposeAsync();
            await Registry.DisposeAsync();
            Work.Dispose();
        }
    }
}
