using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Layer;

/// <summary>
/// The TOCs of layers, resolved once per layer (single-flight by registry, repository and digest) from the stored TOC
/// or the registry, kept for <c>resolve_result_entry_ttl_sec</c>, and resolved ahead for an image's other layers so
/// their mounts find them ready. A failed resolution is not kept. Fetched TOCs are stored for offline restarts.
/// </summary>
internal sealed class TocResolutions(RegistryClient registry, LayerOptions options, ChunkCache cache, TocStore? tocs, ILogger log,
    CancellationToken lifetime)
{
    /// <summary>A layer's blob and its checked TOC, and when they were resolved.</summary>
    public sealed record Resolved(RemoteBlobFetcher Blob, ResolvedToc Toc, DateTime At);

    private readonly RegistryClient _registry = registry;
    private readonly LayerOptions _options = options;
    private readonly ChunkCache _cache = cache;
    private readonly TocStore? _tocs = tocs;
    private readonly ILogger _log = log;
    private readonly CancellationToken _lifetime = lifetime;
    private readonly ConcurrentDictionary<string, Lazy<Task<Resolved>>> _resolved = new(StringComparer.Ordinal);

    public Task<Resolved> ResolveAsync(ImageReference imageRef, string digest, string[] urls, CancellationToken ct)
    {
        // Forget expired TOCs nobody asked for again (they would otherwise stay for the daemon's life).
        var now = DateTime.UtcNow;
        foreach (var (k, l) in _resolved)
            if (l.IsValueCreated && l.Value.IsCompletedSuccessfully && now - l.Value.Result.At > _options.ResolveResultEntryTtl)
                _resolved.TryRemove(new KeyValuePair<string, Lazy<Task<Resolved>>>(k, l));
        var key = imageRef.Host + "/" + imageRef.Repository + "@" + digest;
        while (true)
        {
            var lazy = _resolved.GetOrAdd(key, _ => new Lazy<Task<Resolved>>(() => FetchTocAsync(imageRef, digest, urls)));
            var task = lazy.Value;
            if (task.IsCompletedSuccessfully && DateTime.UtcNow - task.Result.At > _options.ResolveResultEntryTtl)
            {
                _resolved.TryRemove(new KeyValuePair<string, Lazy<Task<Resolved>>>(key, lazy));
                continue;
            }
            if (task.IsFaulted || task.IsCanceled)
            {
                // A failed resolution is not kept: the next mount asks the registry again.
                _resolved.TryRemove(new KeyValuePair<string, Lazy<Task<Resolved>>>(key, lazy));
                if (task.IsFaulted) return task;
                continue;
            }
            return AwaitResolved(key, lazy, task, ct);
        }
    }

    /// <summary>The TOC resolution of a layer (started by a mount or ahead of one), or null if none is cached.</summary>
    public Task? ResolutionOf(string reference, string digest)
    {
        var r = ImageReference.Parse(reference);
        return _resolved.TryGetValue(r.Host + "/" + r.Repository + "@" + digest, out var lazy) ? lazy.Value : null;
    }

    private async Task<Resolved> AwaitResolved(string key, Lazy<Task<Resolved>> lazy, Task<Resolved> task, CancellationToken ct)
    {
        try { return await task.WaitAsync(ct).ConfigureAwait(false); }
        catch (Exception) when (task.IsFaulted)
        {
            _resolved.TryRemove(new KeyValuePair<string, Lazy<Task<Resolved>>>(key, lazy));
            throw;
        }
    }

    /// <param name="urls">the layer's URLs (containerd.io/snapshot/remote/urls): tried before the registry.</param>
    private async Task<Resolved> FetchTocAsync(ImageReference imageRef, string digest, string[] urls)
    {
        if (_tocs != null)
        {
            var stored = _tocs.TryLoad(digest, out var problem);
            if (problem != null) _log.LogWarning("{Problem}", problem);
            if (stored is { } st)
            {
                _log.LogInformation("layer {Digest} of {Reference}: TOC {TocDigest} read from {Dir}; the registry is asked on the first missing chunk",
                    digest, imageRef, st.Toc.TocDigest, _tocs.Directory);
                return new Resolved(new RemoteBlobFetcher(st.BlobSize, ct => _registry.OpenBlobAsync(imageRef, digest, urls, ct)), st.Toc, DateTime.UtcNow);
            }
        }
        // Not tied to one caller's token: others may be waiting for the same TOC. Bounded by the fetching timeout.
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_lifetime);
        timeout.CancelAfter(_options.FetchingTimeout);
        RemoteBlob blob;
        try
        {
            blob = await _registry.OpenBlobAsync(imageRef, digest, urls, timeout.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is RegistryException or OperationCanceledException or HttpRequestException or IOException)
        {
            throw new LayerResolveException($"layer {digest} of {imageRef}: {e.Message}", e, FallbackReasons.OfRegistryFailure(e));
        }
        var fetcher = new RemoteBlobFetcher(blob);
        // A big TOC over a slow link keeps arriving: bounded by the time without progress, not the total.
        using var stalled = new ProgressDeadline(_lifetime, _options.FetchingTimeout, () => fetcher.ReceivedBytes);
        try
        {
            // The digest policy is applied by the mount; here the TOC is fetched and its digest computed.
            var toc = await LayerResolver.ResolveAsync(fetcher, digest, null, _options with { AllowNoVerification = true }, stalled.Token)
                .ConfigureAwait(false);
            if (_tocs != null && toc.TocJson != null)
            {
                try
                {
                    _cache.Budget.MakeRoom(toc.TocJson.Length);
                    _tocs.Save(digest, fetcher.Size, toc.Reader, toc.TocJson);
                    var tocPath = _tocs.PathFor(digest);
                    _cache.Budget.Added(CacheFileKind.Toc, tocPath, tocPath, new FileInfo(tocPath).Length);
                    _cache.Disk.WriteSucceeded();
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    _cache.Disk.WriteFailed($"the TOC of layer {digest} (a restart will fetch it again)", e);
                }
            }
            return new Resolved(fetcher, toc with { TocJson = null }, DateTime.UtcNow);
        }
        catch (Exception e) when (e is RegistryException or OperationCanceledException or HttpRequestException or IOException)
        {
            throw new LayerResolveException($"layer {digest} of {imageRef}: fetching the TOC failed: {e.Message}", e, FallbackReasons.OfRegistryFailure(e));
        }
    }

    /// <summary>Starts resolving the other layers named in <paramref name="source"/> (errors are kept for their own mounts).</summary>
    public void ResolveAhead(ImageReference imageRef, string digest, LayerSource source)
    {
        var all = source.Layers;
        for (var i = 0; i < all.Length; i++)
        {
            var d = all[i];
            // The label may be cut short; only complete digests are used.
            if (d == digest || !d.StartsWith("sha256:", StringComparison.Ordinal) || d.Length != 71) continue;
            // urls.N goes with the N-th digest of the layers label (as rpull and containerd set them).
            var t = ResolveAsync(imageRef, d, source.LayerUrls[i], _lifetime);
            _ = t.ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
        }
    }
}
