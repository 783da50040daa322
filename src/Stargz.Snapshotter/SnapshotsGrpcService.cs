using System.Diagnostics;
using Containerd.Services.Snapshots.V1;
using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using Stargz.Estargz;

namespace Stargz.Snapshotter;

/// <summary>
/// containerd.services.snapshots.v1.Snapshots over <see cref="StargzSnapshotter"/>. One store for every call:
/// containerd's metadata layer namespaces the keys itself (`NAMESPACE/N/KEY`) and sends the `containerd-namespace`
/// header only on some calls, so the header never splits containerd's snapshots; it only keeps apart the keys of
/// direct clients (see <see cref="HeaderNamespace"/>).
/// Errors become the gRPC codes containerd's errdefs maps back (NotFound, AlreadyExists, ...), their messages quoting
/// the keys as the caller sent them. A request that is not valid protobuf gets InvalidArgument
/// (<see cref="MalformedRequests"/>, bound by <see cref="BindService"/>).
/// </summary>
[BindServiceMethod(typeof(SnapshotsGrpcService), nameof(BindService))]
public sealed class SnapshotsGrpcService(StargzSnapshotter sn, ILogger<SnapshotsGrpcService> log) : Snapshots.SnapshotsBase
{
    /// <summary>
    /// The generated binding with checking request marshallers; found by Grpc.AspNetCore through the attribute. It
    /// takes the generated base class: Grpc.AspNetCore matches the handlers to the methods that base class declares.
    /// </summary>
    public static void BindService(ServiceBinderBase binder, Snapshots.SnapshotsBase? service)
        => Snapshots.BindService(MalformedRequests.Wrap(binder), service);

    public const string NamespaceHeader = "containerd-namespace";

    /// <summary>
    /// Largest request taken (bigger ones get ResourceExhausted): containerd's own server limit (16 MiB, its
    /// `[grpc] max_recv_message_size` default), so whatever containerd accepts from its clients it can pass on to us.
    /// </summary>
    public const int MaxRequestBytes = 16 << 20;

    /// <summary>The store's one namespace; the header maps keys instead (<see cref="HeaderNamespace"/>).</summary>
    private const string StoreNs = "";

    private static HeaderNamespace Header(ServerCallContext ctx) => new(ctx.RequestHeaders.GetValue(NamespaceHeader));

    private Task<string> Resolve(ServerCallContext ctx, string key)
    {
        var h = Header(ctx);
        return h.IsContainerdKey(key)
            ? Task.FromResult(key)
            : h.ResolveAsync(key, k => sn.ExistsAsync(StoreNs, k, ctx.CancellationToken)).AsTask();
    }

    /// <summary>A direct client's snapshot.ref target is a name it creates, so it lives in the client's namespace too.</summary>
    private static IReadOnlyDictionary<string, string> StoreLabels(HeaderNamespace h, string key, IReadOnlyDictionary<string, string> labels)
    {
        if (h.IsContainerdKey(key) || !labels.TryGetValue(SnapshotLabels.SnapshotRef, out var target)) return labels;
        return new Dictionary<string, string>(labels, StringComparer.Ordinal) { [SnapshotLabels.SnapshotRef] = h.ToStore(target) };
    }

