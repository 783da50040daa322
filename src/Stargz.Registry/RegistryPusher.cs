using System.Buffers;
using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using Microsoft.Extensions.Logging;

namespace Stargz.Registry;

/// <summary>How blobs are uploaded.</summary>
public sealed record BlobPushOptions
{
    /// <summary>Size of each PATCH of a chunked upload (the one buffer a chunked upload holds).</summary>
    public int ChunkSize { get; init; } = 8 << 20;
    /// <summary>Always upload in PATCH chunks, even when the digest is known and the stream seekable.</summary>
    public bool ForceChunked { get; init; }
    /// <summary>HEAD first and skip the upload when the registry already has the blob (needs a known digest).</summary>
    public bool SkipExisting { get; init; } = true;
    /// <summary>Limit for one upload request (a whole monolithic PUT); default 30 minutes.</summary>
    public TimeSpan RequestTimeout { get; init; } = TimeSpan.FromMinutes(30);
}

/// <summary>What a push did for one blob.</summary>
public sealed record BlobPushResult(string Digest, long Size, BlobPushOutcome Outcome);

public enum BlobPushOutcome
{
    /// <summary>The registry already had it; nothing was sent.</summary>
    Existed,
    /// <summary>Mounted from another repository of the same registry.</summary>
    Mounted,
    /// <summary>Sent with one PUT.</summary>
    UploadedMonolithic,
    /// <summary>Sent in PATCH chunks, then a closing PUT.</summary>
    UploadedChunked,
}

/// <summary>
/// The push side of the distribution API, behind <see cref="RegistryClient"/>'s push methods: blob HEAD, uploads
/// (monolithic and chunked), cross-repository mounts, manifest PUT. Always to the origin, never a mirror; requests go
/// through the client's <see cref="RegistryTransport"/>.
/// </summary>
internal sealed class RegistryPusher(RegistryTransport transport)
{
    private readonly RegistryTransport _transport = transport;
    private BlobOptions Blob => _transport.Blob;
    private ILogger Logger => _transport.Logger;

    internal static string PushScope(ImageReference r) => $"repository:{r.Repository}:pull,push";

    /// <summary>The endpoint pushes go to: the origin (the last endpoint), never a pull-through mirror.</summary>
    private Endpoint PushEndpoint(ImageReference r)
    {
        var eps = _transport.EndpointsFor(r.Host);
        return eps[^1];
    }

    /// <summary>HEAD on a blob in <paramref name="repo"/>'s repository: its size, or null when the registry does not have it there.</summary>
    public Task<long?> StatBlobAsync(ImageReference repo, string digest, CancellationToken ct = default)
        => StatBlobAsync(repo, digest, RegistryClient.PullScope(repo), ct);

    // The push path asks with the push scope, so a push needs one token, not two.
    public async Task<long?> StatBlobAsync(ImageReference repo, string digest, string scope, CancellationToken ct)
    {
        ArgumentNullException.ThrowIfNull(repo);
        _ = repo.WithDigest(digest);
        var ep = PushEndpoint(repo);
        var subject = $"{repo.Name}@{digest}";
        return await _transport.RetryAsync(ep, subject, async (e, tct) =>
        {
            using var resp = await _transport.SendAsync(e, () => new HttpRequestMessage(HttpMethod.Head, e.Url(repo.Repository, "blobs", digest)), scope, subject, tct)
                .ConfigureAwait(false);
            if (resp.StatusCode == HttpStatusCode.NotFound) return (long?)null;
            // The redirect answer's Content-Length is its own (empty) body's: the size is at the target.
            if (RegistryTransport.IsRedirect(resp.StatusCode) && resp.Headers.Location is { } loc)
                return (await _transport.SizeAtRedirectAsync(e, new Uri(new Uri(e.Url(repo.Repository, "blobs", digest)), loc), subject, tct).ConfigureAwait(false)).Size;
            RegistryTransport.ThrowForStatus(resp, e.Host, subject);
            return resp.Content.Headers.ContentLength ?? -1;
        }, ep.RequestTimeout ?? Blob.FetchingTimeout, failFastOnConnect: false, ct).ConfigureAwait(false);
    }

    /// <summary>True when the registry has <paramref name="digest"/> in <paramref name="repo"/>'s repository.</summary>
    public async Task<bool> BlobExistsAsync(ImageReference repo, string digest, CancellationToken ct = default)
        => await StatBlobAsync(repo, digest, ct).ConfigureAwait(false) is not null;

