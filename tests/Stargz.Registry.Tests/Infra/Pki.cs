using Stargz.TestSupport;

namespace Stargz.Registry.Tests.Infra;

/// <summary>A throwaway CA, a server cert for 127.0.0.1 and a client cert, made with the real openssl.</summary>
public sealed record Pki(string CaCert, string ServerCert, string ServerKey, string ClientCert, string ClientKey)
{
    public static async Task<Pki> CreateAsync(string dir)
    {
        var openssl = Requires.Command("openssl");
        string P(string n) => Path.Combine(dir, n);
        async Task Run(params string[] a) => (await ProcessRunner.RunAsync(openssl, a, TimeSpan.FromSeconds(60))).EnsureSuccess("openssl " + a[0]);
        await Run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", P("ca.key"), "-out", P("ca.pem"), "-days", "2",
            "-subj", "/CN=stargz test CA");
        await File.WriteAllTextAsync(P("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
        await Run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", P("server.key"), "-out", P("server.csr"), "-subj", "/CN=127.0.0.1");
        await Run("x509", "-req", "-in", P("server.csr"), "-CA", P("ca.pem"), "-CAkey", P("ca.key"), "-CAcreateserial",
            "-out", P("server.pem"), "-days", "2", "-extfile", P("server.ext"));
        await File.WriteAllTextAsync(P("client.ext"), "extendedKeyUsage=clientAuth\n");
        await Run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", P("client.key"), "-out", P("client.csr"), "-subj", "/CN=stargz test client");
        await Run("x509", "-req", "-in", P("client.csr"), "-CA", P("ca.pem"), "-CAkey", P("ca.key"), "-CAcreateserial",
            "-out", P("client.pem"), "-days", "2", "-extfile", P("client.ext"));
        return new Pki(P("ca.pem"), P("server.pem"), P("server.key"), P("client.pem"), P("client.key"));
    }
}
