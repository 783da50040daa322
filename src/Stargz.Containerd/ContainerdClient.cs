using System.Net.Sockets;
using Google.Protobuf.WellKnownTypes;
using Grpc.Core;
using Grpc.Net.Client;
using Stargz.Protos;
using ContentApi = Containerd.Services.Content.V1;
using DiffApi = Containerd.Services.Diff.V1;
using ImagesApi = Containerd.Services.Images.V1;
using LeasesApi = Containerd.Services.Leases.V1;
using SnapshotsApi = Containerd.Services.Snapshots.V1;

namespace Stargz.Containerd;

/// <summary>Thrown for a containerd call that failed; the message names the call and what it was about.</summary>
public sealed class ContainerdException(string message, StatusCode code, Exception? inner = null) : Exception(message, inner)
{
    public StatusCode Code { get; } = code;
}

/// <summary>Per-call deadlines. Unary calls are short; Prepare (a remote mount resolves the layer's TOC over the
/// network) and Apply (decompresses a whole layer) get more; a content write gets a deadline per message.</summary>
public sealed record ContainerdTimeouts
{
    public TimeSpan Call { get; init; } = TimeSpan.FromSeconds(30);
    public TimeSpan Prepare { get; init; } = TimeSpan.FromMinutes(5);
    public TimeSpan Apply { get; init; } = TimeSpan.FromMinutes(30);
    public TimeSpan WriteMessage { get; init; } = TimeSpan.FromMinutes(2);
}

/// <summary>
/// containerd's gRPC API on its own unix socket, in one namespace (header <c>containerd-namespace</c>) and, once
/// <see cref="LeaseId"/> is set, under one lease (header <c>containerd-lease</c>): what is written then belongs to
/// the lease until an image refers to it.
/// </summary>
public sealed class ContainerdClient : IDisposable
{
    public const string NamespaceHeader = "containerd-namespace";
    public const string LeaseHeader = "containerd-lease";

    private readonly GrpcChannel _channel;

    public string Socket { get; }
    public string Namespace { get; }
    public ContainerdTimeouts Timeouts { get; }
    public string? LeaseId { get; set; }

    internal ContentApi.Content.ContentClient Content { get; }
    internal ImagesApi.Images.ImagesClient Images { get; }
    internal LeasesApi.Leases.LeasesClient Leases { get; }
    internal DiffApi.Diff.DiffClient Diff { get; }
    internal SnapshotsApi.Snapshots.SnapshotsClient Snapshots { get; }

    public ContainerdClient(string socket, string ns, ContainerdTimeouts? timeouts = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(socket);
        ArgumentException.ThrowIfNullOrEmpty(ns);
        Socket = socket;
        Namespace = ns;
        Timeouts = timeouts ?? new ContainerdTimeouts();
        // containerd accepts 16 MiB messages; our writes send 1 MiB ones, replies are small.
        _channel = UnixGrpcChannel.Create(socket);
        Content = new ContentApi.Content.ContentClient(_channel);
        Images = new ImagesApi.Images.ImagesClient(_channel);
        Leases = new LeasesApi.Leases.LeasesClient(_channel);
        Diff = new DiffApi.Diff.DiffClient(_channel);
        Snapshots = new SnapshotsApi.Snapshots.SnapshotsClient(_channel);
    }

    internal Metadata Headers()
    {
        var h = new Metadata { { NamespaceHeader, Namespace } };
        if (LeaseId is not null) h.Add(LeaseHeader, LeaseId);
        return h;
    }

    internal CallOptions Options(CancellationToken ct, TimeSpan? timeout = null) =>
        new(Headers(), DateTime.UtcNow + (timeout ?? Timeouts.Call), ct);

    /// <summary>Runs one unary call and turns its failure into a <see cref="ContainerdException"/> naming
    /// <paramref name="what"/>. A missing or dead socket becomes a message that says so.</summary>
    internal async Task<T> CallAsync<T>(string what, Func<Task<T>> call)
    {
        try
        {
            return await call().ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            throw Wrap(what, e);
        }
    }

    internal ContainerdException Wrap(string what, RpcException e)
    {
        var detail = e.StatusCode switch
        {
            // The HTTP layer's own message names "localhost:80", the placeholder address; the socket error says it.
            StatusCode.Unavailable when e.Status.DebugException is HttpRequestException or SocketException =>
                $"cannot reach containerd at {Socket}: {(e.Status.DebugException as SocketException ?? e.Status.DebugException.InnerException as SocketException)?.Message ?? e.Status.DebugException.Message}",
            StatusCode.DeadlineExceeded => $"containerd did not answer in time ({e.Status.Detail})",
            _ => $"{e.StatusCode}: {e.Status.Detail}",
        };
        return new ContainerdException($"{what}: {detail}", e.StatusCode, e);
    }

    // ------------------------------------------------------------------ leases

