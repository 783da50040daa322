using Stargz.Daemon;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Daemon.Tests;

/// <summary>[registry] config_path: containerd's hosts.toml directories, as the daemon reads them.</summary>
public class RegistryConfigTests
{
    [Fact]
    public void ConfigPathListsHostsDirectoriesInOrderAndTheirHostsTomlAreRead()
    {
        using var dir = new TempDir("sgs-regcfg");
        var first = dir.Sub("first");
        var second = dir.Sub("second");
        Directory.CreateDirectory(Path.Combine(first, "r.example:5000"));
        File.WriteAllText(Path.Combine(first, "r.example:5000", "hosts.toml"), """
            server = "https://r.example:5000"
            [host."https://mirror.example:6000"]
              capabilities = ["pull", "resolve"]
              ca = "ca.pem"
              client = [["client.pem", "client.key"]]
              override_path = false
            [host."http://plain.example:7000"]
              capabilities = ["pull"]
              skip_verify = true
            """);
        var warnings = new List<string>();
        var c = ConfigLoader.Parse($"""
            [registry]
            config_path = "{first}:{second}:{Path.Combine(dir.Path, "absent")}"
            """, "c.toml", warnings);
        Assert.Equal([first, second, Path.Combine(dir.Path, "absent")], c.Registry.ConfigPaths);
        // A directory that does not exist is said, not fatal (containerd's own rule for config_path).
        Assert.Contains(warnings, w => w.Contains("absent does not exist", StringComparison.Ordinal));

        var hosts = new RegistryHostsConfig().LoadHostsDirectory(first);
        var eps = hosts.EndpointsFor("r.example:5000");
        Assert.Equal(["mirror.example:6000", "plain.example:7000", "r.example:5000"], eps.Select(e => e.Host));
        Assert.Equal(Path.Combine(first, "r.example:5000", "ca.pem"), Assert.Single(eps[0].CaFiles));
        Assert.Equal(Path.Combine(first, "r.example:5000", "client.pem"), eps[0].ClientCertFile);
        Assert.Equal(Path.Combine(first, "r.example:5000", "client.key"), eps[0].ClientKeyFile);
        Assert.True(eps[1].PlainHttp);
    }

    [Fact]
    public void ABrokenHostsTomlStopsTheStartNamingItsDirectory()
    {
        using var dir = new TempDir("sgs-regcfg-bad");
        var certs = dir.Sub("certs.d");
        Directory.CreateDirectory(Path.Combine(certs, "r.example"));
        File.WriteAllText(Path.Combine(certs, "r.example", "hosts.toml"), "server = [ not toml");
        var e = Assert.Throws<ConfigException>(() => ConfigLoader.Parse($"[registry]\nconfig_path = \"{certs}\"\n", "c.toml", []));
        Assert.Contains("registry.config_path", e.Message);
        Assert.Contains(certs, e.Message);
    }

    [Fact]
    public void ARelativeConfigPathIsRefused_DeprecatedMirrorsAreIgnoredWithAWarning()
    {
        var e = Assert.Throws<ConfigException>(() => ConfigLoader.Parse("[registry]\nconfig_path = \"certs.d\"\n", "c.toml", []));
        Assert.Contains("certs.d is not an absolute path", e.Message);
        var warnings = new List<string>();
        ConfigLoader.Parse("[registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m.example\"]\n", "c.toml", warnings);
        Assert.Contains(warnings, w => w.Contains("registry.mirrors is not supported", StringComparison.Ordinal));
    }
}
