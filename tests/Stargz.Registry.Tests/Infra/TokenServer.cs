using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Http;

namespace Stargz.Registry.Tests.Infra;

/// <summary>
/// A small Docker token server (the `auth.token` protocol docker-registry speaks): GET /token?service=&amp;scope=
/// answers a JWT (RS256, the signing cert in the x5c header) granting the asked actions, after checking Basic
/// credentials when some are configured. The registry trusts <see cref="RootCertFile"/>.
/// </summary>
public sealed class TokenServer : IAsyncDisposable
{
    public const string Service = "stargz-test-registry";
    public const string Issuer = "stargz-test-issuer";

    private readonly TestHttpServer _server;
    private RSA _key;
    private X509Certificate2 _cert;
    private readonly List<(RSA, X509Certificate2)> _retired = [];
    private int _requests;

    public string RootCertFile { get; }
    public string Realm => _server.BaseUrl + "/token";
    public int Requests => Volatile.Read(ref _requests);
    /// <summary>Seconds a token is valid (expires_in).</summary>
    public int ExpiresIn { get; set; } = 300;
    public (string User, string Password)? RequiredCredentials { get; set; }
    /// <summary>When set, POST /token with grant_type=refresh_token and this refresh_token is accepted (docker identity tokens).</summary>
    public string? RefreshToken { get; set; }
    public int RefreshGrants => Volatile.Read(ref _refreshGrants);
    private int _refreshGrants;
    /// <summary>Scopes seen in token requests, in order.</summary>
    public List<string> Scopes { get; } = [];

    private TokenServer(TestHttpServer server, RSA key, X509Certificate2 cert, string rootFile)
    {
        _server = server; _key = key; _cert = cert; RootCertFile = rootFile;
    }

    private static (RSA Key, X509Certificate2 Cert) NewSigner()
    {
        var key = RSA.Create(2048);
        var req = new CertificateRequest("CN=stargz test token signer", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        req.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        req.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature | X509KeyUsageFlags.KeyCertSign, true));
        return (key, req.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(1)));
    }

    /// <summary>
    /// Revokes every token issued so far: signs with a new key from now on and rewrites <see cref="RootCertFile"/> with
    /// only the new cert. A registry (re)started on that bundle answers 401 to the old tokens however long they had to run.
    /// </summary>
    public async Task RotateKeyAsync()
    {
        var (key, cert) = NewSigner();
        await File.WriteAllTextAsync(RootCertFile, cert.ExportCertificatePem());
        lock (Scopes)
        {
            // Retired signers are disposed with the server: a request may be signing with one right now.
            _retired.Add((_key, _cert));
            (_key, _cert) = (key, cert);
        }
    }

    public static async Task<TokenServer> StartAsync(string dir)
    {
        var (key, cert) = NewSigner();
        var rootFile = Path.Combine(dir, "token-root.pem");
        await File.WriteAllTextAsync(rootFile, cert.ExportCertificatePem());
        TokenServer? self = null;
        var server = await TestHttpServer.StartAsync(ctx => self!.HandleAsync(ctx));
        self = new TokenServer(server, key, cert, rootFile);
        return self;
    }

    private async Task HandleAsync(HttpContext ctx)
    {
        Interlocked.Increment(ref _requests);
        if (ctx.Request.Path != "/token") { ctx.Response.StatusCode = 404; return; }
        string scope, service;
        if (ctx.Request.Method == "POST")
        {
            var form = await ctx.Request.ReadFormAsync();
            if (RefreshToken is null || form["grant_type"] != "refresh_token" || form["refresh_token"] != RefreshToken)
            {
                ctx.Response.StatusCode = 401;
                return;
            }
            Interlocked.Increment(ref _refreshGrants);
            scope = form["scope"].ToString();
            service = form["service"].ToString();
        }
        else if (RequiredCredentials is { } need)
        {
            var auth = ctx.Request.Headers.Authorization.ToString();
            var want = "Basic " + Convert.ToBase64String(Encoding.UTF8.GetBytes(need.User + ":" + need.Password));
            if (auth != want) { ctx.Response.StatusCode = 401; return; }
            scope = string.Join(" ", ctx.Request.Query["scope"].Where(s => !string.IsNullOrEmpty(s)));
            service = ctx.Request.Query["service"].ToString();
        }
        else
        {
            scope = string.Join(" ", ctx.Request.Query["scope"].Where(s => !string.IsNullOrEmpty(s)));
            service = ctx.Request.Query["service"].ToString();
        }
        lock (Scopes) Scopes.Add(scope);
        var access = new List<object>();
        foreach (var s in scope.Split(' ', StringSplitOptions.RemoveEmptyEntries))
        {
            var p = s.Split(':');
            if (p.Length == 3) access.Add(new { type = p[0], name = p[1], actions = p[2].Split(',') });
        }
        var now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        RSA signKey;
        X509Certificate2 signCert;
        lock (Scopes) (signKey, signCert) = (_key, _cert);
        var header = new { alg = "RS256", typ = "JWT", x5c = new[] { Convert.ToBase64String(signCert.RawData) } };
        var claims = new
        {
            iss = Issuer, sub = RequiredCredentials?.User ?? "anonymous", aud = service, exp = now + ExpiresIn, nbf = now - 10, iat = now,
            jti = Guid.NewGuid().ToString("N"), access,
        };
        var signingInput = B64(JsonSerializer.SerializeToUtf8Bytes(header)) + "." + B64(JsonSerializer.SerializeToUtf8Bytes(claims));
        var sig = signKey.SignData(Encoding.ASCII.GetBytes(signingInput), HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        var jwt = signingInput + "." + B64(sig);
        ctx.Response.ContentType = "application/json";
        await ctx.Response.WriteAsync(JsonSerializer.Serialize(ctx.Request.Method == "POST"
            ? new { access_token = jwt, expires_in = ExpiresIn, issued_at = DateTimeOffset.UtcNow.ToString("O") } as object
            : new { token = jwt, expires_in = ExpiresIn, issued_at = DateTimeOffset.UtcNow.ToString("O") }));
    }

    private static string B64(byte[] b) => Convert.ToBase64String(b).TrimEnd('=').Replace('+', '-').Replace('/', '_');

    public async ValueTask DisposeAsync()
    {
        await _server.DisposeAsync();
        _key.Dispose();
        _cert.Dispose();
        foreach (var (k, c) in _retired) { k.Dispose(); c.Dispose(); }
    }
}
