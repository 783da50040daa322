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

    /// <summary>The socket, once <see cref="SnapshotterServer.Listen"/> bound it (the daemon does so first thing).</summary>
    public ListeningSocket? Listening { get; set; }
}

/// <summary>
/// The snapshotter's unix socket, bound and listening before the host is built, as systemd's socket activation would
/// hand it over: a client that dials during start-up connects at once and its calls wait in the backlog until the host
/// serves them (grpc-go would otherwise back off a second after a refused dial). Kestrel serves a duplicate of the fd;
/// disposing closes ours and removes the socket file if it is still this socket's.
/// </summary>
public sealed class ListeningSocket : IDisposable
{
    private readonly Socket _socket;
    private readonly (ulong Dev, ulong Ino)? _file;

    internal ListeningSocket(Socket socket, string path)
    {
        _socket = socket;
        Path = path;
        _file = Native.Lstat(path) is { } st ? (st.Dev, st.Ino) : null;
    }

    public string Path { get; }

    /// <summary>A duplicate of the listening fd, for Kestrel's <c>ListenHandle</c> (which owns and closes what it gets).</summary>
    internal ulong DuplicateHandle()
    {
        var fd = Native.DuplicateFd((int)_socket.Handle);
        if (fd < 0) throw new IOException($"dup of the socket {Path}: errno {Marshal.GetLastPInvokeError()}");
        return (ulong)fd;
    }

    public void Dispose()
    {
        _socket.Dispose();
        // Only our own file: a daemon started after this one stopped listening may have bound the path anew.
        if (_file is { } f && Native.Lstat(Path) is { } st && st.Dev == f.Dev && st.Ino == f.Ino)
        {
            try { File.Delete(Path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }
}

/// <summary>
/// Hosts <see cref="SnapshotsGrpcService"/> on Kestrel over a unix socket (HTTP/2 only, any :authority through
/// <see cref="AuthorityFilter"/>), bound by <see cref="Listen"/> (before <see cref="Build"/> at the latest). The daemon and the tests use
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
        var listening = opt.Listening ??= Listen(opt);
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
            k.ListenHandle(listening.DuplicateHandle(), lo =>
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
        // As Kestrel did with a path it bound: once stopping, new clients are refused (the fd Kestrel drains from is its own).
        app.Lifetime.ApplicationStopping.Register(listening.Dispose);
        MalformedRequests.Logger = app.Services.GetRequiredService<ILoggerFactory>().CreateLogger<SnapshotsGrpcService>();
        app.MapGrpcService<SnapshotsGrpcService>();
        configureApp?.Invoke(app);
        return app;
    }

    /// <summary>
    /// Binds and listens on the socket: removes a stale one (refusing if something still answers on it), creates it
    /// owner-only and then gives it the mode and group of <see cref="SnapshotterServerOptions.SocketGroup"/>.
    /// </summary>
    public static ListeningSocket Listen(SnapshotterServerOptions opt)
    {
        var path = opt.SocketPath;
        var dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        if (!Directory.Exists(dir))
        {
            Directory.CreateDirectory(dir);
            File.SetUnixFileMode(dir, (UnixFileMode)0b111_001_001);
        }
        RemoveStaleSocket(path);
        int? gid = opt.SocketGroup == null ? null : ResolveGroup(opt.SocketGroup);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            var old = Native.Umask(0b000_111_111);
            try { socket.Bind(new UnixDomainSocketEndPoint(path)); }
            finally { Native.Umask(old); }
            socket.Listen(512);
            var listening = new ListeningSocket(socket, path);
            try
            {
                if (gid is int g)
                {
                    try { Native.Chown(path, -1, g); }
                    catch (IOException e) { throw new IOException($"socket {path} to group {opt.SocketGroup}: {e.Message}", e); }
                }
                File.SetUnixFileMode(path, gid == null ? (UnixFileMode)0b110_000_000 : (UnixFileMode)0b110_110_000);
            }
            catch
            {
                listening.Dispose();
                throw;
            }
            return listening;
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new IOException($"cannot listen on {path}: {e.Message}", e);
        }
    }

    /// <summary>Starts serving on the socket <see cref="Build"/> bound.</summary>
    public static Task StartAsync(WebApplication app, SnapshotterServerOptions opt, CancellationToken ct) => app.StartAsync(ct);

    private static void RemoveStaleSocket(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path)) return;
        if (Directory.Exists(path)) throw new IOException($"socket path {path} is a directory");
        using (var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            try
            {
                s.Connect(new UnixDomainSocketEndPoint(path));
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
}
