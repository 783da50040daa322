using System.Diagnostics;
using Containerd.Services.Snapshots.V1;
using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace Stargz.Snapshotter;

/// <summary>
/// containerd.services.snapshots.v1.Snapshots over <see cref="StargzSnapshotter"/>. One namespace ("") for every
/// call, as with the reference: containerd's metadata layer namespaces the keys itself (`NAMESPACE/N/KEY`) and sends
/// the `containerd-namespace` header only on some calls (those from its own namespaced contexts, e.g. CRI's unpack,
/// not those forwarded from a ctr client), so the header must not select where a snapshot lives.
/// Errors become the gRPC codes containerd's errdefs maps back (NotFound, AlreadyExists, ...).
/// </summary>
public sealed class SnapshotsGrpcService(StargzSnapshotter sn, ILogger<SnapshotsGrpcService> log) : Snapshots.SnapshotsBase
{
    public const string NamespaceHeader = "containerd-namespace";

    private static string Ns(ServerCallContext ctx) => "";

    private async Task<T> Run<T>(string op, string key, ServerCallContext ctx, Func<Task<T>> body)
    {
        var sw = Stopwatch.StartNew();
        try
        {
            var r = await body();
            log.LogDebug("{Op} {Key} ok in {Ms} ms", op, key, sw.ElapsedMilliseconds);
            return r;
        }
        catch (SnapshotterException e)
        {
            if (e.Code == StatusCode.AlreadyExists || e.Code == StatusCode.NotFound)
                log.LogDebug("{Op} {Key}: {Code} {Error}", op, key, e.Code, e.Message);
            else
                log.LogWarning("{Op} {Key}: {Code} {Error}", op, key, e.Code, e.Message);
            throw new RpcException(new Status(e.Code, e.Message));
        }
        catch (OperationCanceledException) when (ctx.CancellationToken.IsCancellationRequested)
        {
            throw new RpcException(new Status(StatusCode.Cancelled, $"{op} {key}: cancelled"));
        }
        catch (Exception e) when (e is not RpcException)
        {
            log.LogError(e, "{Op} {Key} failed", op, key);
            throw new RpcException(new Status(StatusCode.Unknown, $"{op} {key}: {e.Message}"));
        }
    }

    public override Task<PrepareSnapshotResponse> Prepare(PrepareSnapshotRequest request, ServerCallContext context)
        => Run("Prepare", request.Key, context, async () =>
        {
            var m = await sn.PrepareAsync(Ns(context), request.Key, request.Parent, request.Labels, context.CancellationToken);
            var r = new PrepareSnapshotResponse();
            r.Mounts.AddRange(m);
            return r;
        });

    public override Task<ViewSnapshotResponse> View(ViewSnapshotRequest request, ServerCallContext context)
        => Run("View", request.Key, context, async () =>
        {
            var m = await sn.ViewAsync(Ns(context), request.Key, request.Parent, request.Labels, context.CancellationToken);
            var r = new ViewSnapshotResponse();
            r.Mounts.AddRange(m);
            return r;
        });

    public override Task<MountsResponse> Mounts(MountsRequest request, ServerCallContext context)
        => Run("Mounts", request.Key, context, async () =>
        {
            var m = await sn.MountsAsync(Ns(context), request.Key, context.CancellationToken);
            var r = new MountsResponse();
            r.Mounts.AddRange(m);
            return r;
        });

    public override Task<Empty> Commit(CommitSnapshotRequest request, ServerCallContext context)
        => Run("Commit", request.Key, context, async () =>
        {
            await sn.CommitAsync(Ns(context), request.Name, request.Key, request.Labels, context.CancellationToken);
            return new Empty();
        });

    public override Task<Empty> Remove(RemoveSnapshotRequest request, ServerCallContext context)
        => Run("Remove", request.Key, context, async () =>
        {
            await sn.RemoveAsync(Ns(context), request.Key, context.CancellationToken);
            return new Empty();
        });

    public override Task<StatSnapshotResponse> Stat(StatSnapshotRequest request, ServerCallContext context)
        => Run("Stat", request.Key, context, async () =>
            new StatSnapshotResponse { Info = ToInfo(await sn.StatAsync(Ns(context), request.Key, context.CancellationToken)) });

    public override Task<UpdateSnapshotResponse> Update(UpdateSnapshotRequest request, ServerCallContext context)
        => Run("Update", request.Info?.Name ?? "", context, async () =>
        {
            if (request.Info == null || request.Info.Name.Length == 0)
                throw SnapshotterException.InvalidArgument("update needs info.name");
            var paths = request.UpdateMask?.Paths.ToList() ?? [];
            var r = await sn.UpdateAsync(Ns(context), request.Info.Name, request.Info.Labels, paths, context.CancellationToken);
            return new UpdateSnapshotResponse { Info = ToInfo(r) };
        });

    public override async Task List(ListSnapshotsRequest request, IServerStreamWriter<ListSnapshotsResponse> responseStream, ServerCallContext context)
    {
        var all = await Run("List", string.Join(" | ", request.Filters), context,
            () => sn.ListAsync(Ns(context), request.Filters, context.CancellationToken));
        const int batch = 100;
        for (int i = 0; i < all.Count; i += batch)
        {
            var r = new ListSnapshotsResponse();
            r.Info.AddRange(all.Skip(i).Take(batch).Select(ToInfo));
            await responseStream.WriteAsync(r, context.CancellationToken);
        }
    }

    public override Task<UsageResponse> Usage(UsageRequest request, ServerCallContext context)
        => Run("Usage", request.Key, context, async () =>
        {
            var (size, inodes) = await sn.UsageAsync(Ns(context), request.Key, context.CancellationToken);
            return new UsageResponse { Size = size, Inodes = inodes };
        });

    public override Task<Empty> Cleanup(CleanupRequest request, ServerCallContext context)
        => Run("Cleanup", "", context, async () =>
        {
            await sn.CleanupAsync(context.CancellationToken);
            return new Empty();
        });

    public static Info ToInfo(SnapshotRecord r)
    {
        var i = new Info
        {
            Name = r.Key,
            Parent = r.Parent,
            Kind = r.Kind switch
            {
                SnapshotKind.View => Kind.View,
                SnapshotKind.Active => Kind.Active,
                SnapshotKind.Committed => Kind.Committed,
                _ => Kind.Unknown,
            },
            CreatedAt = Timestamp.FromDateTime(DateTime.SpecifyKind(r.Created, DateTimeKind.Utc)),
            UpdatedAt = Timestamp.FromDateTime(DateTime.SpecifyKind(r.Updated, DateTimeKind.Utc)),
        };
        i.Labels.Add(r.Labels);
        return i;
    }
}
