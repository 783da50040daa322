using System.Text.Json;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>
/// The daemon's [registry] config_path: an image whose registry name resolves nowhere is served lazily through the
/// mirror its hosts.toml names, a docker-registry on TLS with a private CA that demands a client certificate.
/// </summary>
public class HostsTomlMirrorTests
{
    private const string Origin = "stargz-origin.invalid";

    [Fact]
    public async Task ARegistryReachedOnlyThroughAHostsTomlMirrorWithAPrivateCaAndAClientCertServesLazily()
    {
        using var work = new TempDir("hoststoml-mirror");
        var pki = await Pki.CreateAsync(work.Sub("pki"));
        var tlsPort = LocalRegistry.FreePort();
        var certsD = work.Sub("certs.d");
        var hostDir = Path.Combine(certsD, Origin);
        Directory.CreateDirectory(hostDir);
        // The origin's name does not resolve: everything must go through the mirror, with the CA and the client cert.
        await File.WriteAllTextAsync(Path.Combine(hostDir, "hosts.toml"), $"""
            server = "https://{Origin}"
            [host."https://127.0.0.1:{tlsPort}"]
              capabilities = ["pull", "resolve"]
              ca = "{pki.CaCert}"
              client = [["{pki.ClientCert}", "{pki.ClientKey}"]]
            """, TestContext.Current.CancellationToken);

        await using var rig = await OutageRig.StartAsync(fetchingTimeoutSec: 30, extraToml: $"[registry]\nconfig_path = \"{certsD}\"");
        var img = await rig.PushImageAsync("mirror/app", new Dictionary<string, int> { ["a.bin"] = 256, ["b.bin"] = 512 }, seed: 4);
        // The same storage served on TLS with client certificates required (http.tls.clientcas); the plain one is stopped.
        await rig.StopRegistryAsync();
        await using var tls = await LocalRegistry.StartAsync(LocalRegistry.TlsYaml(pki.ServerCert, pki.ServerKey, pki.CaCert),
            storageDir: rig.RegistryStorage, port: tlsPort, tls: true);
        var image = img.Estargz.Replace(rig.RegistryHost, Origin, StringComparison.Ordinal);

        var pull = (await StargzCli.RunAsync(["image", "rpull", "--address", rig.Containerd.Socket, "--namespace", rig.Containerd.Namespace,
            "--hosts-dir", certsD, image])).EnsureSuccess("stargz image rpull through the hosts.toml mirror");
        Assert.Contains("(2 remote, 0 applied, 0 existing layers)", pull.StdOut);
        Assert.Equal(2, rig.FuseMountIds().Count);
        Assert.Equal(img.Sha256["a.bin"], await rig.Sha256InContainerAsync(image, "mirror-read", "a.bin"));

        // Lazily: the daemon fetched what was read, far from the whole of b.bin, and says so for the origin's name.
        var status = (await StargzCli.RunAsync(["status", "--address", rig.Daemon.Socket, "--json"])).EnsureSuccess("stargz status");
        using var doc = JsonDocument.Parse(status.StdOut);
        long fetched = 0, size = 0;
        foreach (var l in doc.RootElement.GetProperty("layers").EnumerateArray())
        {
            Assert.Equal(image, l.GetProperty("imageReference").GetString());
            Assert.Equal("serving", l.GetProperty("state").GetString());
            fetched += l.GetProperty("fetchedBytes").GetInt64();
            size += l.GetProperty("size").GetInt64();
        }
        Assert.True(fetched >= 256 * 1024 && fetched < size, $"fetched {fetched} of {size} bytes");
        Assert.Empty(doc.RootElement.GetProperty("fallbacks").EnumerateArray());
        Assert.Contains("registry hosts from " + certsD, rig.Daemon.Log);
    }
}
