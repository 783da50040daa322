using System.Net.Security;
using System.Security.Cryptography.X509Certificates;

namespace Stargz.Registry;

/// <summary>TLS pieces shared by registry endpoints and the Kubernetes API client: private CAs and client certificates.</summary>
internal static class TlsTrust
{
    /// <summary>
    /// True when <paramref name="cert"/> chains to one of <paramref name="roots"/> (through the intermediates the server
    /// sent) and its name matched; system trust plays no part here, callers decide whether it also counts.
    /// </summary>
    public static bool ChainsTo(X509Certificate? cert, X509Chain? chain, SslPolicyErrors errors, X509Certificate2Collection roots)
    {
        if (cert is null || roots.Count == 0) return false;
        if ((errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0) return false;
        using var c = new X509Chain();
        c.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        c.ChainPolicy.CustomTrustStore.AddRange(roots);
        c.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        if (chain is not null)
            foreach (var el in chain.ChainElements) c.ChainPolicy.ExtraStore.Add(el.Certificate);
        return c.Build(cert as X509Certificate2 ?? X509CertificateLoader.LoadCertificate(cert.GetRawCertData()));
    }

    /// <summary>A client certificate with its private key from PEM text (<paramref name="keyPem"/> may be the same text).</summary>
    public static X509Certificate2 ClientCertificate(string certPem, string keyPem)
    {
        using var pem = X509Certificate2.CreateFromPem(certPem, keyPem);
        // Re-import as PKCS#12 so the private key is usable by SslStream on every platform.
        return X509CertificateLoader.LoadPkcs12(pem.Export(X509ContentType.Pkcs12), null);
    }
}
