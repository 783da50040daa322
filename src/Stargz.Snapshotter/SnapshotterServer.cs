using System.Net.Sockets;
using System.Runtime.InteropServices;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Stargz.Snapshotter;

public sealed class SnapshotterServerOptions
{
    /// <summary>Unix socket containerd's proxy plugin dials.</summary>
    public required string SocketPath { get; init; }

    /// <summary>Group allowed to use the socket (name or number): mode 0660 with that group; null = mode 0600.</summary>
    public string? SocketGroup { get; init; }
}

/// <summary>
/// Hosts <see cref="SnapshotsGrpcService"/> on Kestrel over a unix socket (HTTP/2 only, any :authority through
/// <see cref="AuthorityFilter"/>). The daemon and the tests use
/// the same host; the daemon adds its metrics endpoint and interceptors through the hooks.
/// </summary>
public static class SnapshotterServer
{
    public static WebApplication Build(StargzSnapshotter snapshotter, SnapshotterServerOptions opt,
        Action<WebApplicationBuilder>? configureBuilder = null, Action<WebApplication>? configureApp = null,
        Action<ILoggingBuilder>? configureLogging = null)
    {
        // The empty builder: no appsettings files and so no file watcher, which would otherwise put an inotify watch on
        // every directory below the working directory at start (seconds and thousands of fds from / under systemd).
        var builder = WebApplication.CreateEmptyBuilder(new WebApplicationOptions { Args = [] });
        builder.WebHost.UseKestrelCore();
        builder.Services.AddRoutingCore();
        builder.Logging.ClearProviders();
        configureLogging?.Invoke(builder.Logging);
        builder.Services.AddSingleton(snapshotter);
        builder.Services.AddGrpc(o =>
        {
            o.EnableDetailedErrors = true;
            o.MaxReceiveMessageSize = SnapshotsGrpcService.MaxRequestBytes;
        });
        builder.WebHost.ConfigureKestrel(k =>
        {
            // Any :authority a unix-socket client sends is served (a socket path, too): see AuthorityFilter.
            k.ListenUnixSocket(opt.SocketPath, lo =>
            {
                lo.Protocols = HttpProtocols.Http2;
                AuthorityFilter.Use(lo, k.Limits.Http2);
            });
            k.Limits.MaxConcurrentConnections = null;
            k.Limits.Http2.MaxStreamsPerConnection = 1000;
        });
        builder.WebHost.UseShutdownTimeout(TimeSpan.FromSeconds(30));
        configureBuilder?.Invoke(builder);
        var app = builder.Build();
        MalformedRequests.Logger = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger<SnapshotsGrpcService>();
        app.MapGrpcService<SnapshotsGrpcService>();
        configureApp?.Invoke(app);
        return app;
    }

    /// <summary>Removes a stale socket (refusing if something still answers on it), starts, sets the socket's mode/group.</summary>
    public static async Task StartAsync(WebApplication app, SnapshotterServerOptions opt, CancellationToken ct)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(opt.SocketPath))!;
        if (!Directory.Exists(dir))
        {
            Directory.CreateDirectory(dir);
            File.SetUnixFileMode(dir, (UnixFileMode)0b111_001_001);
        }
        await RemoveStaleSocketAsync(opt.SocketPath, ct);
        int? gid = opt.SocketGroup == null ? null : ResolveGroup(opt.SocketGroup);
        var old = umask(0b000_111_111);
        try { await app.StartAsync(ct); }
        finally { umask(old); }
        if (gid is int g && chown(opt.SocketPath, -1, g) != 0)
            throw new IOException($"chown socket {opt.SocketPath} to group {opt.SocketGroup}: errno {Marshal.GetLastPInvokeError()}");
        File.SetUnixFileMode(opt.SocketPath, gid == null ? (UnixFileMode)0b110_000_000 : (UnixFileMode)0b110_110_000);
    }

    public static async Task RemoveStaleSocketAsync(string path, CancellationToken ct)
    {
        if (!File.Exists(path) && !Directory.Exists(path)) return;
        if (Directory.Exists(path)) throw new IOException($"socket path {path} is a directory");
        using (var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            try
            {
                await s.ConnectAsync(new UnixDomainSocketEndPoint(path), ct);
                throw new IOException($"another process is serving on {path}; refusing to replace its socket");
            }
            catch (SocketException) { }
        }
        File.Delete(path);
    }

    private static int ResolveGroup(string group)
    {
        if (int.TryParse(group, out var n)) return n;
        foreach (var line in File.ReadLines("/etc/group"))
        {
            var f = line.Split(':');
            if (f.Length >= 3 && f[0] == group && int.TryParse(f[2], out var gid)) return gid;
        }
        throw new ArgumentException($"socket group {group} does not exist in /etc/group");
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int chown(string path, int owner, int group);

    [DllImport("libc")]
    private static extern int umask(int mask);
}