    /// <summary>
    /// Uploads the rest of <paramref name="content"/> as a blob of <paramref name="repo"/>'s repository.
    /// With a known <paramref name="digest"/> and a seekable stream: one PUT streamed from the stream (re-read on retry).
    /// Otherwise: PATCH chunks of <see cref="BlobPushOptions.ChunkSize"/> then PUT ?digest= with the digest computed on
    /// the way. Either way the bytes sent are hashed and must match <paramref name="digest"/> when one is given
    /// (<see cref="DigestMismatchException"/>); <paramref name="size"/>, when given, must match too.
    /// </summary>
    public async Task<BlobPushResult> PushBlobAsync(ImageReference repo, Stream content, string? digest = null, long? size = null,
        BlobPushOptions? options = null, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(repo);
        ArgumentNullException.ThrowIfNull(content);
        options ??= new BlobPushOptions();
        if (options.ChunkSize <= 0) throw new ArgumentOutOfRangeException(nameof(options), "chunk size must be positive");
        if (digest is not null)
        {
            _ = repo.WithDigest(digest);
            if (!Digest.Parse(digest).IsSha256)
                throw new ArgumentException($"only sha256 digests can be pushed, not {digest}", nameof(digest));
            if (options.SkipExisting && await StatBlobAsync(repo, digest, PushScope(repo), ct).ConfigureAwait(false) is long have && (size is null || have < 0 || have == size))
                return new BlobPushResult(digest, have >= 0 ? have : size ?? -1, BlobPushOutcome.Existed);
        }
        if (digest is not null && content.CanSeek && !options.ForceChunked)
            return await PushMonolithicAsync(repo, content, digest, size ?? content.Length - content.Position, options, ct).ConfigureAwait(false);
        return await PushChunkedAsync(repo, content, digest, size, options, ct).ConfigureAwait(false);
    }

    /// <summary>Uploads a blob held in memory (configs, small layers).</summary>
    public async Task<BlobPushResult> PushBlobAsync(ImageReference repo, ReadOnlyMemory<byte> data, BlobPushOptions? options = null, CancellationToken ct = default)
    {
        var digest = Digest.Sha256Of(data.Span).ToString();
        using var ms = new MemoryStream(data.ToArray(), writable: false);
        return await PushBlobAsync(repo, ms, digest, data.Length, options, ct).ConfigureAwait(false);
    }

    /// <summary>
    /// Asks the registry to link <paramref name="digest"/> from <paramref name="fromRepository"/> (same registry) into
    /// <paramref name="target"/>'s repository. True when it did (201); false when it would not (it then opened an upload,
    /// which is cancelled here) — upload the blob instead.
    /// </summary>
    public async Task<bool> MountBlobAsync(ImageReference target, string digest, string fromRepository, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(target);
        _ = target.WithDigest(digest);
        if (fromRepository == target.Repository) return await BlobExistsAsync(target, digest, ct).ConfigureAwait(false);
        var ep = PushEndpoint(target);
        var subject = $"{target.Name}@{digest} (mount from {fromRepository})";
        var scope = $"{PushScope(target)} repository:{fromRepository}:pull";
        var url = $"{ep.BaseUrl}/{target.Repository}/blobs/uploads/?mount={Uri.EscapeDataString(digest)}&from={Uri.EscapeDataString(fromRepository)}";
        return await _transport.RetryAsync(ep, subject, async (e, tct) =>
        {
            using var resp = await _transport.SendAsync(e, () => new HttpRequestMessage(HttpMethod.Post, url) { Content = Empty() }, scope, subject, tct).ConfigureAwait(false);
            if (resp.StatusCode == HttpStatusCode.Created) return true;
            if (resp.StatusCode == HttpStatusCode.Accepted)
            {
                if (resp.Headers.Location is { } loc) await CancelUploadAsync(e, Resolve(e, loc), scope, subject, tct).ConfigureAwait(false);
                return false;
            }
            await ThrowUploadErrorAsync(resp, e.Host, subject, tct).ConfigureAwait(false);
            return false;
        }, ep.RequestTimeout ?? Blob.FetchingTimeout, failFastOnConnect: false, ct).ConfigureAwait(false);
    }