    /// <summary>Creates a lease that containerd's GC drops by itself after <paramref name="expire"/> (as containerd's
    /// own client does), so a pull that dies half way leaves nothing behind for long.</summary>
    public async Task<string> CreateLeaseAsync(string id, TimeSpan expire, CancellationToken ct)
    {
        var req = new LeasesApi.CreateRequest { Id = id };
        req.Labels["containerd.io/gc.expire"] = (DateTime.UtcNow + expire).ToString("yyyy-MM-ddTHH:mm:ssZ", System.Globalization.CultureInfo.InvariantCulture);
        var resp = await CallAsync($"create lease {id}", async () =>
            await Leases.CreateAsync(req, Options(ct)).ConfigureAwait(false)).ConfigureAwait(false);
        return resp.Lease.Id;
    }

    /// <summary>
    /// Puts snapshot <paramref name="key"/> of <paramref name="snapshotter"/> under this client's lease (when it has one),
    /// whether or not it exists yet: from then on containerd's GC keeps it. A snapshot found by Stat is otherwise
    /// collectable until something refers to it (say, left over by a failed pull, whose lease just went).
    /// </summary>
    public Task HoldSnapshotAsync(string snapshotter, string key, CancellationToken ct)
    {
        if (LeaseId is not { } lease) return Task.CompletedTask;
        var req = new LeasesApi.AddResourceRequest
        {
            Id = lease,
            Resource = new LeasesApi.Resource { Id = key, Type = "snapshots/" + snapshotter },
        };
        return CallAsync($"add snapshot {key} to lease {lease}", async () => await Leases.AddResourceAsync(req, Options(ct)).ConfigureAwait(false));
    }

    public Task DeleteLeaseAsync(string id, CancellationToken ct) =>
        CallAsync($"delete lease {id}", async () => await Leases.DeleteAsync(new LeasesApi.DeleteRequest { Id = id }, Options(ct)).ConfigureAwait(false));

    // ------------------------------------------------------------------ content

    /// <summary>Sets labels on existing content, leaving its other labels alone (field paths <c>labels.KEY</c>).</summary>
    public Task UpdateContentLabelsAsync(string digest, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        var info = new ContentApi.Info { Digest = digest };
        var mask = new FieldMask();
        foreach (var (k, v) in labels)
        {
            info.Labels[k] = v;
            mask.Paths.Add("labels." + k);
        }
        return CallAsync($"update labels of content {digest}", async () =>
            await Content.UpdateAsync(new ContentApi.UpdateRequest { Info = info, UpdateMask = mask }, Options(ct)).ConfigureAwait(false));
    }

    /// <summary>Starts writing <paramref name="expected"/> into the content store under the ingest ref
    /// <paramref name="ingestRef"/>; null when containerd already has that digest.</summary>
    public Task<ContentIngest?> OpenIngestAsync(string ingestRef, string expected, long total, CancellationToken ct) =>
        ContentIngest.OpenAsync(this, ingestRef, expected, total, ct);

    public Task AbortIngestAsync(string ingestRef, CancellationToken ct) =>
        CallAsync($"abort content write {ingestRef}", async () =>
            await Content.AbortAsync(new ContentApi.AbortRequest { Ref = ingestRef }, Options(ct)).ConfigureAwait(false));

    // ------------------------------------------------------------------ snapshots

    /// <summary>The snapshot's info, or null when <paramref name="snapshotter"/> has no snapshot <paramref name="key"/>.</summary>
    public async Task<SnapshotsApi.Info?> StatSnapshotAsync(string snapshotter, string key, CancellationToken ct)
    {
        try
        {
            var r = await Snapshots.StatAsync(new SnapshotsApi.StatSnapshotRequest { Snapshotter = snapshotter, Key = key }, Options(ct)).ConfigureAwait(false);
            return r.Info;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.NotFound)
        {
            return null;
        }
        catch (RpcException e)
        {
            throw WrapSnapshotter(snapshotter, $"stat snapshot {key}", e);
        }
    }

    /// <summary>Prepare through containerd. Returns the mounts, or null when the snapshotter answered
    /// <c>AlreadyExists</c> (a remote snapshotter that mounted the layer itself and committed it under the ref).</summary>
    public async Task<IReadOnlyList<global::Containerd.Types.Mount>?> PrepareSnapshotAsync(string snapshotter, string key, string parent,
        IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        var req = new SnapshotsApi.PrepareSnapshotRequest { Snapshotter = snapshotter, Key = key, Parent = parent };
        foreach (var (k, v) in labels) req.Labels[k] = v;
        try
        {
            var r = await Snapshots.PrepareAsync(req, Options(ct, Timeouts.Prepare)).ConfigureAwait(false);
            return r.Mounts;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.AlreadyExists)
        {
            return null;
        }
        catch (RpcException e)
        {
            throw WrapSnapshotter(snapshotter, $"prepare snapshot \"{key}\"", e);
        }
    }

