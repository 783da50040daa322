using System.Net.Security;
using System.Security.Cryptography.X509Certificates;

namespace Stargz.Registry;

/// <summary>One reachable registry endpoint with its own connection pool (one SocketsHttpHandler per config).</summary>
internal sealed class Endpoint : IDisposable
{
    public EndpointConfig Config { get; }
    public string Host => Config.Host;
    public string Scheme { get; }
    /// <summary>scheme://host/v2 (or the configured prefix), without trailing slash.</summary>
    public string BaseUrl { get; }
    public HttpClient Client { get; }
    public TimeSpan? RequestTimeout => Config.RequestTimeout;
    public AuthState Auth { get; } = new();

    private readonly X509Certificate2Collection _roots = [];
    private readonly X509Certificate2? _clientCert;

    public Endpoint(EndpointConfig config)
    {
        Config = config;
        Scheme = config.UsesPlainHttp ? "http" : "https";
        BaseUrl = $"{Scheme}://{config.Host}{config.PathPrefix ?? "/v2"}";
        foreach (var ca in config.CaFiles)
        {
            try { _roots.ImportFromPemFile(ca); }
            catch (Exception e) when (e is IOException or System.Security.Cryptography.CryptographicException)
            {
                throw new RegistryException($"cannot load CA file {ca} for {config.Host}: {e.Message}", host: config.Host, inner: e);
            }
        }
        if (config.ClientCertFile is { } certFile)
        {
            try
            {
                var certPem = File.ReadAllText(certFile);
                // Without a key file the key sits in the certificate's file.
                _clientCert = TlsTrust.ClientCertificate(certPem, config.ClientKeyFile is { } keyFile ? File.ReadAllText(keyFile) : certPem);
            }
            catch (Exception e) when (e is IOException or System.Security.Cryptography.CryptographicException or ArgumentException)
            {
                throw new RegistryException($"cannot load client certificate {certFile} for {config.Host}: {e.Message}", host: config.Host, inner: e);
            }
        }
        var ssl = new SslClientAuthenticationOptions { RemoteCertificateValidationCallback = Validate };
        if (_clientCert is not null) ssl.ClientCertificates = [_clientCert];
        var handler = new SocketsHttpHandler
        {
            // Redirects are handled by hand: blob reads keep the storage URL and drop the registry's Authorization.
            AllowAutoRedirect = false,
            AutomaticDecompression = System.Net.DecompressionMethods.None,
            ConnectTimeout = TimeSpan.FromSeconds(Math.Min(30, (config.RequestTimeout ?? TimeSpan.FromSeconds(30)).TotalSeconds)),
            PooledConnectionIdleTimeout = TimeSpan.FromSeconds(90),
            PooledConnectionLifetime = TimeSpan.FromMinutes(10),
            UseCookies = false,
            UseProxy = true,
            SslOptions = ssl,
        };
        Client = new HttpClient(handler, disposeHandler: true) { Timeout = Timeout.InfiniteTimeSpan };
        Client.DefaultRequestHeaders.UserAgent.ParseAdd("stargz-snapshotter-cs/0.1");
    }

    private bool Validate(object sender, X509Certificate? cert, X509Chain? chain, SslPolicyErrors errors)
    {
        if (errors == SslPolicyErrors.None) return true;
        if (Config.SkipVerify) return true;
        return TlsTrust.ChainsTo(cert, chain, errors, _roots);
    }

    public string Url(string repository, string kind, string reference) => $"{BaseUrl}/{repository}/{kind}/{reference}";

    public void Dispose()
    {
        Client.Dispose();
        _clientCert?.Dispose();
        foreach (var r in _roots) r.Dispose();
    }
}
