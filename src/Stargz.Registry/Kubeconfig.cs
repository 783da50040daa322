using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using YamlDotNet.RepresentationModel;

namespace Stargz.Registry;

/// <summary>
/// How to reach a Kubernetes API server, as kubectl finds it: an explicit kubeconfig file, else <c>$KUBECONFIG</c> (the
/// first listed file that exists), else <c>~/.kube/config</c>, else the pod's service account (in-cluster). Of a
/// kubeconfig it reads the current context's cluster (<c>server</c>, <c>certificate-authority[-data]</c>,
/// <c>insecure-skip-tls-verify</c>) and user (<c>token</c>, <c>tokenFile</c>, <c>client-certificate[-data]</c> +
/// <c>client-key[-data]</c>, <c>username</c>/<c>password</c>). Exec and auth-provider plugins are not supported.
/// </summary>
public sealed class KubeClientConfig
{
    public const string InClusterTokenPath = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    public const string InClusterCaPath = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

    /// <summary>Where this came from (a kubeconfig path or "in-cluster"), for logs and errors.</summary>
    public required string Source { get; init; }
    public required Uri Server { get; init; }
    public X509Certificate2Collection? CertificateAuthority { get; init; }
    public bool InsecureSkipTlsVerify { get; init; }
    public X509Certificate2? ClientCertificate { get; init; }
    public string? Token { get; init; }
    /// <summary>Re-read at every connection: service-account tokens are rotated on disk.</summary>
    public string? TokenFile { get; init; }
    public string? Username { get; init; }
    public string? Password { get; init; }

