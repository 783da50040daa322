using Stargz.Estargz;
using System.Security.Cryptography;
using System.Text.Json;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Stargz.Registry;
using CtdDescriptor = Containerd.Types.ContentDescriptor;

namespace Stargz.Containerd;

public sealed record RpullOptions
{
    /// <summary>containerd snapshotter name the layers are prepared with.</summary>
    public string Snapshotter { get; init; } = "stargz";
    public Platform Platform { get; init; } = Platform.Current;
    public long PrefetchSize { get; init; } = RpullLabels.DefaultPrefetchSize;
    /// <summary>The lease's own expiry, in case this process dies before deleting it.</summary>
    public TimeSpan LeaseExpiry { get; init; } = TimeSpan.FromHours(24);
    /// <summary>Labels for the image record (the reference's <c>--label</c>).</summary>
    public IReadOnlyDictionary<string, string> ImageLabels { get; init; } = new Dictionary<string, string>();
    /// <summary>
    /// Labels every layer's snapshot with <see cref="SnapshotLabels.SkipVerify"/> (the reference's
    /// <c>--skip-content-verify</c>): a layer without a TOC digest may then be mounted unverified where the daemon allows it.
    /// </summary>
    public bool SkipContentVerify { get; init; }

    /// <summary>Told where each layer is (checked, remote, downloading with bytes so far, applying, applied); for progress bars.</summary>
    public IProgress<LayerPullProgress>? LayerProgress { get; init; }
}

public enum LayerPullStage
{
    /// <summary>Being prepared on the snapshotter (which may mount it remotely).</summary>
    Preparing,
    /// <summary>The snapshot existed already.</summary>
    Existing,
    /// <summary>Mounted lazily by the snapshotter: nothing downloaded.</summary>
    Remote,
    /// <summary>Being downloaded into the content store (<see cref="LayerPullProgress.Bytes"/> so far).</summary>
    Downloading,
    /// <summary>Downloaded, being unpacked by containerd's differ.</summary>
    Applying,
    /// <summary>Unpacked and committed.</summary>
    Applied,
}

/// <param name="Index">the layer's position in the manifest (0 = bottom).</param>
/// <param name="Size">the blob's size per the manifest.</param>
public readonly record struct LayerPullProgress(int Index, string Digest, long Size, LayerPullStage Stage, long Bytes);

public enum LayerOutcome
{
    /// <summary>The snapshot existed before this pull.</summary>
    Existing,
    /// <summary>The snapshotter mounted the layer from the registry itself (Prepare answered AlreadyExists).</summary>
    Remote,
    /// <summary>Downloaded into the content store and applied by containerd's differ.</summary>
    Applied,
}

public sealed record LayerResult(string Digest, string ChainId, LayerOutcome Outcome);

public sealed record RpullResult(string ImageName, CtdDescriptor Target, string ConfigDigest, string TopChainId, IReadOnlyList<LayerResult> Layers);

/// <summary>
/// <c>stargz image rpull</c>: what the reference's <c>ctr-remote image rpull</c> does through containerd's client
/// library, done here over containerd's gRPC API with our registry client. Index, manifest and config go into the
/// content store with containerd's GC labels; each layer is prepared on the snapshotter with the stargz labels, so
/// a remote snapshotter can mount it lazily (AlreadyExists); a layer it cannot is downloaded and applied by
/// containerd's differ and committed under its chainID. All of it under one lease, then the image record.
/// </summary>
public sealed class ImagePuller(RegistryClient registry, ContainerdClient containerd, ILogger? logger = null, TextWriter? progress = null)
{
    private readonly ILogger _log = logger ?? NullLogger.Instance;