    /// <summary>
    /// PUTs a manifest (or index) under <paramref name="tagOrDigest"/> (default: the reference's tag, else its digest)
    /// with <paramref name="mediaType"/> as Content-Type. Returns the manifest's digest (checked against the registry's
    /// Docker-Content-Digest).
    /// </summary>
    public async Task<string> PushManifestAsync(ImageReference target, ReadOnlyMemory<byte> manifest, string mediaType, string? tagOrDigest = null,
        CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(target);
        ArgumentException.ThrowIfNullOrEmpty(mediaType);
        if (manifest.Length > Blob.MaxManifestBytes)
            throw new RegistryException($"manifest for {target} is {manifest.Length} bytes, more than the {Blob.MaxManifestBytes} registries accept",
                host: target.Host, subject: target.ToString());
        var digest = Digest.Sha256Of(manifest.Span).ToString();
        var reference = tagOrDigest ?? target.Tag ?? target.Digest ?? digest;
        if (reference.Contains(':') && reference != digest)
            throw new DigestMismatchException($"manifest pushed as {target.Name}@{reference} has digest {digest}", target.Host, target.ToString());
        var ep = PushEndpoint(target);
        var subject = $"{target.Name}:{reference}";
        var scope = PushScope(target);
        var bytes = manifest.ToArray();
        await _transport.RetryAsync(ep, subject, async (e, tct) =>
        {
            using var resp = await _transport.SendAsync(e, () =>
            {
                var c = new ByteArrayContent(bytes);
                c.Headers.ContentType = new MediaTypeHeaderValue(mediaType);
                return new HttpRequestMessage(HttpMethod.Put, e.Url(target.Repository, "manifests", reference)) { Content = c };
            }, scope, subject, tct).ConfigureAwait(false);
            if (!resp.IsSuccessStatusCode) await ThrowUploadErrorAsync(resp, e.Host, subject, tct).ConfigureAwait(false);
            if (resp.Headers.TryGetValues("Docker-Content-Digest", out var v) && v.FirstOrDefault() is { Length: > 0 } served && served != digest)
                throw new DigestMismatchException($"{e.Host} stored manifest {subject} as {served}, we sent {digest}", e.Host, subject);
            return true;
        }, ep.RequestTimeout ?? Blob.FetchingTimeout, failFastOnConnect: false, ct).ConfigureAwait(false);
        Logger.LogDebug("pushed manifest {Subject} ({Digest}, {MediaType})", subject, digest, mediaType);
        return digest;
    }

    // ---------------------------------------------------------------- uploads

    private async Task<BlobPushResult> PushMonolithicAsync(ImageReference repo, Stream content, string digest, long size, BlobPushOptions o,
        CancellationToken ct)
    {
        var ep = PushEndpoint(repo);
        var subject = $"{repo.Name}@{digest}";
        var scope = PushScope(repo);
        var start = content.Position;
        if (content.Length - start < size)
            throw new ArgumentException($"stream holds {content.Length - start} bytes, blob {digest} is said to be {size}", nameof(content));
        await _transport.RetryAsync(ep, subject, async (e, tct) =>
        {
            var location = await StartUploadAsync(e, repo, scope, subject, tct).ConfigureAwait(false);
            HashingContent? body = null;
            using var resp = await _transport.SendAsync(e, () =>
            {
                body = new HashingContent(content, start, size);
                body.Headers.ContentType = new MediaTypeHeaderValue("application/octet-stream");
                body.Headers.ContentLength = size;
                return new HttpRequestMessage(HttpMethod.Put, WithQuery(location, "digest", digest)) { Content = body };
            }, scope, subject, tct).ConfigureAwait(false);
            var sent = body!.Finish();
            if (sent is not null && sent != digest)
                throw new DigestMismatchException($"blob pushed as {subject} has digest {sent}", e.Host, subject);
            if (resp.StatusCode != HttpStatusCode.Created) await ThrowUploadErrorAsync(resp, e.Host, subject, tct).ConfigureAwait(false);
            return true;
        }, o.RequestTimeout, failFastOnConnect: false, ct).ConfigureAwait(false);
        content.Position = start + size;
        Logger.LogDebug("pushed blob {Subject} ({Size} bytes) in one PUT", subject, size);
        return new BlobPushResult(digest, size, BlobPushOutcome.UploadedMonolithic);
    }

