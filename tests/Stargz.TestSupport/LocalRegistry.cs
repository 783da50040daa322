using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace Stargz.TestSupport;

/// <summary>
/// A real docker-registry 2.8 (Debian package `docker-registry`) on 127.0.0.1 with its own storage dir.
/// Tests may pass extra YAML for auth/TLS. Dispose stops the process.
/// </summary>
public sealed class LocalRegistry : IAsyncDisposable
{
    private readonly Process _process;
    private readonly TempDir? _ownedDir;

    public int Port { get; }
    /// <summary>host:port, e.g. 127.0.0.1:41234.</summary>
    public string Host => $"127.0.0.1:{Port}";
    public string StorageDir { get; }
    public string ConfigPath { get; }
    public bool Tls { get; }
    /// <summary>http(s)://host:port — the registry's base URL (no /v2).</summary>
    public string BaseUrl => $"{(Tls ? "https" : "http")}://{Host}";

    private LocalRegistry(Process p, int port, string storage, string config, bool tls, TempDir? owned)
    {
        _process = p; Port = port; StorageDir = storage; ConfigPath = config; Tls = tls; _ownedDir = owned;
    }

    /// <summary>Returns a free TCP port on 127.0.0.1.</summary>
    public static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    /// <param name="extraHttpYaml">lines added under `http:` (e.g. a tls: block), indented by 2.</param>
    /// <param name="authYaml">a top-level `auth:` block, or null for none.</param>
    /// <param name="storageDir">reuse a storage dir (restart the same registry); default a new temp dir.</param>
    public static async Task<LocalRegistry> StartAsync(string? extraHttpYaml = null, string? authYaml = null,
        string? storageDir = null, int? port = null, bool tls = false)
    {
        var bin = Requires.Command("docker-registry");
        var dir = new TempDir("registry");
        var storage = storageDir ?? dir.Sub("storage");
        var p = port ?? FreePort();
        var cfg = Path.Combine(dir.Path, "config.yml");
        var yaml = $"""
            version: 0.1
            log:
              level: warn
              accesslog:
                disabled: true
            storage:
              filesystem:
                rootdirectory: {storage}
              delete:
                enabled: true
              maintenance:
                uploadpurging:
                  enabled: false
            http:
              addr: 127.0.0.1:{p}
            {Indent(extraHttpYaml, 2)}
            {authYaml ?? ""}
            """;
        await File.WriteAllTextAsync(cfg, yaml);
        var psi = new ProcessStartInfo(bin) { UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true };
        psi.ArgumentList.Add("serve");
        psi.ArgumentList.Add(cfg);
        var proc = Process.Start(psi) ?? throw new InvalidOperationException("cannot start docker-registry");
        proc.OutputDataReceived += (_, _) => { };
        proc.ErrorDataReceived += (_, _) => { };
        proc.BeginErrorReadLine();
        proc.BeginOutputReadLine();
        var reg = new LocalRegistry(proc, p, storage, cfg, tls, dir);
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (DateTime.UtcNow < deadline)
        {
            if (proc.HasExited) throw new InvalidOperationException($"docker-registry exited {proc.ExitCode}; config:\n{yaml}");
            try
            {
                using var c = new TcpClient();
                await c.ConnectAsync(IPAddress.Loopback, p);
                return reg;
            }
            catch (SocketException) { await Task.Delay(50); }
        }
        await reg.DisposeAsync();
        throw new TimeoutException("docker-registry did not listen within 20 s");
    }

    /// <summary>An `auth:` block for htpasswd Basic auth (file made with `htpasswd -Bbn`).</summary>
    public static string HtpasswdAuthYaml(string htpasswdFile) => $"""
        auth:
          htpasswd:
            realm: stargz-test
            path: {htpasswdFile}
        """;

    /// <summary>An `auth:` block for token (Bearer) auth; tokens are JWTs signed by a key whose cert is in <paramref name="rootCertBundle"/>.</summary>
    public static string TokenAuthYaml(string realm, string service, string issuer, string rootCertBundle) => $"""
        auth:
          token:
            realm: {realm}
            service: {service}
            issuer: {issuer}
            rootcertbundle: {rootCertBundle}
        """;