    public async Task<RpullResult> PullAsync(ImageReference reference, RpullOptions options, CancellationToken ct)
    {
        var imageName = reference.ToString();
        if (options.SkipContentVerify)
            _log.LogWarning("image {Image}: content verification disabled for layers without a TOC digest (--skip-content-verify)", imageName);
        // The lease first, as ctr-remote does: it is also the check that containerd answers, before any download.
        // Not cancelled by the caller (the call has its own deadline): a Ctrl-C while containerd is creating it would
        // leave a lease this pull never learnt it had, so never handed back.
        var leaseId = "stargz-rpull-" + Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8));
        await containerd.CreateLeaseAsync(leaseId, options.LeaseExpiry, CancellationToken.None).ConfigureAwait(false);
        containerd.LeaseId = leaseId;
        _log.LogDebug("lease {Lease} created in namespace {Namespace}", leaseId, containerd.Namespace);
        try
        {
            ct.ThrowIfCancellationRequested();
            var resolved = await registry.ResolveAsync(reference, options.Platform, ct).ConfigureAwait(false);
            _log.LogInformation("resolved {Image} to manifest {Manifest} ({Layers} layers) from {Host}", imageName, resolved.Digest, resolved.Layers.Count,
                resolved.ServedBy);

            // The index (when the reference names one) is stored as is: the image record points at it, like containerd's.
            ReadOnlyMemory<byte>? indexBytes = null;
            string? indexMediaType = null;
            if (resolved.IndexDigest is { } indexDigest)
            {
                var (bytes, mt, _) = await registry.FetchManifestAsync(reference, indexDigest, ct).ConfigureAwait(false);
                indexBytes = bytes;
                indexMediaType = IndexMediaType(mt, bytes.Span);
            }

            var configBytes = await registry.FetchBlobBytesAsync(reference, resolved.Config.Digest, ct: ct).ConfigureAwait(false);
            var diffIds = DiffIds(configBytes, resolved.Config.Digest);
            if (diffIds.Count != resolved.Layers.Count)
                throw new InvalidDataException($"image {imageName}: the manifest has {resolved.Layers.Count} layers but the config {resolved.Config.Digest} has {diffIds.Count} diffIDs");
            var chainIds = RpullLabels.ChainIds(diffIds);

            var source = new Dictionary<string, string> { [RpullLabels.DistributionSourcePrefix + reference.Host] = reference.Repository };

            Report($"fetching {Short(resolved.Config.Digest)}... {resolved.Config.MediaType}");
            await PutBytesAsync("config", resolved.Config.Digest, configBytes, source, ct).ConfigureAwait(false);

            Report($"fetching {Short(resolved.Digest)}... {resolved.MediaType}");
            var manifestLabels = RpullLabels.ManifestGcLabels(resolved.Config, resolved.Layers);
            foreach (var kv in source) manifestLabels[kv.Key] = kv.Value;
            await PutBytesAsync("manifest", resolved.Digest, resolved.Raw, manifestLabels, ct).ConfigureAwait(false);

            CtdDescriptor target;
            if (indexBytes is { } ib)
            {
                Report($"fetching {Short(resolved.IndexDigest!)}... {indexMediaType}");
                // Only the manifest we selected is referenced, as containerd's platform-filtered pull does.
                var indexLabels = new Dictionary<string, string>(source) { [RpullLabels.GcRefContentManifestPrefix + "0"] = resolved.Digest };
                await PutBytesAsync("index", resolved.IndexDigest!, ib, indexLabels, ct).ConfigureAwait(false);
                target = new CtdDescriptor { MediaType = indexMediaType, Digest = resolved.IndexDigest, Size = ib.Length };
            }
            else
                target = new CtdDescriptor { MediaType = resolved.MediaType, Digest = resolved.Digest, Size = resolved.Raw.Length };

            var results = new List<LayerResult>(resolved.Layers.Count);
            for (var i = 0; i < resolved.Layers.Count; i++)
            {
                var outcome = await UnpackLayerAsync(reference, imageName, resolved.Layers, i, diffIds[i], chainIds, options, ct).ConfigureAwait(false);
                results.Add(new LayerResult(resolved.Layers[i].Digest, chainIds[i], outcome));
            }

            var top = chainIds.Count > 0 ? chainIds[^1] : "";
            if (top.Length > 0)
            {
                // As containerd's unpacker: the config keeps the unpacked snapshot chain alive for GC.
                await containerd.UpdateContentLabelsAsync(resolved.Config.Digest,
                    new Dictionary<string, string> { [RpullLabels.GcRefSnapshotPrefix + options.Snapshotter] = top }, ct).ConfigureAwait(false);
            }

            await containerd.PutImageAsync(imageName, target, options.ImageLabels, ct).ConfigureAwait(false);
            _log.LogInformation("image {Image} stored as {Target}: top snapshot {ChainId} on {Snapshotter} ({Remote} remote, {Applied} applied, {Existing} existing)",
                imageName, target.Digest, top, options.Snapshotter, results.Count(r => r.Outcome == LayerOutcome.Remote),
                results.Count(r => r.Outcome == LayerOutcome.Applied), results.Count(r => r.Outcome == LayerOutcome.Existing));
            return new RpullResult(imageName, target, resolved.Config.Digest, top, results);
        }
        finally
        {
            containerd.LeaseId = null;
            // Not with the caller's token: a cancelled pull must still hand its lease back (its expiry is the fallback).
            using var cleanup = new CancellationTokenSource(containerd.Timeouts.Call);
            try
            {
                await containerd.DeleteLeaseAsync(leaseId, cleanup.Token).ConfigureAwait(false);
            }
            catch (ContainerdException e)
            {
                _log.LogWarning("could not delete lease {Lease}; containerd drops it when it expires: {Error}", leaseId, e.Message);
            }
        }
    }

    private async Task<LayerOutcome> UnpackLayerAsync(ImageReference reference, string imageName, IReadOnlyList<Descriptor> layers, int i,
        string diffId, IReadOnlyList<string> chainIds, RpullOptions options, CancellationToken ct)
    {
        var layer = layers[i];
        var chainId = chainIds[i];
        var parent = i == 0 ? "" : chainIds[i - 1];
        var sn = options.Snapshotter;
        void Stage(LayerPullStage s, long bytes = 0) => options.LayerProgress?.Report(new LayerPullProgress(i, layer.Digest, layer.Size, s, bytes));
        Stage(LayerPullStage.Preparing);
        // Held first, then looked at: a snapshot that is there now stays there for the layers above it.
        await containerd.HoldSnapshotAsync(sn, chainId, ct).ConfigureAwait(false);
        if (await containerd.StatSnapshotAsync(sn, chainId, ct).ConfigureAwait(false) is not null)
        {
            Stage(LayerPullStage.Existing, layer.Size);
            _log.LogInformation("layer {Index} {Digest}: snapshot {ChainId} exists", i, layer.Digest, chainId);
            Report($"layer {Short(layer.Digest)}... already unpacked");
            return LayerOutcome.Existing;
        }

        var labels = RpullLabels.ForLayer(imageName, layers, i, chainId, options.PrefetchSize);
        if (options.SkipContentVerify) labels[SnapshotLabels.SkipVerify] = "true";
        string key = "";
        IReadOnlyList<global::Containerd.Types.Mount>? mounts = null;
        for (var attempt = 1; ; attempt++)
        {
            key = RpullLabels.ExtractKey(chainId);
            mounts = await containerd.PrepareSnapshotAsync(sn, key, parent, labels, ct).ConfigureAwait(false);
            if (mounts is not null) break;
            // AlreadyExists: the snapshotter committed the layer under the chainID itself (remote snapshot), or a
            // concurrent pull did. Either way the snapshot must now be there; its label tells which.
            if (await containerd.StatSnapshotAsync(sn, chainId, ct).ConfigureAwait(false) is { } info)
            {
                var remote = info.Labels.ContainsKey(SnapshotLabels.RemoteSnapshot);
                _log.LogInformation("layer {Index} {Digest}: {Kind} snapshot {ChainId} on {Snapshotter}", i, layer.Digest,
                    remote ? "remote" : "concurrently committed", chainId, sn);
                Report($"layer {Short(layer.Digest)}... {(remote ? "remote snapshot" : "already unpacked")}");
                Stage(remote ? LayerPullStage.Remote : LayerPullStage.Existing, layer.Size);
                return remote ? LayerOutcome.Remote : LayerOutcome.Existing;
            }
            if (attempt >= 3)
                throw new ContainerdException($"prepare snapshot for layer {layer.Digest}: {sn} answered AlreadyExists but has no snapshot {chainId}", StatusCode.AlreadyExists);
            _log.LogDebug("prepare {Key} answered AlreadyExists without {ChainId}; trying a new key", key, chainId);
        }

        _log.LogInformation("layer {Index} {Digest}: not mounted remotely by {Snapshotter}; fetching and applying it", i, layer.Digest, sn);
        var committed = false;
        try
        {
            Report($"fetching {Short(layer.Digest)}... {layer.MediaType}");
            Stage(LayerPullStage.Downloading);
            await EnsureLayerBlobAsync(reference, layer, options.LayerProgress == null ? null : b => Stage(LayerPullStage.Downloading, b), ct).ConfigureAwait(false);
            Stage(LayerPullStage.Applying, layer.Size);
            var desc = new CtdDescriptor { MediaType = layer.MediaType, Digest = layer.Digest, Size = layer.Size };
            if (layer.Annotations is not null) foreach (var (k, v) in layer.Annotations) desc.Annotations[k] = v;
            var applied = await containerd.ApplyAsync(desc, mounts, ct).ConfigureAwait(false);
            if (applied != diffId)
                throw new InvalidDataException($"layer {layer.Digest} of {imageName} unpacked to {applied}, but the config says its diffID is {diffId}");
            committed = await containerd.CommitSnapshotAsync(sn, chainId, key, labels, ct).ConfigureAwait(false);
            if (!committed)
                _log.LogInformation("layer {Index}: snapshot {ChainId} was committed by someone else meanwhile", i, chainId);
            await containerd.UpdateContentLabelsAsync(layer.Digest, new Dictionary<string, string> { [RpullLabels.Uncompressed] = diffId }, ct)
                .ConfigureAwait(false);
            Report($"layer {Short(layer.Digest)}... applied");
            Stage(LayerPullStage.Applied, layer.Size);
            return LayerOutcome.Applied;
        }
        finally
        {
            if (!committed)
            {
                using var cleanup = new CancellationTokenSource(containerd.Timeouts.Call);
                try { await containerd.RemoveSnapshotAsync(sn, key, cleanup.Token).ConfigureAwait(false); }
                catch (ContainerdException e) { _log.LogWarning("could not remove snapshot {Key}: {Error}", key, e.Message); }
            }
        }
    }

    /// <summary>Downloads the layer into containerd's content store unless it is there already.</summary>
    /// <param name="bytes">told the bytes written so far (null: not told).</param>
    private async Task EnsureLayerBlobAsync(ImageReference reference, Descriptor layer, Action<long>? bytes, CancellationToken ct)
    {
        var labels = new Dictionary<string, string> { [RpullLabels.DistributionSourcePrefix + reference.Host] = reference.Repository };
        await WithIngestAsync("layer", layer.Digest, layer.Size, labels, async ingest =>
        {
            var sink = ingest.AsStream();
            var n = await registry.DownloadBlobAsync(reference, layer.Digest, bytes == null ? sink : new ProgressWriteStream(sink, bytes), ct).ConfigureAwait(false);
            if (n != layer.Size)
                throw new InvalidDataException($"layer {layer.Digest}: the registry sent {n} bytes, the manifest says {layer.Size}");
        }, ct).ConfigureAwait(false);
    }

    private Task PutBytesAsync(string kind, string digest, ReadOnlyMemory<byte> bytes, IReadOnlyDictionary<string, string> labels, CancellationToken ct) =>
        WithIngestAsync(kind, digest, bytes.Length, labels, ingest => ingest.WriteAsync(bytes, ct), ct);

    /// <summary>
    /// Writes one blob under the ingest ref <c>KIND-DIGEST</c> (containerd's naming) with <paramref name="labels"/>;
    /// when the content exists already, only its labels are set. A ref locked by another writer (a concurrent pull of
    /// the same blob) is waited for, bounded.
    /// </summary>
    /// <remarks>
    /// Existing content is found by opening the writer, never by a content Info first: containerd's writer adds
    /// content it already has to the caller's lease in the same transaction, whereas after an Info the content may
    /// belong to nothing (another pull's lease just ended) and its garbage collector may take it before the labels
    /// are set (seen as "update labels of content ...: NotFound").
    /// </remarks>
    private async Task WithIngestAsync(string kind, string digest, long size, IReadOnlyDictionary<string, string> labels,
        Func<ContentIngest, Task> write, CancellationToken ct)
    {
        var ingestRef = $"{kind}-{digest}";
        for (var attempt = 1; ; attempt++)
        {
            ContentIngest? ingest;
            try
            {
                ingest = await containerd.OpenIngestAsync(ingestRef, digest, size, ct).ConfigureAwait(false);
            }
            catch (ContainerdException e) when (e.Code == StatusCode.Unavailable && e.Message.Contains("locked", StringComparison.Ordinal) && attempt < 120)
            {
                _log.LogDebug("content write {Ref} is locked by another writer; waiting", ingestRef);
                await Task.Delay(TimeSpan.FromMilliseconds(500), ct).ConfigureAwait(false);
                continue;
            }
            if (ingest is null)
            {
                // containerd has it, now held by this pull's lease.
                await containerd.UpdateContentLabelsAsync(digest, labels, ct).ConfigureAwait(false);
                return;
            }
            await using (ingest.ConfigureAwait(false))
            {
                try
                {
                    await write(ingest).ConfigureAwait(false);
                    if (!await ingest.CommitAsync(labels, ct).ConfigureAwait(false))
                        continue; // committed by someone else meanwhile: the next open finds it and sets the labels
                    _log.LogDebug("stored {Kind} {Digest} ({Size} bytes) in containerd's content store", kind, digest, size);
                    return;
                }
                catch
                {
                    using var cleanup = new CancellationTokenSource(containerd.Timeouts.Call);
                    try { await containerd.AbortIngestAsync(ingestRef, cleanup.Token).ConfigureAwait(false); }
                    catch (ContainerdException) { }
                    throw;
                }
            }
        }
    }

    private void Report(string line) => progress?.WriteLine(line);

    private static string Short(string digest) => digest.Length > 15 ? digest[..15] : digest;

    /// <summary>The config's rootfs.diff_ids, in layer order.</summary>
    internal static IReadOnlyList<string> DiffIds(ReadOnlySpan<byte> config, string configDigest)
    {
        try
        {
            using var doc = JsonDocument.Parse(config.ToArray());
            if (!doc.RootElement.TryGetProperty("rootfs", out var rootfs) || !rootfs.TryGetProperty("diff_ids", out var ids) ||
                ids.ValueKind != JsonValueKind.Array)
                throw new InvalidDataException($"image config {configDigest} has no rootfs.diff_ids");
            return ids.EnumerateArray().Select(e => e.GetString() ?? throw new InvalidDataException($"image config {configDigest}: a diffID is null")).ToList();
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"image config {configDigest} is not JSON: {e.Message}", e);
        }
    }

    /// <summary>The index's media type: from the response header, else its own mediaType field, else OCI.</summary>
    internal static string IndexMediaType(string headerMediaType, ReadOnlySpan<byte> json)
    {
        if (MediaTypes.IsIndex(headerMediaType)) return headerMediaType;
        try
        {
            using var doc = JsonDocument.Parse(json.ToArray());
            if (doc.RootElement.TryGetProperty("mediaType", out var mt) && mt.GetString() is { } s && MediaTypes.IsIndex(s)) return s;
        }
        catch (JsonException) { }
        return MediaTypes.OciIndex;
    }
}