    /// <summary>Resolves the config as described above; throws <see cref="FormatException"/> naming the file and key
    /// when a kubeconfig is malformed, <see cref="FileNotFoundException"/> when there is none at all.</summary>
    public static KubeClientConfig Load(string? explicitPath = null)
    {
        if (!string.IsNullOrEmpty(explicitPath)) return FromFile(explicitPath);
        var env = Environment.GetEnvironmentVariable("KUBECONFIG");
        if (!string.IsNullOrEmpty(env))
            foreach (var p in env.Split(':', StringSplitOptions.RemoveEmptyEntries))
                if (File.Exists(p)) return FromFile(p);
        var home = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".kube", "config");
        if (File.Exists(home)) return FromFile(home);
        return InCluster() ?? throw new FileNotFoundException(
            "no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a pod (KUBERNETES_SERVICE_HOST unset)");
    }

    /// <summary>The pod's service account, or null outside a pod.</summary>
    public static KubeClientConfig? InCluster()
    {
        string? host = Environment.GetEnvironmentVariable("KUBERNETES_SERVICE_HOST"), port = Environment.GetEnvironmentVariable("KUBERNETES_SERVICE_PORT");
        if (string.IsNullOrEmpty(host) || string.IsNullOrEmpty(port) || !File.Exists(InClusterTokenPath)) return null;
        if (host.Contains(':') && !host.StartsWith('[')) host = "[" + host + "]";
        return new KubeClientConfig
        {
            Source = "in-cluster",
            Server = new Uri($"https://{host}:{port}"),
            CertificateAuthority = File.Exists(InClusterCaPath) ? Pem(File.ReadAllText(InClusterCaPath), InClusterCaPath) : null,
            TokenFile = InClusterTokenPath,
        };
    }

    public static KubeClientConfig FromFile(string path)
    {
        string text;
        try { text = File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new FileNotFoundException($"kubeconfig {path}: {e.Message}", path, e); }
        return Parse(text, path);
    }

    /// <summary>Parses kubeconfig YAML; relative file names in it are relative to <paramref name="path"/>'s folder.</summary>
    public static KubeClientConfig Parse(string yaml, string path)
    {
        var stream = new YamlStream();
        try { stream.Load(new StringReader(yaml)); }
        catch (YamlDotNet.Core.YamlException e) { throw new FormatException($"kubeconfig {path}: not valid YAML: {e.Message}", e); }
        if (stream.Documents.Count == 0 || stream.Documents[0].RootNode is not YamlMappingNode root)
            throw new FormatException($"kubeconfig {path}: not a YAML mapping");
        var dir = Path.GetDirectoryName(Path.GetFullPath(path)) ?? "/";

        var contextName = Scalar(root, "current-context")
            ?? throw new FormatException($"kubeconfig {path}: no current-context");
        var context = Named(root, "contexts", contextName, "context", path);
        var clusterName = Scalar(context, "cluster") ?? throw new FormatException($"kubeconfig {path}: context \"{contextName}\" names no cluster");
        var cluster = Named(root, "clusters", clusterName, "cluster", path);
        var userName = Scalar(context, "user");
        var user = userName is null ? null : Named(root, "users", userName, "user", path);

        var serverText = Scalar(cluster, "server") ?? throw new FormatException($"kubeconfig {path}: cluster \"{clusterName}\" has no server");
        if (!Uri.TryCreate(serverText, UriKind.Absolute, out var server) || (server.Scheme != "https" && server.Scheme != "http"))
            throw new FormatException($"kubeconfig {path}: cluster \"{clusterName}\" server \"{serverText}\" is not an http(s) URL");
        if (user is not null && (user.Children.ContainsKey("exec") || user.Children.ContainsKey("auth-provider")))
            throw new FormatException($"kubeconfig {path}: user \"{userName}\" uses an exec or auth-provider plugin, which is not supported");

        X509Certificate2? clientCert = null;
        var certPem = PemOf(user, "client-certificate", dir, path);
        var keyPem = PemOf(user, "client-key", dir, path);
        if ((certPem is null) != (keyPem is null))
            throw new FormatException($"kubeconfig {path}: user \"{userName}\" has a client certificate without its key or a key without its certificate");
        if (certPem is not null)
        {
            try { clientCert = TlsTrust.ClientCertificate(certPem, keyPem!); }
            catch (System.Security.Cryptography.CryptographicException e)
            {
                throw new FormatException($"kubeconfig {path}: user \"{userName}\" client certificate/key: {e.Message}", e);
            }
        }
        var caPem = PemOf(cluster, "certificate-authority", dir, path);
        var tokenFile = Scalar(user, "tokenFile");
        return new KubeClientConfig
        {
            Source = path,
            Server = server,
            CertificateAuthority = caPem is null ? null : Pem(caPem, path),
            InsecureSkipTlsVerify = Scalar(cluster, "insecure-skip-tls-verify") is "true",
            ClientCertificate = clientCert,
            Token = Scalar(user, "token"),
            TokenFile = tokenFile is null ? null : Path.Combine(dir, tokenFile),
            Username = Scalar(user, "username"),
            Password = Scalar(user, "password"),
        };
    }

    /// <summary>An HTTP handler that trusts the config's CA (or nothing, when told to skip verification) and presents
    /// its client certificate.</summary>
    public SocketsHttpHandler CreateHandler()
    {
        var ssl = new SslClientAuthenticationOptions();
        if (ClientCertificate is not null) ssl.ClientCertificates = [ClientCertificate];
        if (InsecureSkipTlsVerify) ssl.RemoteCertificateValidationCallback = static (_, _, _, _) => true;
        else if (CertificateAuthority is { Count: > 0 } ca)
            // As kubectl: a kubeconfig's CA replaces the system roots rather than adding to them.
            ssl.RemoteCertificateValidationCallback = (_, cert, chain, errors) => TlsTrust.ChainsTo(cert, chain, errors, ca);
        return new SocketsHttpHandler { SslOptions = ssl, ConnectTimeout = TimeSpan.FromSeconds(10) };
    }

    /// <summary>The Authorization header value, or null: a bearer token (read from TokenFile now) or basic auth.</summary>
    public string? Authorization()
    {
        var token = TokenFile is not null && File.Exists(TokenFile) ? File.ReadAllText(TokenFile).Trim() : Token;
        if (!string.IsNullOrEmpty(token)) return "Bearer " + token;
        if (!string.IsNullOrEmpty(Username))
            return "Basic " + Convert.ToBase64String(System.Text.Encoding.UTF8.GetBytes(Username + ":" + Password));
        return null;
    }

    private static X509Certificate2Collection Pem(string pem, string source)
    {
        var c = new X509Certificate2Collection();
        try { c.ImportFromPem(pem); }
        catch (System.Security.Cryptography.CryptographicException e) { throw new FormatException($"kubeconfig {source}: certificate authority: {e.Message}", e); }
        if (c.Count == 0) throw new FormatException($"kubeconfig {source}: certificate authority holds no PEM certificate");
        return c;
    }

    /// <summary>PEM text from <c>KEY-data</c> (base64) or the file <c>KEY</c> names; null when neither is set.</summary>
    private static string? PemOf(YamlMappingNode? node, string key, string dir, string path)
    {
        if (Scalar(node, key + "-data") is { } data)
        {
            try { return System.Text.Encoding.UTF8.GetString(Convert.FromBase64String(data)); }
            catch (FormatException) { throw new FormatException($"kubeconfig {path}: {key}-data is not base64"); }
        }
        if (Scalar(node, key) is not { } file) return null;
        var full = Path.Combine(dir, file);
        try { return File.ReadAllText(full); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new FormatException($"kubeconfig {path}: {key} {full}: {e.Message}", e); }
    }

    /// <summary>The <paramref name="inner"/> mapping of the entry named <paramref name="name"/> in list <paramref name="list"/>.</summary>
    private static YamlMappingNode Named(YamlMappingNode root, string list, string name, string inner, string path)
    {
        if (root.Children.TryGetValue(new YamlScalarNode(list), out var l) && l is YamlSequenceNode seq)
            foreach (var item in seq)
                if (item is YamlMappingNode m && Scalar(m, "name") == name)
                    return m.Children.TryGetValue(new YamlScalarNode(inner), out var v) && v is YamlMappingNode vm ? vm
                        : throw new FormatException($"kubeconfig {path}: {list} entry \"{name}\" has no {inner} mapping");
        throw new FormatException($"kubeconfig {path}: no {list} entry named \"{name}\"");
    }

    private static string? Scalar(YamlMappingNode? node, string key)
        => node is not null && node.Children.TryGetValue(new YamlScalarNode(key), out var v) && v is YamlScalarNode s
           && !string.IsNullOrEmpty(s.Value) ? s.Value : null;
}
