using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>A real docker-registry serving TLS with certificates from a throwaway openssl CA.</summary>
public class TlsTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static RegistryHostsConfig Config(string host, EndpointConfig origin)
    {
        var cfg = SharedRegistry.FastRetries();
        cfg.Blob = cfg.Blob with { MaxRetries = 1 };
        cfg.Set(host, new HostConfig { Origin = origin });
        return cfg;
    }

    [Fact]
    public async Task Self_signed_ca_is_trusted_only_when_configured()
    {
        var dir = new TempDir("reg-tls");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var p = await PreparedRegistry.StartAsync(dir, LocalRegistry.TlsYaml(pki.ServerCert, pki.ServerKey), tls: true);
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");

        using (var client = new RegistryClient(Config(p.Registry.Host, new EndpointConfig { Host = p.Registry.Host, PlainHttp = false, CaFiles = [pki.CaCert] })))
        {
            var m = await client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct);
            Assert.Equal(p.Image.AmdManifest, m.Digest);
            var blob = await client.OpenBlobAsync(reference, p.Image.LayerDigests[0], Ct);
            var ranges = new[] { new BlobRange(1, new byte[500]), new BlobRange(1_000_000, new byte[500]) };
            await blob.ReadRangesAsync(ranges, Ct);
            foreach (var r in ranges) Assert.Equal(p.Image.Layers[0].AsSpan((int)r.Offset, 500).ToArray(), r.Destination.ToArray());
        }

        // Without the CA the server's certificate is refused.
        using (var client = new RegistryClient(Config(p.Registry.Host, new EndpointConfig { Host = p.Registry.Host, PlainHttp = false })))
        {
            var e = await Assert.ThrowsAsync<RegistryException>(() => client.ResolveAsync(reference, Platform.Parse("linux/amd64"), Ct));
            Assert.Contains(p.Registry.Host, e.Message);
        }

        // skip_verify accepts it.
        using (var client = new RegistryClient(Config(p.Registry.Host, new EndpointConfig { Host = p.Registry.Host, PlainHttp = false, SkipVerify = true })))
            Assert.Equal(p.Image.IndexDigest, (await client.HeadManifestAsync(reference, Ct)).Digest);
    }

    [Fact]
    public async Task Client_certificate_is_presented_when_the_registry_requires_one()
    {
        var dir = new TempDir("reg-mtls");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var p = await PreparedRegistry.StartAsync(dir, LocalRegistry.TlsYaml(pki.ServerCert, pki.ServerKey, pki.CaCert), tls: true);
        var reference = ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}");

        using (var client = new RegistryClient(Config(p.Registry.Host, new EndpointConfig
               {
                   Host = p.Registry.Host, PlainHttp = false, CaFiles = [pki.CaCert], ClientCertFile = pki.ClientCert, ClientKeyFile = pki.ClientKey,
               })))
        {
            var data = await client.FetchBlobBytesAsync(reference, p.Image.LayerDigests[1], ct: Ct);
            Assert.Equal(p.Image.Layers[1], data);
        }

        using (var client = new RegistryClient(Config(p.Registry.Host, new EndpointConfig { Host = p.Registry.Host, PlainHttp = false, CaFiles = [pki.CaCert] })))
        {
            var e = await Assert.ThrowsAsync<RegistryException>(() => client.OpenBlobAsync(reference, p.Image.LayerDigests[1], Ct));
            Assert.Contains(p.Registry.Host, e.Message);
        }
    }

    [Fact]
    public async Task Hosts_toml_with_ca_and_client_cert_reaches_the_tls_registry()
    {
        var dir = new TempDir("reg-hoststoml");
        var pki = await Pki.CreateAsync(dir.Path);
        await using var p = await PreparedRegistry.StartAsync(dir, LocalRegistry.TlsYaml(pki.ServerCert, pki.ServerKey, pki.CaCert), tls: true);
        var certsD = dir.Sub("certs.d");
        var hostDir = Path.Combine(certsD, p.Registry.Host);
        Directory.CreateDirectory(hostDir);
        await File.WriteAllTextAsync(Path.Combine(hostDir, "hosts.toml"), $"""
            server = "https://{p.Registry.Host}"
            ca = "{pki.CaCert}"
            client = [["{pki.ClientCert}", "{pki.ClientKey}"]]
            """, Ct);
        using var client = new RegistryClient(SharedRegistry.FastRetries(new RegistryHostsConfig().LoadHostsDirectory(certsD)));
        var m = await client.ResolveAsync(ImageReference.Parse($"{p.Registry.Host}/{p.Image.Repository}:{p.Image.Tag}"), Platform.Parse("linux/arm64"), Ct);
        Assert.Equal(p.Image.ArmManifest, m.Digest);
    }
}