    /// <summary>Lines for `http:` that serve TLS with <paramref name="certFile"/>; with <paramref name="clientCaFile"/> client certs are required.</summary>
    public static string TlsYaml(string certFile, string keyFile, string? clientCaFile = null)
        => $"tls:\n  certificate: {certFile}\n  key: {keyFile}"
           + (clientCaFile is null ? "" : $"\n  clientcas:\n    - {clientCaFile}");

    /// <summary>Pushes a blob with one monolithic PUT upload (POST then PUT ?digest=). Returns its digest.</summary>
    public static async Task<string> PushBlobAsync(HttpClient http, string baseUrl, string repository, byte[] data,
        CancellationToken ct = default)
    {
        var digest = "sha256:" + Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(data));
        using var post = await http.PostAsync($"{baseUrl}/v2/{repository}/blobs/uploads/", null, ct);
        if (post.StatusCode != HttpStatusCode.Accepted)
            throw new InvalidOperationException($"upload start for {repository} answered {(int)post.StatusCode}");
        var loc = post.Headers.Location ?? throw new InvalidOperationException("upload start without Location");
        var abs = loc.IsAbsoluteUri ? loc : new Uri(new Uri(baseUrl), loc);
        var sep = abs.Query.Length > 0 ? "&" : "?";
        using var content = new ByteArrayContent(data);
        content.Headers.ContentType = new System.Net.Http.Headers.MediaTypeHeaderValue("application/octet-stream");
        using var put = await http.PutAsync($"{abs}{sep}digest={Uri.EscapeDataString(digest)}", content, ct);
        if (put.StatusCode != HttpStatusCode.Created)
            throw new InvalidOperationException($"blob PUT {digest} to {repository} answered {(int)put.StatusCode}: {await put.Content.ReadAsStringAsync(ct)}");
        return digest;
    }

    /// <summary>Pushes a manifest or index under <paramref name="reference"/> (tag or digest). Returns its digest.</summary>
    public static async Task<string> PushManifestAsync(HttpClient http, string baseUrl, string repository, string reference,
        byte[] json, string mediaType, CancellationToken ct = default)
    {
        using var content = new ByteArrayContent(json);
        content.Headers.ContentType = new System.Net.Http.Headers.MediaTypeHeaderValue(mediaType);
        using var put = await http.PutAsync($"{baseUrl}/v2/{repository}/manifests/{reference}", content, ct);
        if (put.StatusCode != HttpStatusCode.Created)
            throw new InvalidOperationException($"manifest PUT {repository}:{reference} answered {(int)put.StatusCode}: {await put.Content.ReadAsStringAsync(ct)}");
        return "sha256:" + Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(json));
    }

    /// <summary>Instance shortcut for <see cref="PushBlobAsync(HttpClient,string,string,byte[],CancellationToken)"/> on a plain-HTTP registry without auth.</summary>
    public async Task<string> PushBlobAsync(string repository, byte[] data, CancellationToken ct = default)
    {
        using var http = new HttpClient();
        return await PushBlobAsync(http, BaseUrl, repository, data, ct);
    }

    public async Task<string> PushManifestAsync(string repository, string reference, byte[] json, string mediaType, CancellationToken ct = default)
    {
        using var http = new HttpClient();
        return await PushManifestAsync(http, BaseUrl, repository, reference, json, mediaType, ct);
    }

    private static string Indent(string? s, int n)
    {
        if (string.IsNullOrEmpty(s)) return "";
        var pad = new string(' ', n);
        return string.Join("\n", s.Split('\n').Select(l => pad + l));
    }

    /// <summary>
    /// SIGSTOP: the registry keeps its listening socket, so the kernel still accepts connections, but nothing answers
    /// (a frozen or hung registry). <see cref="Thaw"/> lets it run again.
    /// </summary>
    public void Freeze() => Signal(19);

    /// <summary>SIGCONT after <see cref="Freeze"/>.</summary>
    public void Thaw() => Signal(18);

    private void Signal(int sig)
    {
        if (kill(_process.Id, sig) != 0)
            throw new InvalidOperationException($"kill({_process.Id}, {sig}) failed: errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill(entireProcessTree: true);
                await _process.WaitForExitAsync();
            }
        }
        catch (InvalidOperationException) { }
        _process.Dispose();
        _ownedDir?.Dispose();
    }
}
