using System.Buffers;
using System.Security.Cryptography;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Registry;

/// <summary>
/// The distribution client: resolves references to manifests and opens blobs for ranged reads; pushes (RegistryPusher.cs).
/// Requests go through its <see cref="RegistryTransport"/> (endpoints, auth, retries, counters).
/// Thread-safe; keep one per process (it owns a connection pool per endpoint config).
/// </summary>
public sealed class RegistryClient : IDisposable
{
    private readonly RegistryTransport _transport;
    private readonly RegistryPusher _pusher;

    /// <summary>In-flight shared range reads (single-flight), guarded by locking the dictionary itself.</summary>
    internal Dictionary<FlightKey, Flight> Flights { get; } = new();

    public RegistryHostsConfig Hosts => _transport.Hosts;
    public ICredentialProvider Credentials => _transport.Credentials;
    internal ILogger Logger => _transport.Logger;
    internal BlobOptions Blob => _transport.Blob;

    /// <summary>HTTP requests sent by this client (all hosts, including token requests and retries).</summary>
    public long RequestCount => _transport.RequestCount;
    /// <summary>Blob body bytes received by this client.</summary>
    public long BytesFetched => _transport.BytesFetched;
    /// <summary>Requests abandoned because they received nothing for the stall timeout.</summary>
    public long StallCount => _transport.StallCount;
    /// <summary>Requests tried again after a failure (any endpoint).</summary>
    public long RetryCount => _transport.RetryCount;

    public RegistryClient(RegistryHostsConfig? hosts = null, ICredentialProvider? credentials = null, ILogger? logger = null)
    {
        _transport = new RegistryTransport(hosts ?? new RegistryHostsConfig(), credentials ?? new StaticCredentialProvider(),
            logger ?? NullLogger.Instance);
        _pusher = new RegistryPusher(_transport);
    }

    internal static string PullScope(ImageReference r) => $"repository:{r.Repository}:pull";

    // ---------------------------------------------------------------- manifests

    /// <summary>
    /// Resolves <paramref name="reference"/> to an image manifest. For an index or manifest list the entry
    /// matching <paramref name="platform"/> (default: this machine) is fetched. Verifies digests.
    /// </summary>
    public async Task<ResolvedManifest> ResolveAsync(ImageReference reference, Platform? platform = null, CancellationToken ct = default)
    {
        var (bytes, mediaType, host) = await FetchManifestAsync(reference, reference.ManifestReference, ct).ConfigureAwait(false);
        var digest = Digest.Sha256Of(bytes.Span).ToString();
        var m = ManifestParser.Parse(bytes.Span, reference.ToString(), host);
        mediaType = ResolveMediaType(mediaType, m);
        string? indexDigest = null;
        Platform? selected = null;
        if (MediaTypes.IsIndex(mediaType))
        {
            var want = platform ?? Platform.Current;
            Descriptor? pick = null;
            if (m.Manifests is not null)
                foreach (var d in m.Manifests)
                {
                    if (!MediaTypes.IsManifest(d.MediaType) && d.MediaType.Length != 0) continue;
                    if (d.Platform is null || want.Matches(d.Platform.ToPlatform())) { pick = d; break; }
                }
            if (pick is null)
                throw new NotFoundException($"index {reference} ({digest}) from {host} has no manifest for platform {want}", host, reference.ToString());
            indexDigest = digest;
            selected = pick.Platform?.ToPlatform();
            (bytes, mediaType, host) = await FetchManifestAsync(reference, pick.Digest, ct).ConfigureAwait(false);
            digest = Digest.Sha256Of(bytes.Span).ToString();
            m = ManifestParser.Parse(bytes.Span, reference.ToString(), host);
            mediaType = ResolveMediaType(mediaType, m);
            if (pick.Size != 0 && pick.Size != bytes.Length)
                throw new DigestMismatchException($"manifest {pick.Digest} of {reference} from {host}: index says {pick.Size} bytes, got {bytes.Length}", host, reference.ToString());
        }
        if (!MediaTypes.IsManifest(mediaType))
            throw new RegistryException($"{reference} from {host} is a {mediaType}, not an image manifest (only OCI and Docker schema 2 are supported)",
                host: host, subject: reference.ToString());
        if (m.Config is null || string.IsNullOrEmpty(m.Config.Digest))
            throw new RegistryException($"manifest {digest} of {reference} from {host} has no config", host: host, subject: reference.ToString());
        return new ResolvedManifest
        {
            Reference = reference,
            Digest = digest,
            MediaType = mediaType,
            Config = m.Config,
            Layers = (IReadOnlyList<Descriptor>?)m.Layers ?? [],
            Annotations = m.Annotations,
            IndexDigest = indexDigest,
            Platform = selected,
            Raw = bytes,
            ServedBy = host,
        };
    }