    /// <summary>Commits <paramref name="key"/> as <paramref name="name"/>; false when <paramref name="name"/> exists already.</summary>
    public async Task<bool> CommitSnapshotAsync(string snapshotter, string name, string key, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        var req = new SnapshotsApi.CommitSnapshotRequest { Snapshotter = snapshotter, Name = name, Key = key };
        foreach (var (k, v) in labels) req.Labels[k] = v;
        try
        {
            await Snapshots.CommitAsync(req, Options(ct)).ConfigureAwait(false);
            return true;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.AlreadyExists)
        {
            return false;
        }
        catch (RpcException e)
        {
            throw WrapSnapshotter(snapshotter, $"commit snapshot {name}", e);
        }
    }

    public async Task RemoveSnapshotAsync(string snapshotter, string key, CancellationToken ct)
    {
        try
        {
            await Snapshots.RemoveAsync(new SnapshotsApi.RemoveSnapshotRequest { Snapshotter = snapshotter, Key = key }, Options(ct)).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.NotFound) { }
        catch (RpcException e)
        {
            throw WrapSnapshotter(snapshotter, $"remove snapshot \"{key}\"", e);
        }
    }

    /// <summary>containerd answers an unknown snapshotter name with InvalidArgument "snapshotter not loaded"; that
    /// (and a proxy snapshotter whose daemon is down) deserves its own message.</summary>
    private ContainerdException WrapSnapshotter(string snapshotter, string what, RpcException e)
    {
        if (e.StatusCode == StatusCode.InvalidArgument && e.Status.Detail.Contains("snapshotter not loaded", StringComparison.Ordinal))
            return new ContainerdException($"snapshotter \"{snapshotter}\" is not known to containerd at {Socket} (is it configured as a proxy plugin?): {e.Status.Detail}",
                e.StatusCode, e);
        // Unavailable from containerd itself (not from our connection to it): the proxy plugin cannot reach its daemon.
        if (e.StatusCode == StatusCode.Unavailable && e.Status.DebugException is null)
            return new ContainerdException($"{what}: snapshotter \"{snapshotter}\" is unavailable (is its daemon running?): {e.Status.Detail}", e.StatusCode, e);
        return Wrap($"{what} (snapshotter {snapshotter})", e);
    }

    // ------------------------------------------------------------------ diff

    /// <summary>Applies the layer blob (already in the content store) onto <paramref name="mounts"/>; returns the
    /// digest of what was applied (the layer's diffID).</summary>
    public async Task<string> ApplyAsync(global::Containerd.Types.ContentDescriptor layer, IEnumerable<global::Containerd.Types.Mount> mounts, CancellationToken ct)
    {
        var req = new DiffApi.ApplyRequest { Diff = layer };
        req.Mounts.AddRange(mounts);
        var r = await CallAsync($"apply layer {layer.Digest}", async () =>
            await Diff.ApplyAsync(req, Options(ct, Timeouts.Apply)).ConfigureAwait(false)).ConfigureAwait(false);
        return r.Applied?.Digest ?? "";
    }

    // ------------------------------------------------------------------ images

    /// <summary>Creates the image record, or replaces target and labels of an existing one (as containerd's client
    /// does on a second pull of the same name).</summary>
    public async Task<ImagesApi.Image> PutImageAsync(string name, global::Containerd.Types.ContentDescriptor target, IReadOnlyDictionary<string, string> labels,
        CancellationToken ct)
    {
        var img = new ImagesApi.Image { Name = name, Target = target };
        foreach (var (k, v) in labels) img.Labels[k] = v;
        for (var attempt = 0; ; attempt++)
        {
            try
            {
                var created = await Images.CreateAsync(new ImagesApi.CreateImageRequest { Image = img }, Options(ct)).ConfigureAwait(false);
                return created.Image;
            }
            catch (RpcException e) when (e.StatusCode == StatusCode.AlreadyExists)
            {
                try
                {
                    // No update mask: containerd then replaces target and labels.
                    var updated = await Images.UpdateAsync(new ImagesApi.UpdateImageRequest { Image = img }, Options(ct)).ConfigureAwait(false);
                    return updated.Image;
                }
                catch (RpcException u) when (u.StatusCode == StatusCode.NotFound && attempt < 3)
                {
                    // Deleted between our Create and Update: create again.
                }
                catch (RpcException u)
                {
                    throw Wrap($"update image {name}", u);
                }
            }
            catch (RpcException e)
            {
                throw Wrap($"create image {name}", e);
            }
        }
    }

    public async Task<ImagesApi.Image?> GetImageAsync(string name, CancellationToken ct)
    {
        try
        {
            return (await Images.GetAsync(new ImagesApi.GetImageRequest { Name = name }, Options(ct)).ConfigureAwait(false)).Image;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.NotFound)
        {
            return null;
        }
        catch (RpcException e)
        {
            throw Wrap($"get image {name}", e);
        }
    }

    public void Dispose() => _channel.Dispose();
}
