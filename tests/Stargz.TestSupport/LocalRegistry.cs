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

    private static string Indent(string? s, int n)
    {
        if (string.IsNullOrEmpty(s)) return "";
        var pad = new string(' ', n);
        return string.Join("\n", s.Split('\n').Select(l => pad + l));
    }

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
