using System.Net;
using System.Text;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>htpasswd Basic and token (Bearer) auth against a real docker-registry.</summary>
public class AuthTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static async Task<PreparedRegistry> StartBasicAsync(string user, string password)
    {
        var htpasswd = Requires.Command("htpasswd");
        var dir = new TempDir("reg-basic");
        var line = (await ProcessRunner.RunAsync(htpasswd, ["-Bbn", user, password], TimeSpan.FromSeconds(30))).EnsureSuccess("htpasswd").StdOut.Trim();
        var file = Path.Combine(dir.Path, "htpasswd");
        await File.WriteAllTextAsync(file, line + "\n", Ct);
        return await PreparedRegistry.StartAsync(dir, authYaml: LocalRegistry.HtpasswdAuthYaml(file));
    }

    [Fact]
    public async Task Basic_auth_with_htpasswd()
    {
        await using var p = await StartBasicAsync("alice", "correct horse");
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");

        using (var anon = new RegistryClient())
        {
            var e = await Assert.ThrowsAsync<UnauthorizedException>(() => anon.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct));
            Assert.Contains(p.Registry.Host, e.Message);
            Assert.Contains("no credentials", e.Message);
        }
        using (var wrong = new RegistryClient(null, new StaticCredentialProvider().Add(p.Registry.Host, "alice", "wrong")))
        {
            var e = await Assert.ThrowsAsync<UnauthorizedException>(() => wrong.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct));
            Assert.Equal(HttpStatusCode.Unauthorized, e.StatusCode);
            Assert.DoesNotContain("wrong", e.Message);
        }
        using var client = new RegistryClient(null, new StaticCredentialProvider().Add(p.Registry.Host, "alice", "correct horse"));
        var m = await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);
        var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[1], Ct);
        var buf = new byte[5000];
        await blob.ReadAtAsync(100, buf, Ct);
        Assert.Equal(p.Image.Layers[1].AsSpan(100, 5000).ToArray(), buf);
        // Once the scheme is known, credentials go up front: one request per read, no 401 round trip.
        var before = blob.RequestCount;
        await blob.ReadAtAsync(200, buf, Ct);
        Assert.Equal(before + 1, blob.RequestCount);
    }

    [Fact]
    public async Task Docker_config_json_credentials()
    {
        await using var p = await StartBasicAsync("carol", "pa55:word");
        var cfgFile = Path.Combine(p.Dir.Path, "config.json");
        var auth = Convert.ToBase64String(Encoding.UTF8.GetBytes("carol:pa55:word"));
        await File.WriteAllTextAsync(cfgFile, $$"""{"auths": {"{{p.Registry.Host}}": {"auth": "{{auth}}"} } }""", Ct);
        using var client = new RegistryClient(null, new DockerConfigCredentialProvider(cfgFile));
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");
        var m = await client.ResolveAsync(reference, Platform.Parse("linux/arm64"), Ct);
        Assert.Equal(p.Image.ArmManifest, m.Digest);
        var data = await client.FetchBlobBytesAsync(reference, p.Image.LayerDigests[1], ct: Ct);
        Assert.Equal(p.Image.Layers[1], data);
    }

    [Fact]
    public async Task A_credential_helper_named_in_the_docker_config_supplies_the_credentials_and_runs_once_for_many_requests()
    {
        await using var p = await StartBasicAsync("dave", "from the helper");
        var bin = p.Dir.Sub("bin");
        var seen = Path.Combine(p.Dir.Path, "asked.txt");
        // A real program speaking the helper protocol: server address on stdin, JSON on stdout.
        CredentialHelperScript.Write(bin, "stargztest", $$"""
            read server
            echo "$server" >> '{{seen}}'
            printf '{"ServerURL":"%s","Username":"dave","Secret":"from the helper"}' "$server"
            """);
        var cfgFile = Path.Combine(p.Dir.Path, "config.json");
        await File.WriteAllTextAsync(cfgFile, $$"""{"credHelpers": {"{{p.Registry.Host}}": "stargztest"}, "auths": {"{{p.Registry.Host}}": {} } }""", Ct);
        var helpers = new CredentialHelpers(searchPath: bin);
        using var client = new RegistryClient(null, new DockerConfigCredentialProvider(cfgFile, helpers: helpers));
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");
        var m = await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);
        var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[1], Ct);
        var buf = new byte[4096];
        for (var i = 0; i < 5; i++) await blob.ReadAtAsync(i * 1000, buf, Ct);
        Assert.Equal(p.Image.Layers[1].AsSpan(4000, 4096).ToArray(), buf);
        // Basic auth looks the credentials up for every request; the helper's answer is reused.
        Assert.Equal(1, helpers.Runs);
        Assert.Equal($"{p.Registry.Host}\n", await File.ReadAllTextAsync(seen, Ct));
    }

    [Fact]
    public async Task Many_first_requests_at_once_on_a_fresh_client_ask_the_token_server_once()
    {
        var dir = new TempDir("reg-token-burst");
        await using var tokens = await TokenServer.StartAsync(dir.Path);
        await using var p = await PreparedRegistry.StartAsync(dir,
            authYaml: LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile));
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");
        for (var round = 0; round < 5; round++)
        {
            // Every request meets the 401 challenge, then all of them want the same scope's token at the same moment.
            using var client = new RegistryClient();
            var before = tokens.Requests;
            using var start = new ManualResetEventSlim();
            var resolves = Enumerable.Range(0, 16).Select(_ => Task.Run(async () =>
            {
                start.Wait(Ct);
                return await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
            }, Ct)).ToList();
            start.Set();
            foreach (var m in await Task.WhenAll(resolves)) Assert.Equal(p.Image.AmdManifest, m.Digest);
            Assert.Equal(1, tokens.Requests - before);
        }
    }

    [Fact]
    public async Task Bearer_tokens_from_token_server_cached_per_scope()
    {
        var dir = new TempDir("reg-token");
        await using var tokens = await TokenServer.StartAsync(dir.Path);
        tokens.RequiredCredentials = ("bob", "hunter2");
        await using var p = await PreparedRegistry.StartAsync(dir,
            authYaml: LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile));
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");

        using (var wrong = new RegistryClient(null, new StaticCredentialProvider().Add(p.Registry.Host, "bob", "nope")))
        {
            var e = await Assert.ThrowsAsync<UnauthorizedException>(() => wrong.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct));
            Assert.Contains(p.Registry.Host, e.Message);
        }

        using var client = new RegistryClient(null, new StaticCredentialProvider().Add(p.Registry.Host, "bob", "hunter2"));
        var before = tokens.Requests;
        var m = await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);
        var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[0], Ct);
        var reads = new List<Task>();
        for (var i = 0; i < 8; i++)
        {
            var off = i * 1000;
            reads.Add(Task.Run(async () =>
            {
                var b = new byte[1000];
                await blob.ReadAtAsync(off, b, Ct);
                Assert.Equal(p.Image.Layers[0].AsSpan(off, 1000).ToArray(), b);
            }, Ct));
        }
        await Task.WhenAll(reads);
        // One token for the repository's pull scope, reused by every request.
        Assert.Equal(1, tokens.Requests - before);
        Assert.Contains($"repository:{p.Image.Repository}:pull", tokens.Scopes);
    }

    [Fact]
    public async Task Identity_token_from_docker_config_is_exchanged_with_a_refresh_grant()
    {
        var dir = new TempDir("reg-token-idt");
        await using var tokens = await TokenServer.StartAsync(dir.Path);
        tokens.RequiredCredentials = ("nobody-uses-basic", "x");
        tokens.RefreshToken = "long-lived-refresh-token";
        await using var p = await PreparedRegistry.StartAsync(dir,
            authYaml: LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile));
        var cfgFile = Path.Combine(dir.Path, "config.json");
        await File.WriteAllTextAsync(cfgFile, $$"""{"auths": {"https://{{p.Registry.Host}}/v2/": {"identitytoken": "long-lived-refresh-token"} } }""", Ct);
        using var client = new RegistryClient(null, new DockerConfigCredentialProvider(cfgFile));
        var m = await client.ResolveAsync(ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}"), Platform.Parse("linux/amd64"), Ct);
        Assert.Equal(p.Image.AmdManifest, m.Digest);
        Assert.Equal(1, tokens.RefreshGrants);
    }

    [Fact]
    public async Task Expired_bearer_token_is_fetched_again()
    {
        var dir = new TempDir("reg-token-exp");
        await using var tokens = await TokenServer.StartAsync(dir.Path);
        tokens.ExpiresIn = 2;
        await using var p = await PreparedRegistry.StartAsync(dir,
            authYaml: LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile));
        using var client = new RegistryClient();
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}");
        var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[1], Ct);
        var b = new byte[10];
        await blob.ReadAtAsync(0, b, Ct);
        var afterFirst = tokens.Requests;
        await Task.Delay(2500, Ct);
        await blob.ReadAtAsync(10, b, Ct);
        Assert.Equal(p.Image.Layers[1].AsSpan(10, 10).ToArray(), b);
        Assert.Equal(afterFirst + 1, tokens.Requests);
    }
}
