using System.Net;
using System.Text;
using System.Text.Json;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>
/// Credentials captured from CRI PullImage (<see cref="CriKeychain"/>), used by the client for that image only, ahead
/// of the docker config, against a real docker-registry with htpasswd Basic auth and with token auth.
/// </summary>
public class CriKeychainTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static async Task<PreparedRegistry> StartBasicAsync(string user, string password)
    {
        var htpasswd = Requires.Command("htpasswd");
        var dir = new TempDir("reg-cri");
        var line = (await ProcessRunner.RunAsync(htpasswd, ["-Bbn", user, password], TimeSpan.FromSeconds(30))).EnsureSuccess("htpasswd").StdOut.Trim();
        var file = Path.Combine(dir.Path, "htpasswd");
        await File.WriteAllTextAsync(file, line + "\n", Ct);
        return await PreparedRegistry.StartAsync(dir, authYaml: LocalRegistry.HtpasswdAuthYaml(file));
    }

    [Fact]
    public async Task Pull_credentials_serve_that_image_first_and_go_away_on_forget()
    {
        await using var p = await StartBasicAsync("kube", "s3cret");
        var image = $"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}";
        var reference = ImageReference.Parse(image);
        var keychain = new CriKeychain();
        // The docker config has wrong credentials for the host: the keychain must be asked first.
        var cfg = Path.Combine(p.Dir.Path, "config.json");
        var wrong = Convert.ToBase64String(Encoding.UTF8.GetBytes("kube:wrong"));
        await File.WriteAllTextAsync(cfg, $$"""{"auths": {"{{p.Registry.Host}}": {"auth": "{{wrong}}"} } }""", Ct);
        using var client = new RegistryClient(null, new ChainedCredentialProvider(keychain, new DockerConfigCredentialProvider(cfg)));

        var e = await Assert.ThrowsAsync<UnauthorizedException>(() => client.OpenBlobAsync(reference, p.Image.LayerDigests[1], Ct));
        Assert.Equal(HttpStatusCode.Unauthorized, e.StatusCode);

        // kubelet's AuthConfig.auth form (base64 user:password).
        keychain.Remember(image, CriKeychain.FromAuthConfig(null, null, Convert.ToBase64String(Encoding.UTF8.GetBytes("kube:s3cret")), null, null));
        var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[1], Ct);
        var buf = new byte[4000];
        await blob.ReadAtAsync(10, buf, Ct);
        Assert.Equal(p.Image.Layers[1].AsSpan(10, 4000).ToArray(), buf);

        // The same repository under another tag or by digest (a layer label may name it so) uses them too.
        var byDigest = reference.WithDigest(p.Image.AmdManifest);
        var m = await client.ResolveAsync(byDigest, Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);

        // Another repository on the same registry did not come with these credentials: the docker config's (wrong) apply.
        var other = ImageReference.Parse($"{p.Registry.Host}/other/app:v1");
        await Assert.ThrowsAsync<UnauthorizedException>(() => client.ResolveAsync(other, Platform.Parse("linux/amd64"), Ct));

        // RemoveImage forgets them: Basic credentials are looked up per request, so the next read is refused.
        Assert.True(keychain.Forget(reference.Host + "/" + reference.Repository + ":" + reference.Tag));
        await Assert.ThrowsAsync<UnauthorizedException>(() => blob.ReadAtAsync(0, buf, Ct).AsTask());
    }

    [Fact]
    public async Task Server_address_limits_where_the_credentials_go()
    {
        await using var p = await StartBasicAsync("kube", "s3cret");
        var image = $"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}";
        var keychain = new CriKeychain();
        using var client = new RegistryClient(null, keychain);
        var cred = CriKeychain.FromAuthConfig("kube", "s3cret", null, null, null);

        keychain.Remember(image, cred, serverAddress: "https://registry.example.com/v1/");
        await Assert.ThrowsAsync<UnauthorizedException>(() => client.ResolveAsync(ImageReference.Parse(image), Platform.Parse("linux/amd64"), Ct));

        keychain.Remember(image, cred, serverAddress: $"http://{p.Registry.Host}/v2/");
        var m = await client.ResolveAsync(ImageReference.Parse(image), Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);

        // A later pull of the image without credentials drops them (the latest pull says how the image is reached).
        keychain.Remember(image, null);
        Assert.Equal(0, keychain.Count);
    }

    [Fact]
    public async Task Registry_token_is_sent_as_the_bearer_token_without_asking_the_token_server()
    {
        var dir = new TempDir("reg-cri-token");
        await using var tokens = await TokenServer.StartAsync(dir.Path);
        tokens.RequiredCredentials = ("robot", "pw");
        await using var p = await PreparedRegistry.StartAsync(dir,
            authYaml: LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile));
        var image = $"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}";

        // kubelet got this token elsewhere (a credential provider plugin); here: from the token server by hand.
        using var http = new HttpClient();
        using var tokReq = new HttpRequestMessage(HttpMethod.Get,
            $"{tokens.Realm}?service={TokenServer.Service}&scope={Uri.EscapeDataString($"repository:{p.Image.Repository}:pull")}");
        tokReq.Headers.Authorization = new System.Net.Http.Headers.AuthenticationHeaderValue("Basic", Convert.ToBase64String(Encoding.UTF8.GetBytes("robot:pw")));
        using var tokResp = await http.SendAsync(tokReq, Ct);
        tokResp.EnsureSuccessStatusCode();
        using var doc = JsonDocument.Parse(await tokResp.Content.ReadAsStringAsync(Ct));
        var token = doc.RootElement.GetProperty("token").GetString()!;
        var before = tokens.Requests;

        var keychain = new CriKeychain();
        keychain.Remember(image, CriKeychain.FromAuthConfig(null, null, null, null, token));
        using var client = new RegistryClient(null, keychain);
        var reference = ImageReference.Parse(image);
        var m = await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);
        var data = await client.FetchBlobBytesAsync(reference, p.Image.LayerDigests[1], ct: Ct);
        Assert.Equal(p.Image.Layers[1], data);
        Assert.Equal(before, tokens.Requests);

        // With username/password instead, the token server is asked (once) with them.
        var keychain2 = new CriKeychain();
        keychain2.Remember(image, CriKeychain.FromAuthConfig("robot", "pw", null, null, null));
        using var client2 = new RegistryClient(null, keychain2);
        Assert.Equal(p.Image.AmdManifest, (await client2.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct)).Digest);
        Assert.Equal(before + 1, tokens.Requests);
    }

    [Fact]
    public async Task Auth_config_mapping_and_reference_normalisation()
    {
        Assert.Null(CriKeychain.FromAuthConfig("", "", "", "", ""));
        var c = CriKeychain.FromAuthConfig(null, null, Convert.ToBase64String(Encoding.UTF8.GetBytes("u:p:with:colons\0\0")), null, null)!;
        Assert.Equal(("u", "p:with:colons"), (c.Username, c.Secret));
        var idt = CriKeychain.FromAuthConfig(null, null, null, "refresh", null)!;
        Assert.Equal("refresh", idt.IdentityToken);
        Assert.False(idt.HasBasic);
        var bad = Assert.Throws<FormatException>(() => CriKeychain.FromAuthConfig(null, null, "not base64 at all!", null, null));
        Assert.DoesNotContain("not base64 at all", bad.Message);
        Assert.DoesNotContain("secret-value", CriKeychain.FromAuthConfig("u", "secret-value", null, null, "tok-value")!.ToString());
        Assert.DoesNotContain("tok-value", CriKeychain.FromAuthConfig("u", "secret-value", null, null, "tok-value")!.ToString());

        // "busybox" and docker.io/library/busybox:latest are one key; Docker Hub's three host names are one registry.
        var k = new CriKeychain();
        k.Remember("busybox", new RegistryCredential("u", "p"));
        var hub = ImageReference.Parse("docker.io/library/busybox:latest");
        Assert.NotNull(await k.GetAsync(ImageReference.DockerHubApiHost, hub, Ct));
        Assert.NotNull(await k.GetAsync("docker.io", hub, Ct));
        Assert.Null(await k.GetAsync("mirror.example.com", hub, Ct));
        Assert.Null(await k.GetAsync(ImageReference.DockerHubApiHost, null, Ct));
        Assert.Null(await k.GetAsync(ImageReference.DockerHubApiHost, Ct));
        Assert.True(k.Forget("docker.io/library/busybox"));
        Assert.Null(await k.GetAsync(ImageReference.DockerHubApiHost, hub, Ct));
        Assert.Throws<InvalidReferenceException>(() => k.Remember("UPPER/case", new RegistryCredential("u", "p")));
    }

    /// <summary>With a store (persist_credentials): a keychain started again from the file (a daemon restart) still reads
    /// the private blob; the file is 0600 and goes when the last image's credentials are forgotten.</summary>
    [Fact]
    public async Task Persisted_credentials_read_the_blob_after_a_restart_and_leave_with_the_image()
    {
        await using var p = await StartBasicAsync("kube", "s3cret");
        var image = $"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}";
        var reference = ImageReference.Parse(image);
        var store = Path.Combine(p.Dir.Path, "root", "cri-keychain.json");
        Directory.CreateDirectory(Path.GetDirectoryName(store)!);
        var log = new ListLogger();

        var first = new CriKeychain(store, log);
        first.Remember(image, CriKeychain.FromAuthConfig("kube", "s3cret", null, null, null), $"http://{p.Registry.Host}");
        Assert.True(File.Exists(store));
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(store));
        Assert.False(File.Exists(store + ".tmp"));

        // "Restart": a new keychain from the file alone.
        var second = new CriKeychain(store, log);
        Assert.Equal([reference.ToString()], second.Images());
        using (var client = new RegistryClient(null, second))
        {
            var data = await client.FetchBlobBytesAsync(reference, p.Image.LayerDigests[1], ct: Ct);
            Assert.Equal(p.Image.Layers[1], data);
        }
        // The start-up sweep keeps an image that still has remote snapshots.
        Assert.Equal(0, second.Retain([image]));

        // Removed (by its tag and digest names, as RemoveImage by ID does): nothing left, not even an empty file.
        Assert.Equal(1, second.Forget(["sha256:" + new string('a', 64), image, reference.WithDigest(p.Image.AmdManifest).ToString()]));
        Assert.False(File.Exists(store));
        Assert.Empty(new CriKeychain(store, log).Images());
        using (var client = new RegistryClient(null, new CriKeychain(store, log)))
            await Assert.ThrowsAsync<UnauthorizedException>(() => client.FetchBlobBytesAsync(reference, p.Image.LayerDigests[1], ct: Ct));
        Assert.DoesNotContain("s3cret", log.Text);
    }

    [Fact]
    public async Task Store_keeps_tokens_fixes_loose_modes_survives_garbage_and_the_sweep_drops_removed_images()
    {
        using var dir = new TempDir("cri-store");
        var store = Path.Combine(dir.Path, "cri-keychain.json");
        var log = new ListLogger();
        var k = new CriKeychain(store, log);
        k.Remember("r.example.com/a/app:v1", CriKeychain.FromAuthConfig(null, null, null, "refresh-secret", null));
        k.Remember("r.example.com/b/app:v1", CriKeychain.FromAuthConfig(null, null, null, null, "bearer-secret"));
        k.Remember("r.example.com/c/app:v1", CriKeychain.FromAuthConfig("u", "basic-secret", null, null, null));

        File.SetUnixFileMode(store, (UnixFileMode)0b110_100_100); // 0644, as a careless copy would leave it
        var again = new CriKeychain(store, log);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(store));
        var a = ImageReference.Parse("r.example.com/a/app:v1");
        Assert.Equal("refresh-secret", (await again.GetAsync("r.example.com", a, Ct))!.IdentityToken);
        Assert.Equal("bearer-secret", (await again.GetAsync("r.example.com", ImageReference.Parse("r.example.com/b/app:v1"), Ct))!.RegistryToken);
        Assert.Equal("basic-secret", (await again.GetAsync("r.example.com", ImageReference.Parse("r.example.com/c/app:v1"), Ct))!.Secret);

        // Only /a has remote snapshots left at start: /b and /c leave memory and the file.
        Assert.Equal(2, again.Retain(["r.example.com/a/app:v1"]));
        Assert.Equal(["r.example.com/a/app:v1"], new CriKeychain(store, log).Images());

        // A damaged file: a warning that names the file and quotes none of it; the keychain starts empty and works.
        await File.WriteAllTextAsync(store, "{\"version\": 1, \"images\": [ {\"image\": \"x\", \"secret\": \"garbage-secret", Ct);
        var broken = new CriKeychain(store, log);
        Assert.Empty(broken.Images());
        Assert.Contains(store, log.Text);
        broken.Remember("r.example.com/d/app:v1", new RegistryCredential("u", "p"));
        Assert.Equal(["r.example.com/d/app:v1"], new CriKeychain(store, log).Images());

        // Memory only (persistence off): the daemon deletes a file left from before.
        Assert.True(CriKeychain.DeleteStore(store));
        Assert.False(File.Exists(store));
        foreach (var secret in new[] { "refresh-secret", "bearer-secret", "basic-secret", "garbage-secret" })
            Assert.DoesNotContain(secret, log.Text);
    }

    private sealed class ListLogger : Microsoft.Extensions.Logging.ILogger
    {
        private readonly System.Text.StringBuilder _text = new();
        public string Text { get { lock (_text) return _text.ToString(); } }
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;
        public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state,
            Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (_text) _text.AppendLine(formatter(state, exception));
        }
    }
}