    /// <summary>HEAD on the manifest: its digest, size and media type without downloading it.</summary>
    public Task<Descriptor> HeadManifestAsync(ImageReference reference, CancellationToken ct = default)
    {
        var eps = _transport.EndpointsFor(reference.Host);
        var scope = PullScope(reference);
        var subject = reference.ToString();
        return _transport.OnEndpointsAsync(eps, 0, subject, async (ep, a) =>
        {
            using var resp = await _transport.SendAsync(ep, () =>
            {
                var r = new HttpRequestMessage(HttpMethod.Head, ep.Url(reference.Repository, "manifests", reference.ManifestReference));
                r.Headers.Accept.ParseAdd(MediaTypes.ManifestAccept);
                return r;
            }, scope, subject, a.Token, reference).ConfigureAwait(false);
            a.Progress();
            RegistryTransport.ThrowForStatus(resp, ep.Host, subject);
            var digest = resp.Headers.TryGetValues("Docker-Content-Digest", out var v) ? v.FirstOrDefault() : null;
            if (string.IsNullOrEmpty(digest))
            {
                if (reference.Digest is null)
                    throw new RegistryException($"{ep.Host} sent no Docker-Content-Digest for HEAD {subject}", resp.StatusCode, ep.Host, subject);
                digest = reference.Digest;
            }
            return new Descriptor
            {
                Digest = digest,
                MediaType = resp.Content.Headers.ContentType?.MediaType ?? "",
                Size = resp.Content.Headers.ContentLength ?? 0,
            };
        }, ct);
    }

    /// <summary>Fetches a manifest by tag or digest; verifies the digest when one is asked for.</summary>
    public async Task<(ReadOnlyMemory<byte> Bytes, string MediaType, string Host)> FetchManifestAsync(ImageReference repo, string tagOrDigest, CancellationToken ct = default)
    {
        var eps = _transport.EndpointsFor(repo.Host);
        var scope = PullScope(repo);
        var subject = $"{repo.Name}@{tagOrDigest}";
        var max = Blob.MaxManifestBytes;
        return await _transport.OnEndpointsAsync(eps, 0, subject, async (ep, a) =>
        {
            using var resp = await _transport.SendAsync(ep, () =>
            {
                var r = new HttpRequestMessage(HttpMethod.Get, ep.Url(repo.Repository, "manifests", tagOrDigest));
                r.Headers.Accept.ParseAdd(MediaTypes.ManifestAccept);
                return r;
            }, scope, subject, a.Token, repo).ConfigureAwait(false);
            a.Progress();
            RegistryTransport.ThrowForStatus(resp, ep.Host, subject);
            var bytes = await ReadLimitedAsync(resp, max, ep.Host, subject, a).ConfigureAwait(false);
            if (tagOrDigest.Contains(':'))
            {
                var got = Digest.Sha256Of(bytes).ToString();
                if (got != tagOrDigest)
                    throw new DigestMismatchException($"manifest {subject} from {ep.Host} has digest {got}", ep.Host, subject);
            }
            return ((ReadOnlyMemory<byte>)bytes, resp.Content.Headers.ContentType?.MediaType ?? "", ep.Host);
        }, ct).ConfigureAwait(false);
    }

    /// <summary>Downloads a small blob (an image config) whole, verified against its digest.</summary>
    public async Task<byte[]> FetchBlobBytesAsync(ImageReference repo, string digest, int maxBytes = 16 << 20, CancellationToken ct = default)
    {
        var blob = await OpenBlobAsync(repo, digest, ct).ConfigureAwait(false);
        if (blob.Size > maxBytes)
            throw new RegistryException($"blob {digest} of {repo.Name} is {blob.Size} bytes, more than the {maxBytes} allowed", host: blob.Host, subject: digest);
        var buf = new byte[blob.Size];
        await blob.ReadAtAsync(0, buf, ct).ConfigureAwait(false);
        if (Digest.Parse(digest) is { IsSha256: true } want && !want.Matches(buf))
            throw new DigestMismatchException($"blob {digest} of {repo.Name} from {blob.Host} does not match its digest", blob.Host, digest);
        return buf;
    }