    /// <summary>
    /// Runs one call: errors become gRPC statuses. Keys are quoted in statuses and logs by their first characters only
    /// (<see cref="KeyText"/>): <paramref name="key"/> and <paramref name="other"/> (parent or commit name) may be huge.
    /// </summary>
    private async Task<T> Run<T>(string op, string key, ServerCallContext ctx, Func<Task<T>> body, string? other = null)
    {
        var sw = Stopwatch.StartNew();
        try
        {
            var r = await body();
            if (log.IsEnabled(LogLevel.Debug)) log.LogDebug("{Op} {Key} ok in {Ms} ms", op, KeyText.Short(key), sw.ElapsedMilliseconds);
            return r;
        }
        catch (SnapshotterException e)
        {
            var message = KeyText.Bound(e.Message, key, other);
            var code = CodeOf(e.Kind);
            if (code == StatusCode.AlreadyExists || code == StatusCode.NotFound)
                log.LogDebug("{Op} {Key}: {Code} {Error}", op, KeyText.Short(key), code, message);
            else
                log.LogWarning("{Op} {Key}: {Code} {Error}", op, KeyText.Short(key), code, message);
            // The caller's keys, not the store's (`NS//KEY` for a header-carrying client), each by its first characters.
            throw new RpcException(new Status(code, KeyText.Bound(e.MessageFor(k => KeyText.Short(Header(ctx).ToClient(k))))));
        }
        catch (OperationCanceledException) when (ctx.CancellationToken.IsCancellationRequested)
        {
            throw new RpcException(new Status(StatusCode.Cancelled, $"{op} {KeyText.Short(key)}: cancelled"));
        }
        catch (Exception e) when (e is not RpcException)
        {
            var message = KeyText.Bound(e.Message, key, other);
            // The exception's own text may repeat a huge key: logged whole only when it is short.
            if (e.Message.Length <= KeyText.MaxMessageChars && e.InnerException == null) log.LogError(e, "{Op} {Key} failed", op, KeyText.Short(key));
            else log.LogError("{Op} {Key} failed: {Error} ({Type})", op, KeyText.Short(key), message, e.GetType().FullName);
            throw new RpcException(new Status(StatusCode.Unknown, $"{op} {KeyText.Short(key)}: {message}"));
        }
    }

    /// <summary>The gRPC code containerd's errdefs maps back to each error kind (the only place kinds meet gRPC).</summary>
    public static StatusCode CodeOf(SnapshotterErrorKind kind) => kind switch
    {
        SnapshotterErrorKind.NotFound => StatusCode.NotFound,
        SnapshotterErrorKind.AlreadyExists => StatusCode.AlreadyExists,
        SnapshotterErrorKind.FailedPrecondition => StatusCode.FailedPrecondition,
        SnapshotterErrorKind.InvalidArgument => StatusCode.InvalidArgument,
        SnapshotterErrorKind.Unavailable => StatusCode.Unavailable,
        SnapshotterErrorKind.ResourceExhausted => StatusCode.ResourceExhausted,
        _ => StatusCode.Unknown,
    };

    public override Task<PrepareSnapshotResponse> Prepare(PrepareSnapshotRequest request, ServerCallContext context)
        => Run("Prepare", request.Key, context, async () =>
        {
            var h = Header(context);
            var m = await sn.PrepareAsync(StoreNs, h.ToStore(request.Key), await Resolve(context, request.Parent),
                StoreLabels(h, request.Key, request.Labels), context.CancellationToken);
            var r = new PrepareSnapshotResponse();
            r.Mounts.AddRange(m);
            return r;
        }, request.Parent);

    public override Task<ViewSnapshotResponse> View(ViewSnapshotRequest request, ServerCallContext context)
        => Run("View", request.Key, context, async () =>
        {
            var h = Header(context);
            var m = await sn.ViewAsync(StoreNs, h.ToStore(request.Key), await Resolve(context, request.Parent),
                StoreLabels(h, request.Key, request.Labels), context.CancellationToken);
            var r = new ViewSnapshotResponse();
            r.Mounts.AddRange(m);
            return r;
        }, request.Parent);

    public override Task<MountsResponse> Mounts(MountsRequest request, ServerCallContext context)
        => Run("Mounts", request.Key, context, async () =>
        {
            var m = await sn.MountsAsync(StoreNs, await Resolve(context, request.Key), context.CancellationToken);
            var r = new MountsResponse();
            r.Mounts.AddRange(m);
            return r;
        });

    public override Task<Empty> Commit(CommitSnapshotRequest request, ServerCallContext context)
        => Run("Commit", request.Key, context, async () =>
        {
            await sn.CommitAsync(StoreNs, Header(context).ToStore(request.Name), await Resolve(context, request.Key),
                request.Labels, context.CancellationToken);
            return new Empty();
        }, request.Name);

