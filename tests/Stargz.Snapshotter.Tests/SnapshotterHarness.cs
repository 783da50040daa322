using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Builder;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>gRPC client helpers over a unix socket.</summary>
public static class Client
{
    public static GrpcChannel Channel(string socket) => UnixGrpc.Channel(socket);

    public static Metadata Ns(string ns) => new() { { SnapshotsGrpcService.NamespaceHeader, ns } };

    public static async Task<StatusCode> CodeOf(Func<Task> call)
    {
        try
        {
            await call();
            return StatusCode.OK;
        }
        catch (RpcException e) { return e.StatusCode; }
    }

    public static async Task<(StatusCode Code, string Message)> ErrorOf(Func<Task> call)
    {
        try
        {
            await call();
            return (StatusCode.OK, "");
        }
        catch (RpcException e) { return (e.StatusCode, e.Status.Detail); }
    }

    public static Task<List<Info>> ListAll(Snapshots.SnapshotsClient c, CancellationToken ct, params string[] filters)
        => ListAll(c, null, ct, filters);

    public static async Task<List<Info>> ListAll(Snapshots.SnapshotsClient c, Metadata? headers, CancellationToken ct, params string[] filters)
    {
        var req = new ListSnapshotsRequest { Snapshotter = "stargz" };
        req.Filters.AddRange(filters);
        using var call = c.List(req, headers, cancellationToken: ct);
        var all = new List<Info>();
        await foreach (var r in call.ResponseStream.ReadAllAsync(ct)) all.AddRange(r.Info);
        return all;
    }
}

/// <summary>
/// The snapshotter served in-process by the same Kestrel host the daemon uses, on a real unix socket, with its LiteDB
/// store on disk under a temp root. Reopen() closes and opens it again on the same root (a clean restart).
/// </summary>
public sealed class InProcessSnapshotter : IAsyncDisposable
{
    private readonly TempDir _dir;
    private WebApplication? _app;
    private GrpcChannel? _channel;
    private readonly IRemoteFileSystem? _remote;
    private readonly TimeSpan _validInterval;
    private readonly bool _checkAlways;

    public StargzSnapshotter Snapshotter { get; private set; } = null!;
    public Snapshots.SnapshotsClient Client { get; private set; } = null!;
    public string Root { get; }
    public string Socket { get; }

    private InProcessSnapshotter(IRemoteFileSystem? remote, TimeSpan validInterval, bool checkAlways)
    {
        _dir = new TempDir("sgs");
        Root = Path.Combine(_dir.Path, "root");
        Socket = Path.Combine(_dir.Path, "s.sock");
        _remote = remote;
        _validInterval = validInterval;
        _checkAlways = checkAlways;
    }

    public static async Task<InProcessSnapshotter> StartAsync(IRemoteFileSystem? remote = null, TimeSpan? validInterval = null, bool checkAlways = false)
    {
        var s = new InProcessSnapshotter(remote, validInterval ?? TimeSpan.FromSeconds(60), checkAlways);
        try { await s.OpenAsync(s._remote); }
        catch
        {
            await s.DisposeAsync();
            throw;
        }
        return s;
    }

    private async Task OpenAsync(IRemoteFileSystem? remote)
    {
        Snapshotter = await StargzSnapshotter.OpenAsync(new SnapshotterOptions
        {
            Root = Root, RemoteFileSystem = remote, CheckValidInterval = _validInterval, CheckAlways = _checkAlways,
        }, null, CancellationToken.None);
        var opt = new SnapshotterServerOptions { SocketPath = Socket };
        _app = SnapshotterServer.Build(Snapshotter, opt);
        await SnapshotterServer.StartAsync(_app, opt, CancellationToken.None);
        _channel = Stargz.Snapshotter.Tests.Client.Channel(Socket);
        Client = new Snapshots.SnapshotsClient(_channel);
    }

    /// <summary>Stops serving and closes the store, then opens the same root again (optionally with another remote fs).</summary>
    public async Task ReopenAsync(IRemoteFileSystem? remote)
    {
        await CloseAsync();
        await OpenAsync(remote);
    }

    /// <summary>Stops the server as SIGTERM does (graceful: in-flight calls finish), then closes the store.</summary>
    public Task StopAsync() => CloseAsync();

    private async Task CloseAsync()
    {
        // Server first, as SIGTERM does: it drains calls still in flight on the open connection.
        if (_app != null)
        {
            await _app.StopAsync();
            await _app.DisposeAsync();
            _app = null;
        }
        _channel?.Dispose();
        _channel = null;
        if (Snapshotter != null) await Snapshotter.DisposeAsync();
    }

    public async ValueTask DisposeAsync()
    {
        try { await CloseAsync(); }
        finally
        {
            Mounts.UnmountAllUnder(_dir.Path);
            _dir.Dispose();
        }
    }
}