    /// <summary>Finds the blob (HEAD, mirrors first) and returns a handle for ranged reads.</summary>
    public async Task<RemoteBlob> OpenBlobAsync(ImageReference repoRef, string digest, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(repoRef);
        _ = repoRef.WithDigest(digest); // validates the digest
        var eps = _transport.EndpointsFor(repoRef.Host);
        var scope = PullScope(repoRef);
        var subject = $"{repoRef.Name}@{digest}";
        var found = await _transport.OnEndpointsAsync(eps, 0, subject, async (ep, a) =>
        {
            var url = ep.Url(repoRef.Repository, "blobs", digest);
            using var resp = await _transport.SendAsync(ep, () => new HttpRequestMessage(HttpMethod.Head, url), scope, subject, a.Token, repoRef).ConfigureAwait(false);
            a.Progress();
            if (RegistryTransport.IsRedirect(resp.StatusCode) && resp.Headers.Location is { } loc)
            {
                var (size, final) = await _transport.SizeAtRedirectAsync(ep, new Uri(new Uri(url), loc), subject, a.Token, a.Progress).ConfigureAwait(false);
                return (ep: ep, size: size, redirect: (string?)final);
            }
            RegistryTransport.ThrowForStatus(resp, ep.Host, subject);
            var length = resp.Content.Headers.ContentLength
                ?? throw new RegistryException($"{ep.Host} sent no Content-Length for HEAD {subject}", resp.StatusCode, ep.Host, subject);
            return (ep: ep, size: length, redirect: (string?)null);
        }, ct).ConfigureAwait(false);
        var index = 0;
        while (!ReferenceEquals(eps[index], found.ep)) index++;
        return new RemoteBlob(_transport, Flights, repoRef, digest, found.size, eps, index, scope, found.redirect);
    }