    public override Task<Empty> Remove(RemoveSnapshotRequest request, ServerCallContext context)
        => Run("Remove", request.Key, context, async () =>
        {
            await sn.RemoveAsync(StoreNs, await Resolve(context, request.Key), context.CancellationToken);
            return new Empty();
        });

    public override Task<StatSnapshotResponse> Stat(StatSnapshotRequest request, ServerCallContext context)
        => Run("Stat", request.Key, context, async () =>
            new StatSnapshotResponse
            {
                Info = ToInfo(await sn.StatAsync(StoreNs, await Resolve(context, request.Key), context.CancellationToken), Header(context)),
            });

    public override Task<UpdateSnapshotResponse> Update(UpdateSnapshotRequest request, ServerCallContext context)
        => Run("Update", request.Info?.Name ?? "", context, async () =>
        {
            if (request.Info == null || request.Info.Name.Length == 0)
                throw SnapshotterException.InvalidArgument($"update needs info.name");
            var paths = request.UpdateMask?.Paths.ToList() ?? [];
            var r = await sn.UpdateAsync(StoreNs, await Resolve(context, request.Info.Name), request.Info.Labels, paths, context.CancellationToken);
            return new UpdateSnapshotResponse { Info = ToInfo(r, Header(context)) };
        });

    public override async Task List(ListSnapshotsRequest request, IServerStreamWriter<ListSnapshotsResponse> responseStream, ServerCallContext context)
    {
        var h = Header(context);
        var all = await Run("List", string.Join(" | ", request.Filters), context, async () =>
        {
            if (h.IsNone) return await sn.ListAsync(StoreNs, request.Filters, context.CancellationToken);
            // Filters see the names the client knows, so they run after the mapping.
            var filter = SnapshotFilter.Parse(request.Filters);
            var seen = new List<SnapshotRecord>();
            foreach (var r in await sn.ListAsync(StoreNs, [], context.CancellationToken))
            {
                if (!h.Sees(r.Key)) continue;
                var c = ClientView(r, h);
                if (filter.Match(c)) seen.Add(c);
            }
            return seen;
        });
        // Batches of at most 100 snapshots and about 1 MiB: containerd's proxy client takes messages up to 4 MiB, and
        // long keys or many labels would overflow a fixed count.
        const int batch = 100, batchBytes = 1 << 20;
        var resp = new ListSnapshotsResponse();
        var bytes = 0;
        foreach (var rec in all)
        {
            var info = ToInfo(rec);
            var size = info.CalculateSize();
            if (resp.Info.Count > 0 && (resp.Info.Count == batch || bytes + size > batchBytes))
            {
                await responseStream.WriteAsync(resp, context.CancellationToken);
                resp = new ListSnapshotsResponse();
                bytes = 0;
            }
            resp.Info.Add(info);
            bytes += size;
        }
        if (resp.Info.Count > 0) await responseStream.WriteAsync(resp, context.CancellationToken);
    }

    public override Task<UsageResponse> Usage(UsageRequest request, ServerCallContext context)
        => Run("Usage", request.Key, context, async () =>
        {
            var (size, inodes) = await sn.UsageAsync(StoreNs, await Resolve(context, request.Key), context.CancellationToken);
            return new UsageResponse { Size = size, Inodes = inodes };
        });

    public override Task<Empty> Cleanup(CleanupRequest request, ServerCallContext context)
        => Run("Cleanup", "", context, async () =>
        {
            await sn.CleanupAsync(context.CancellationToken);
            return new Empty();
        });

    /// <summary>The record under the names a header-carrying client knows (see <see cref="HeaderNamespace.ToClient"/>).</summary>
    private static SnapshotRecord ClientView(SnapshotRecord r, HeaderNamespace h)
    {
        if (h.IsNone) return r;
        var c = r.Clone();
        c.Key = h.ToClient(r.Key);
        c.Parent = h.ToClient(r.Parent);
        if (c.Labels.TryGetValue(SnapshotLabels.SnapshotRef, out var target)) c.Labels[SnapshotLabels.SnapshotRef] = h.ToClient(target);
        return c;
    }

    private static Info ToInfo(SnapshotRecord r, HeaderNamespace h) => ToInfo(ClientView(r, h));

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
