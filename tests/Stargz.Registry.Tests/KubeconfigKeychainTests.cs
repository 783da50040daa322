using System.Security.Cryptography.X509Certificates;
using System.Text;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>
/// [kubeconfig_keychain]: kubeconfig parsing, and image pull secrets listed and watched from a Kubernetes API
/// stand-in (<see cref="KubeApiServer"/>) whose credentials open a real docker-registry with htpasswd Basic auth.
/// </summary>
public class KubeconfigKeychainTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static string Kubeconfig(string server, string clusterExtra, string userExtra) => $"""
        apiVersion: v1
        kind: Config
        current-context: node
        contexts:
        - name: other
          context:
            cluster: nowhere
            user: nobody
        - name: node
          context:
            cluster: c1
            user: u1
        clusters:
        - name: c1
          cluster:
            server: {server}
        {clusterExtra}
        users:
        - name: u1
          user:
        {userExtra}
        """;

    private static string DockerConfig(string host, string user, string password)
        => $$"""{"auths": {"{{host}}": {"auth": "{{Convert.ToBase64String(Encoding.UTF8.GetBytes(user + ":" + password))}}"} } }""";

    private static async Task<PreparedRegistry> StartBasicAsync(TempDir dir, string user, string password)
    {
        var htpasswd = Requires.Command("htpasswd");
        var line = (await ProcessRunner.RunAsync(htpasswd, ["-Bbn", user, password], TimeSpan.FromSeconds(30))).EnsureSuccess("htpasswd").StdOut.Trim();
        var file = Path.Combine(dir.Path, "htpasswd");
        await File.WriteAllTextAsync(file, line + "\n", Ct);
        return await PreparedRegistry.StartAsync(dir, authYaml: LocalRegistry.HtpasswdAuthYaml(file));
    }

    private static async Task Until(Func<bool> condition, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException("timed out waiting for " + what);
            await Task.Delay(20, Ct);
        }
    }

    [Fact]
    public void Kubeconfig_current_context_picks_cluster_and_user_and_files_are_relative_to_it()
    {
        using var dir = new TempDir("kubecfg");
        File.WriteAllText(Path.Combine(dir.Path, "token"), "from-file\n");
        var path = Path.Combine(dir.Path, "config");
        var cfg = KubeClientConfig.Parse(Kubeconfig("https://10.0.0.1:6443", "    insecure-skip-tls-verify: true", "    tokenFile: token"), path);
        Assert.Equal(new Uri("https://10.0.0.1:6443"), cfg.Server);
        Assert.True(cfg.InsecureSkipTlsVerify);
        Assert.Equal(Path.Combine(dir.Path, "token"), cfg.TokenFile);
        Assert.Equal("Bearer from-file", cfg.Authorization());

        var basic = KubeClientConfig.Parse(Kubeconfig("http://127.0.0.1:8080", "", "    username: admin\n    password: pw"), path);
        Assert.Equal("Basic " + Convert.ToBase64String(Encoding.UTF8.GetBytes("admin:pw")), basic.Authorization());
        Assert.Null(basic.CertificateAuthority);
    }

    [Theory]
    [InlineData("current-context: node\n", "no contexts entry named \"node\"")]
    [InlineData("current-context: [", "not valid YAML")]
    [InlineData("- a\n", "not a YAML mapping")]
    [InlineData("exec", "exec or auth-provider plugin")]
    [InlineData("cert-only", "client certificate without its key")]
    [InlineData("bad-server", "is not an http(s) URL")]
    [InlineData("bad-ca", "certificate-authority-data is not base64")]
    public void Kubeconfig_mistakes_are_named(string variant, string expected)
    {
        var yaml = variant switch
        {
            "exec" => Kubeconfig("https://a:1", "", "    exec:\n      command: aws"),
            "cert-only" => Kubeconfig("https://a:1", "", "    client-certificate-data: " + Convert.ToBase64String("x"u8.ToArray())),
            "bad-server" => Kubeconfig("ftp://a:1", "", "    token: t"),
            "bad-ca" => Kubeconfig("https://a:1", "    certificate-authority-data: '%%%'", "    token: t"),
            _ => variant,
        };
        var e = Assert.Throws<FormatException>(() => KubeClientConfig.Parse(yaml, "/etc/kube/config"));
        Assert.Contains("/etc/kube/config", e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public async Task Pull_secrets_listed_and_watched_over_mutual_tls_open_a_real_registry()
    {
        using var dir = new TempDir("kube-keychain");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var api = await KubeApiServer.StartAsync(pki);
        api.ClientThumbprint = X509Certificate2.CreateFromPemFile(pki.ClientCert, pki.ClientKey).Thumbprint;
        await using var p = await StartBasicAsync(dir, "puller", "s3cret");
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");

        // A broken secret sorts first and is skipped; the good one in another namespace serves.
        api.PutRaw("a-team", "broken", "%%% not base64");
        api.Put("b-team", "regcred", DockerConfig(p.Registry.Host, "puller", "s3cret"));
        var kubeconfig = Path.Combine(dir.Path, "kubeconfig");
        await File.WriteAllTextAsync(kubeconfig, Kubeconfig(api.Server, $"    certificate-authority: {pki.CaCert}",
            $"    client-certificate: {pki.ClientCert}\n    client-key: {pki.ClientKey}"), Ct);
        var log = new CredentialHelperTests.LogLines();
        await using var keychain = new KubeconfigKeychain(kubeconfig, log).Start();
        await keychain.Synced.WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.Equal(1, keychain.SecretCount);
        Assert.Contains("secret a-team/broken is not a usable docker config", log.ToString());

        using (var client = new RegistryClient(null, keychain))
        {
            var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[0], Ct);
            var buf = new BlobRange(0, new byte[256]);
            await blob.ReadRangesAsync([buf], Ct);
            Assert.Equal(p.Image.Layers[0].AsSpan(0, 256).ToArray(), buf.Destination.ToArray());
        }

        // Deleted in the cluster: gone from the keychain through the watch, and the registry refuses us.
        api.Delete("b-team", "regcred");
        await Until(() => keychain.SecretCount == 0, "the deletion to arrive");
        using (var client = new RegistryClient(null, keychain))
            await Assert.ThrowsAsync<UnauthorizedException>(() => client.OpenBlobAsync(reference, p.Image.LayerDigests[0], Ct));

        // Added again (a new password in the registry's view is not needed: same secret content).
        api.Put("b-team", "regcred", DockerConfig(p.Registry.Host, "puller", "s3cret"));
        await Until(() => keychain.SecretCount == 1, "the addition to arrive");
        using (var client = new RegistryClient(null, keychain))
            Assert.Equal(p.Image.LayerDigests[0], (await client.OpenBlobAsync(reference, p.Image.LayerDigests[0], Ct)).Digest);
        Assert.Equal(1, api.Lists); // everything after the first list came through the watch
        Assert.Equal(1, keychain.Lists);
    }

    [Fact]
    public async Task A_refused_token_is_retried_from_its_file_and_an_expired_watch_lists_again()
    {
        using var dir = new TempDir("kube-keychain-token");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var api = await KubeApiServer.StartAsync(pki);
        api.Token = "good";
        api.Put("default", "one", DockerConfig("one.example:5000", "u1", "p1"));
        var tokenFile = Path.Combine(dir.Path, "token");
        await File.WriteAllTextAsync(tokenFile, "bad", Ct);
        var kubeconfig = Path.Combine(dir.Path, "kubeconfig");
        await File.WriteAllTextAsync(kubeconfig, Kubeconfig(api.Server, "    insecure-skip-tls-verify: true", "    tokenFile: token"), Ct);
        var log = new CredentialHelperTests.LogLines();
        await using var keychain = new KubeconfigKeychain(kubeconfig, log, maxBackoff: TimeSpan.FromMilliseconds(200)).Start();

        await Until(() => api.Unauthorized >= 2, "the refused token to be retried");
        Assert.False(keychain.Synced.IsCompleted);
        Assert.Null(await keychain.GetAsync("one.example:5000", Ct));
        Assert.Contains($"from {api.Server}", log.ToString());
        Assert.Contains("401", log.ToString());

        // The token file is read again at every attempt (service-account tokens are rotated on disk).
        await File.WriteAllTextAsync(tokenFile, "good", Ct);
        await keychain.Synced.WaitAsync(TimeSpan.FromSeconds(20), Ct);
        Assert.Equal(new RegistryCredential("u1", "p1"), await keychain.GetAsync("one.example:5000", Ct));
        await Until(() => api.Watches >= 1, "the watch to start");

        // The server forgets old resource versions: the keychain lists again and sees what was added meanwhile.
        api.ExpireWatches();
        api.Put("default", "two", DockerConfig("two.example", "u2", "p2"));
        await Until(() => keychain.Lists >= 2 && keychain.SecretCount == 2, "the second list");
        Assert.Equal(new RegistryCredential("u2", "p2"), await keychain.GetAsync("two.example", Ct));
        Assert.Null(await keychain.GetAsync("three.example", Ct));
    }

    [Fact]
    public async Task A_kubeconfig_installed_later_is_waited_for()
    {
        using var dir = new TempDir("kube-keychain-wait");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var api = await KubeApiServer.StartAsync(pki);
        api.Token = "t";
        api.Put("kube-system", "hub", DockerConfig("https://index.docker.io/v1/", "hubuser", "hubpw"));
        var kubeconfig = Path.Combine(dir.Path, "later", "kubeconfig");
        await using var keychain = new KubeconfigKeychain(kubeconfig, waitForConfig: TimeSpan.FromMilliseconds(50)).Start();
        await Task.Delay(300, Ct);
        Assert.Equal(0, api.Lists + api.Unauthorized);

        Directory.CreateDirectory(Path.GetDirectoryName(kubeconfig)!);
        await File.WriteAllTextAsync(kubeconfig, Kubeconfig(api.Server, $"    certificate-authority-data: {Convert.ToBase64String(File.ReadAllBytes(pki.CaCert))}",
            "    token: t"), Ct);
        await keychain.Synced.WaitAsync(TimeSpan.FromSeconds(20), Ct);
        // Docker Hub's secret is filed under docker's index URL and found for the registry host.
        Assert.Equal(new RegistryCredential("hubuser", "hubpw"), await keychain.GetAsync(ImageReference.DockerHubApiHost, Ct));
    }

    [Fact]
    public async Task A_server_that_ends_every_watch_at_once_is_not_asked_in_a_tight_loop()
    {
        using var dir = new TempDir("kube-keychain-quick");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var api = await KubeApiServer.StartAsync(pki);
        api.Token = "t";
        api.EndWatchesAtOnce = true;
        var kubeconfig = Path.Combine(dir.Path, "kubeconfig");
        await File.WriteAllTextAsync(kubeconfig, Kubeconfig(api.Server, "    insecure-skip-tls-verify: true", "    token: t"), Ct);
        await using var keychain = new KubeconfigKeychain(kubeconfig, maxBackoff: TimeSpan.FromMilliseconds(200)).Start();
        await keychain.Synced.WaitAsync(TimeSpan.FromSeconds(20), Ct);

        // Reopened after a pause (here at most 200 ms): a few watches in two seconds, not one per round trip.
        await Task.Delay(TimeSpan.FromSeconds(2), Ct);
        var watches = api.Watches;
        Assert.InRange(watches, 2, 15);

        // Once the server holds watches again, changes arrive through them without a new list.
        api.EndWatchesAtOnce = false;
        var lists = keychain.Lists;
        api.Put("default", "late", DockerConfig("late.example", "u", "p"));
        await Until(() => keychain.SecretCount == 1, "the secret added after the misbehaving watches");
        Assert.Equal(new RegistryCredential("u", "p"), await keychain.GetAsync("late.example", Ct));
        Assert.Equal(lists, keychain.Lists);
    }
}