    private async Task<BlobPushResult> PushChunkedAsync(ImageReference repo, Stream content, string? expected, long? size, BlobPushOptions o,
        CancellationToken ct)
    {
        var ep = PushEndpoint(repo);
        var subject = $"{repo.Name}@{expected ?? "(new blob)"}";
        var scope = PushScope(repo);
        var timeout = ep.RequestTimeout ?? Blob.FetchingTimeout;
        var location = await _transport.RetryAsync(ep, subject, (e, tct) => StartUploadAsync(e, repo, scope, subject, tct), timeout, false, ct).ConfigureAwait(false);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buf = ArrayPool<byte>.Shared.Rent(o.ChunkSize);
        long offset = 0;
        var committed = false;
        try
        {
            while (true)
            {
                var n = 0;
                while (n < o.ChunkSize)
                {
                    var r = await content.ReadAsync(buf.AsMemory(n, o.ChunkSize - n), ct).ConfigureAwait(false);
                    if (r == 0) break;
                    n += r;
                }
                if (n == 0) break;
                hash.AppendData(buf, 0, n);
                var from = offset;
                var loc = location;
                location = await _transport.RetryAsync(ep, subject, async (e, tct) =>
                {
                    using var resp = await _transport.SendAsync(e, () =>
                    {
                        var c = new ByteArrayContent(buf, 0, n);
                        c.Headers.ContentType = new MediaTypeHeaderValue("application/octet-stream");
                        c.Headers.ContentLength = n;
                        var req = new HttpRequestMessage(HttpMethod.Patch, loc) { Content = c };
                        // distribution wants "start-end" (inclusive) without the "bytes " unit.
                        req.Content.Headers.TryAddWithoutValidation("Content-Range", $"{from}-{from + n - 1}");
                        return req;
                    }, scope, subject, tct).ConfigureAwait(false);
                    if (resp.StatusCode != HttpStatusCode.Accepted) await ThrowUploadErrorAsync(resp, e.Host, subject, tct).ConfigureAwait(false);
                    return resp.Headers.Location is { } next ? Resolve(e, next) : loc;
                }, o.RequestTimeout, false, ct).ConfigureAwait(false);
                offset += n;
                if (n < o.ChunkSize) break;
            }
            var digest = Digest.FromSha256(hash).ToString();
            if (expected is not null && digest != expected)
                throw new DigestMismatchException($"blob pushed as {repo.Name}@{expected} has digest {digest}", ep.Host, subject);
            if (size is long want && want != offset)
                throw new DigestMismatchException($"blob {digest} pushed to {repo.Name} is {offset} bytes, expected {want}", ep.Host, subject);
            subject = $"{repo.Name}@{digest}";
            var final = location;
            await _transport.RetryAsync(ep, subject, async (e, tct) =>
            {
                using var resp = await _transport.SendAsync(e, () => new HttpRequestMessage(HttpMethod.Put, WithQuery(final, "digest", digest)) { Content = Empty() },
                    scope, subject, tct).ConfigureAwait(false);
                if (resp.StatusCode != HttpStatusCode.Created) await ThrowUploadErrorAsync(resp, e.Host, subject, tct).ConfigureAwait(false);
                return true;
            }, timeout, false, ct).ConfigureAwait(false);
            committed = true;
            Logger.LogDebug("pushed blob {Subject} ({Size} bytes) in chunks", subject, offset);
            return new BlobPushResult(digest, offset, BlobPushOutcome.UploadedChunked);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buf);
            if (!committed)
            {
                // Best effort: do not leave a dangling upload session behind (also after cancellation).
                try
                {
                    using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
                    await CancelUploadAsync(ep, location, scope, subject, cts.Token).ConfigureAwait(false);
                }
                catch (Exception e) when (e is HttpRequestException or OperationCanceledException or RegistryException or IOException)
                {
                    Logger.LogDebug("could not cancel upload of {Subject}: {Error}", subject, e.Message);
                }
            }
        }
    }

    private async Task<string> StartUploadAsync(Endpoint e, ImageReference repo, string scope, string subject, CancellationToken ct)
    {
        using var resp = await _transport.SendAsync(e, () => new HttpRequestMessage(HttpMethod.Post, $"{e.BaseUrl}/{repo.Repository}/blobs/uploads/") { Content = Empty() },
            scope, subject, ct).ConfigureAwait(false);
        if (resp.StatusCode != HttpStatusCode.Accepted) await ThrowUploadErrorAsync(resp, e.Host, subject, ct).ConfigureAwait(false);
        var loc = resp.Headers.Location
            ?? throw new RegistryException($"{e.Host} started an upload for {subject} without a Location", resp.StatusCode, e.Host, subject);
        return Resolve(e, loc);
    }

    private async Task CancelUploadAsync(Endpoint e, string location, string scope, string subject, CancellationToken ct)
    {
        using var resp = await _transport.SendAsync(e, () => new HttpRequestMessage(HttpMethod.Delete, location), scope, subject, ct).ConfigureAwait(false);
    }

    private static ByteArrayContent Empty()
    {
        var c = new ByteArrayContent([]);
        c.Headers.ContentLength = 0;
        return c;
    }

    private static string Resolve(Endpoint e, Uri location)
        => location.IsAbsoluteUri ? location.AbsoluteUri : new Uri(new Uri(e.BaseUrl), location).AbsoluteUri;

    private static string WithQuery(string url, string key, string value)
        => url + (url.Contains('?') ? "&" : "?") + key + "=" + Uri.EscapeDataString(value);

    /// <summary>Like <see cref="RegistryTransport.ThrowForStatus"/>, with the registry's error body (e.g. DIGEST_INVALID) in the message.</summary>
    private static async Task ThrowUploadErrorAsync(HttpResponseMessage resp, string host, string subject, CancellationToken ct)
    {
        var s = resp.StatusCode;
        if ((int)s is >= 200 and < 300)
            throw new RegistryException($"{host} answered {(int)s} {s} for {subject}, which the protocol does not allow here", s, host, subject);
        if (s is HttpStatusCode.NotFound or HttpStatusCode.Unauthorized or HttpStatusCode.Forbidden || (int)s >= 500 || s == HttpStatusCode.TooManyRequests)
            RegistryTransport.ThrowForStatus(resp, host, subject);
        var body = "";
        try
        {
            var bytes = await resp.Content.ReadAsByteArrayAsync(ct).ConfigureAwait(false);
            body = System.Text.Encoding.UTF8.GetString(bytes, 0, Math.Min(bytes.Length, 2048)).Trim();
        }
        catch (HttpRequestException) { }
        if (body.Contains("DIGEST_INVALID", StringComparison.Ordinal))
            throw new DigestMismatchException($"{host} rejected {subject}: digest invalid: {body}", host, subject);
        throw new RegistryException($"{host} answered {(int)s} {s} for {subject}{(body.Length > 0 ? ": " + body : "")}", s, host, subject);
    }

    /// <summary>
    /// The request body of a monolithic PUT: <c>size</c> bytes of <c>source</c> from <c>start</c>, hashed as they are
    /// sent (64 KiB at a time, one pooled buffer). Sent again from <c>start</c> if the handler sends it twice.
    /// </summary>
    private sealed class HashingContent(Stream source, long start, long size) : HttpContent
    {
        private string? _digest;

        /// <summary>The digest of what was sent, when everything was; null if the body was not sent whole.</summary>
        public string? Finish() => _digest;

        protected override Task SerializeToStreamAsync(Stream stream, TransportContext? context)
            => SerializeToStreamAsync(stream, context, CancellationToken.None);

        protected override async Task SerializeToStreamAsync(Stream stream, TransportContext? context, CancellationToken cancellationToken)
        {
            _digest = null;
            source.Position = start;
            using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            var buf = ArrayPool<byte>.Shared.Rent(1 << 16);
            try
            {
                for (var sent = 0L; sent < size;)
                {
                    var n = await source.ReadAsync(buf.AsMemory(0, (int)Math.Min(buf.Length, size - sent)), cancellationToken).ConfigureAwait(false);
                    if (n == 0) throw new EndOfStreamException($"blob stream ended after {sent} of {size} bytes");
                    hash.AppendData(buf, 0, n);
                    await stream.WriteAsync(buf.AsMemory(0, n), cancellationToken).ConfigureAwait(false);
                    sent += n;
                }
            }
            finally { ArrayPool<byte>.Shared.Return(buf); }
            _digest = Digest.FromSha256(hash).ToString();
        }

        protected override bool TryComputeLength(out long length)
        {
            length = size;
            return true;
        }
    }
}
