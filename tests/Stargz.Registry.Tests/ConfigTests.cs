using System.Text;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

public class ConfigTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public void Daemon_toml_resolver_hosts_and_blob_options()
    {
        var cfg = RegistryHostsConfig.FromDaemonToml("""
            noprefetch = false
            [blob]
            fetching_timeout_sec = 42
            max_retries = 2
            min_wait_msec = 5
            max_wait_msec = 700
            force_single_range_mode = true
            [resolver.host."docker.io".mirrors]
            [[resolver.host."docker.io".mirrors]]
            host = "mirror.example.com:5000"
            insecure = true
            request_timeout_sec = 3
            [[resolver.host."docker.io".mirrors]]
            host = "second.example.com"
            """.Replace("[resolver.host.\"docker.io\".mirrors]\n", ""));
        Assert.Equal(TimeSpan.FromSeconds(42), cfg.Blob.FetchingTimeout);
        Assert.Equal(2, cfg.Blob.MaxRetries);
        Assert.Equal(TimeSpan.FromMilliseconds(5), cfg.Blob.MinWait);
        Assert.Equal(TimeSpan.FromMilliseconds(700), cfg.Blob.MaxWait);
        Assert.True(cfg.Blob.ForceSingleRangeMode);
        var eps = cfg.EndpointsFor("docker.io");
        Assert.Equal(["mirror.example.com:5000", "second.example.com", "registry-1.docker.io"], eps.Select(e => e.Host).ToArray());
        Assert.True(eps[0].UsesPlainHttp);
        Assert.Equal(TimeSpan.FromSeconds(3), eps[0].RequestTimeout);
        Assert.False(eps[1].UsesPlainHttp);
        Assert.False(eps[2].UsesPlainHttp);
        // Unconfigured hosts: just the origin; loopback defaults to plain HTTP like the reference.
        var local = cfg.EndpointsFor("127.0.0.1:5000");
        Assert.Single(local);
        Assert.True(local[0].UsesPlainHttp);
    }

    [Fact]
    public void Containerd_hosts_toml_directory()
    {
        using var dir = new TempDir("hoststoml");
        var hostDir = dir.Sub("registry.example.com:5000");
        File.WriteAllText(Path.Combine(hostDir, "hosts.toml"), """
            server = "https://registry.example.com:5000"
            ca = "origin-ca.pem"

            [host."http://127.0.0.1:6000"]
              capabilities = ["pull", "resolve"]

            [host."https://push-only.example.com"]
              capabilities = ["push"]

            [host."https://mirror.example.com/custom/v2"]
              capabilities = ["pull"]
              ca = ["/etc/ca1.pem", "ca2.pem"]
              client = [["/etc/c.pem", "/etc/c.key"]]
              skip_verify = true
              override_path = true
            """);
        var cfg = new RegistryHostsConfig().LoadHostsDirectory(dir.Path);
        var eps = cfg.EndpointsFor("registry.example.com:5000");
        Assert.Equal(["127.0.0.1:6000", "mirror.example.com", "registry.example.com:5000"], eps.Select(e => e.Host).ToArray());
        Assert.True(eps[0].UsesPlainHttp);
        Assert.False(eps[1].UsesPlainHttp);
        Assert.True(eps[1].SkipVerify);
        Assert.Equal("/custom/v2", eps[1].PathPrefix);
        Assert.Equal(["/etc/ca1.pem", Path.Combine(hostDir, "ca2.pem")], eps[1].CaFiles.ToArray());
        Assert.Equal("/etc/c.pem", eps[1].ClientCertFile);
        Assert.Equal("/etc/c.key", eps[1].ClientKeyFile);
        Assert.Equal([Path.Combine(hostDir, "origin-ca.pem")], eps[2].CaFiles.ToArray());
    }

    [Fact]
    public async Task Docker_config_json_auths_auth_and_identitytoken()
    {
        using var dir = new TempDir("dockercfg");
        var file = Path.Combine(dir.Path, "config.json");
        var b64 = Convert.ToBase64String(Encoding.UTF8.GetBytes("alice:s3cr:et"));
        await File.WriteAllTextAsync(file, $$"""
            {"auths": {
              "127.0.0.1:5000": {"auth": "{{b64}}"},
              "https://index.docker.io/v1/": {"username": "bob", "password": "pw"},
              "https://ghcr.io/v2/": {"identitytoken": "refresh-me"}
            } }
            """, Ct);
        var p = new DockerConfigCredentialProvider(file, TimeSpan.Zero);
        var c = await p.GetAsync("127.0.0.1:5000", Ct);
        Assert.Equal("alice", c!.Username);
        Assert.Equal("s3cr:et", c.Secret);
        Assert.DoesNotContain("s3cr", c.ToString());
        Assert.Equal("bob", (await p.GetAsync("registry-1.docker.io", Ct))!.Username);
        Assert.Equal("refresh-me", (await p.GetAsync("ghcr.io", Ct))!.IdentityToken);
        Assert.Null(await p.GetAsync("other.example.com", Ct));

        // The file is re-read when it changes.
        await File.WriteAllTextAsync(file, """{"auths": {"other.example.com": {"username": "u", "password": "p"}}}""", Ct);
        File.SetLastWriteTimeUtc(file, DateTime.UtcNow.AddSeconds(5));
        Assert.Equal("u", (await p.GetAsync("other.example.com", Ct))!.Username);
        Assert.Null(await p.GetAsync("127.0.0.1:5000", Ct));

        await File.WriteAllTextAsync(file, """{"auths": {"h": {"auth": "!!notbase64"}}}""", Ct);
        File.SetLastWriteTimeUtc(file, DateTime.UtcNow.AddSeconds(10));
        var e = await Assert.ThrowsAsync<FormatException>(async () => await p.GetAsync("h", Ct));
        Assert.Contains("not base64", e.Message);
    }

    [Fact]
    public void Www_authenticate_challenge_parsing()
    {
        var c = AuthChallenge.Parse("Bearer", "realm=\"https://auth.example.com/token\",service=\"registry.example.com\",scope=\"repository:a/b:pull,push\"");
        Assert.True(c.IsBearer);
        Assert.Equal("https://auth.example.com/token", c.Realm);
        Assert.Equal("registry.example.com", c.Service);
        Assert.Equal("repository:a/b:pull,push", c.Parameters["scope"]);
    }
}
