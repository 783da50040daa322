using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Stargz.Protos;

namespace Stargz.TestSupport;

/// <summary>
/// gRPC client helpers for the containerd snapshots API over a unix socket (our daemon's, or an in-process
/// snapshotter's), dialled as the product dials.
/// </summary>
public static class Client
{
    public static GrpcChannel Channel(string socket) => UnixGrpcChannel.Create(socket);

    /// <summary>The header a direct client (not containerd's proxy) names its namespace with.</summary>
    public static Metadata Ns(string ns) => new() { { "containerd-namespace", ns } };

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