    /// <summary>
    /// Opens the blob at the first of <paramref name="urls"/> that answers (the layer descriptor's <c>urls</c>, as
    /// containerd passes them in the <c>containerd.io/snapshot/remote/urls</c> label: a CDN, a foreign layer's home),
    /// else through the registry. A URL is used like a registry's redirect: ranged GETs without the registry's
    /// credentials; when it fails later the registry (its mirrors, then the origin) takes over.
    /// </summary>
    public async Task<RemoteBlob> OpenBlobAsync(ImageReference repoRef, string digest, IReadOnlyList<string> urls, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(repoRef);
        ArgumentNullException.ThrowIfNull(urls);
        if (urls.Count == 0) return await OpenBlobAsync(repoRef, digest, ct).ConfigureAwait(false);
        _ = repoRef.WithDigest(digest);
        var eps = _transport.EndpointsFor(repoRef.Host);
        var subject = $"{repoRef.Name}@{digest}";
        foreach (var u in urls)
        {
            if (!Uri.TryCreate(u, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            {
                Logger.LogWarning("blob {Subject}: URL \"{Url}\" is not an http(s) URL; ignored", subject, u);
                continue;
            }
            // Bounded like one registry request; the URL is only a preference, the registry remains.
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
            timeout.CancelAfter(Hosts.Blob.FetchingTimeout);
            try
            {
                var (size, final) = await _transport.SizeAtRedirectAsync(eps[0], uri, subject, timeout.Token).ConfigureAwait(false);
                Logger.LogInformation("blob {Subject}: served from its URL {Host} ({Size} bytes)", subject, uri.Authority, size);
                return new RemoteBlob(_transport, Flights, repoRef, digest, size, eps, 0, PullScope(repoRef), final);
            }
            catch (Exception e) when (!ct.IsCancellationRequested && e is RegistryException or HttpRequestException or IOException or OperationCanceledException)
            {
                Logger.LogInformation("blob {Subject}: URL {Host} failed ({Error}); trying the next, then the registry", subject, uri.Authority, e.Message);
            }
        }
        return await OpenBlobAsync(repoRef, digest, ct).ConfigureAwait(false);
    }

    private static string ResolveMediaType(string header, ManifestJson m)
    {
        if (MediaTypes.IsIndex(header) || MediaTypes.IsManifest(header)) return header;
        if (!string.IsNullOrEmpty(m.MediaType)) return m.MediaType;
        // OCI allows mediaType to be absent: tell index from manifest by shape.
        return m.Manifests is not null ? MediaTypes.OciIndex : MediaTypes.OciManifest;
    }

    private static async Task<byte[]> ReadLimitedAsync(HttpResponseMessage resp, int max, string host, string subject, Attempt a)
    {
        var ct = a.Token;
        if (resp.Content.Headers.ContentLength is long cl && cl > max)
            throw new RegistryException($"{subject} from {host} is {cl} bytes, more than the {max} allowed", resp.StatusCode, host, subject);
        await using var s = await resp.Content.ReadAsStreamAsync(ct).ConfigureAwait(false);
        using var ms = new MemoryStream();
        var buf = new byte[16384];
        int n;
        while ((n = await s.ReadAsync(buf, ct).ConfigureAwait(false)) > 0)
        {
            a.Progress();
            if (ms.Length + n > max)
                throw new RegistryException($"{subject} from {host} is more than the {max} bytes allowed", resp.StatusCode, host, subject);
            ms.Write(buf, 0, n);
        }
        return ms.ToArray();
    }
    /// <summary>
    /// Downloads a whole blob into <paramref name="destination"/> (ranged reads of 8 MiB with the client's retries,
    /// mirrors and redirects), verifying its sha256 digest. Returns the size.
    /// </summary>
    public async Task<long> DownloadBlobAsync(ImageReference repo, string digest, Stream destination, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(destination);
        var blob = await OpenBlobAsync(repo, digest, ct).ConfigureAwait(false);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buf = ArrayPool<byte>.Shared.Rent(8 << 20);
        try
        {
            for (long off = 0; off < blob.Size;)
            {
                var n = (int)Math.Min(8 << 20, blob.Size - off);
                await blob.ReadAtAsync(off, buf.AsMemory(0, n), ct).ConfigureAwait(false);
                hash.AppendData(buf, 0, n);
                await destination.WriteAsync(buf.AsMemory(0, n), ct).ConfigureAwait(false);
                off += n;
            }
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
        var got = Digest.FromSha256(hash).ToString();
        if (Digest.Parse(digest).IsSha256 && got != digest)
            throw new DigestMismatchException($"blob {digest} of {repo.Name} from {blob.Host} has digest {got}", blob.Host, digest);
        return blob.Size;
    }

    // ---------------------------------------------------------------- push (RegistryPusher.cs)

    /// <summary>HEAD on a blob in <paramref name="repo"/>'s repository: its size, or null when the registry does not have it there.</summary>
    public Task<long?> StatBlobAsync(ImageReference repo, string digest, CancellationToken ct = default)
        => _pusher.StatBlobAsync(repo, digest, ct);

    /// <summary>True when the registry has <paramref name="digest"/> in <paramref name="repo"/>'s repository.</summary>
    public Task<bool> BlobExistsAsync(ImageReference repo, string digest, CancellationToken ct = default)
        => _pusher.BlobExistsAsync(repo, digest, ct);

    /// <summary>
    /// Uploads the rest of <paramref name="content"/> as a blob of <paramref name="repo"/>'s repository.
    /// With a known <paramref name="digest"/> and a seekable stream: one PUT streamed from the stream (re-read on retry).
    /// Otherwise: PATCH chunks of <see cref="BlobPushOptions.ChunkSize"/> then PUT ?digest= with the digest computed on
    /// the way. Either way the bytes sent are hashed and must match <paramref name="digest"/> when one is given
    /// (<see cref="DigestMismatchException"/>); <paramref name="size"/>, when given, must match too.
    /// </summary>
    public Task<BlobPushResult> PushBlobAsync(ImageReference repo, Stream content, string? digest = null, long? size = null,
        BlobPushOptions? options = null, CancellationToken ct = default)
        => _pusher.PushBlobAsync(repo, content, digest, size, options, ct);

    /// <summary>Uploads a blob held in memory (configs, small layers).</summary>
    public Task<BlobPushResult> PushBlobAsync(ImageReference repo, ReadOnlyMemory<byte> data, BlobPushOptions? options = null, CancellationToken ct = default)
        => _pusher.PushBlobAsync(repo, data, options, ct);

    /// <summary>
    /// Asks the registry to link <paramref name="digest"/> from <paramref name="fromRepository"/> (same registry) into
    /// <paramref name="target"/>'s repository. True when it did (201); false when it would not (it then opened an upload,
    /// which is cancelled here) — upload the blob instead.
    /// </summary>
    public Task<bool> MountBlobAsync(ImageReference target, string digest, string fromRepository, CancellationToken ct = default)
        => _pusher.MountBlobAsync(target, digest, fromRepository, ct);

    /// <summary>
    /// PUTs a manifest (or index) under <paramref name="tagOrDigest"/> (default: the reference's tag, else its digest)
    /// with <paramref name="mediaType"/> as Content-Type. Returns the manifest's digest (checked against the registry's
    /// Docker-Content-Digest).
    /// </summary>
    public Task<string> PushManifestAsync(ImageReference target, ReadOnlyMemory<byte> manifest, string mediaType, string? tagOrDigest = null,
        CancellationToken ct = default)
        => _pusher.PushManifestAsync(target, manifest, mediaType, tagOrDigest, ct);

    public void Dispose() => _transport.Dispose();
}
