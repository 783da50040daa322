using System.Collections.Concurrent;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Sockets;
using System.Security.Cryptography;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Registry;

/// <summary>
/// The distribution client: resolves references to manifests and opens blobs for ranged reads.
/// Thread-safe; keep one per process (it owns a connection pool per endpoint config).
/// </summary>
public sealed partial class RegistryClient : IDisposable
{
    private readonly ConcurrentDictionary<string, Endpoint> _endpoints = new(StringComparer.Ordinal);
    // Hosts (endpoint or redirect target) found not to support multi-range requests.
    private readonly ConcurrentDictionary<string, bool> _singleRangeHosts = new(StringComparer.OrdinalIgnoreCase);
    private long _requests;
    private long _bytes;
    private long _stalls;
    private long _retries;
    private bool _disposed;

    /// <summary>In-flight shared range reads (single-flight), guarded by locking the dictionary itself.</summary>
    internal Dictionary<FlightKey, Flight> Flights { get; } = new();

    public RegistryHostsConfig Hosts { get; }
    public ICredentialProvider Credentials { get; }
    internal ILogger Logger { get; }

    /// <summary>HTTP requests sent by this client (all hosts, including token requests and retries).</summary>
    public long RequestCount => Interlocked.Read(ref _requests);
    /// <summary>Blob body bytes received by this client.</summary>
    public long BytesFetched => Interlocked.Read(ref _bytes);
    /// <summary>Requests abandoned because they received nothing for the stall timeout.</summary>
    public long StallCount => Interlocked.Read(ref _stalls);
    /// <summary>Requests tried again after a failure (any endpoint).</summary>
    public long RetryCount => Interlocked.Read(ref _retries);

    public RegistryClient(RegistryHostsConfig? hosts = null, ICredentialProvider? credentials = null, ILogger? logger = null)
    {
        Hosts = hosts ?? new RegistryHostsConfig();
        Credentials = credentials ?? new StaticCredentialProvider();
        Logger = logger ?? NullLogger.Instance;
    }

    internal void CountRequest() => Interlocked.Increment(ref _requests);
    internal void CountBytes(long n) => Interlocked.Add(ref _bytes, n);
    internal BlobOptions Blob => Hosts.Blob;

    internal bool IsSingleRangeHost(string host) => Hosts.Blob.ForceSingleRangeMode || _singleRangeHosts.ContainsKey(host);
    internal void MarkSingleRangeHost(string host)
    {
        if (_singleRangeHosts.TryAdd(host, true))
            Logger.LogInformation("host {Host} does not serve multi-range requests; using single ranges from now on", host);
    }

    internal IReadOnlyList<Endpoint> EndpointsFor(string registryHost)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var cfgs = Hosts.EndpointsFor(registryHost);
        var list = new Endpoint[cfgs.Count];
        for (var i = 0; i < cfgs.Count; i++)
        {
            var c = cfgs[i];
            var key = $"{c.Host}|{c.UsesPlainHttp}|{c.SkipVerify}|{string.Join(',', c.CaFiles)}|{c.ClientCertFile}|{c.ClientKeyFile}|{c.RequestTimeout}|{c.PathPrefix}";
            list[i] = _endpoints.GetOrAdd(key, _ => new Endpoint(c));
        }
        return list;
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
        var digest = Sha256Digest(bytes.Span);
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
            digest = Sha256Digest(bytes.Span);
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
        var eps = EndpointsFor(reference.Host);
        var scope = PullScope(reference);
        var subject = reference.ToString();
        return OnEndpointsAsync(eps, 0, subject, async (ep, a) =>
        {
            using var resp = await SendAsync(ep, () =>
            {
                var r = new HttpRequestMessage(HttpMethod.Head, ep.Url(reference.Repository, "manifests", reference.ManifestReference));
                r.Headers.Accept.ParseAdd(MediaTypes.ManifestAccept);
                return r;
            }, scope, subject, a.Token, reference).ConfigureAwait(false);
            a.Progress();
            ThrowForStatus(resp, ep.Host, subject);
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
        var eps = EndpointsFor(repo.Host);
        var scope = PullScope(repo);
        var subject = $"{repo.Name}@{tagOrDigest}";
        var max = Blob.MaxManifestBytes;
        return await OnEndpointsAsync(eps, 0, subject, async (ep, a) =>
        {
            using var resp = await SendAsync(ep, () =>
            {
                var r = new HttpRequestMessage(HttpMethod.Get, ep.Url(repo.Repository, "manifests", tagOrDigest));
                r.Headers.Accept.ParseAdd(MediaTypes.ManifestAccept);
                return r;
            }, scope, subject, a.Token, repo).ConfigureAwait(false);
            a.Progress();
            ThrowForStatus(resp, ep.Host, subject);
            var bytes = await ReadLimitedAsync(resp, max, ep.Host, subject, a).ConfigureAwait(false);
            if (tagOrDigest.Contains(':'))
            {
                var got = Sha256Digest(bytes);
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
        if (digest.StartsWith("sha256:", StringComparison.Ordinal) && Sha256Digest(buf) != digest)
            throw new DigestMismatchException($"blob {digest} of {repo.Name} from {blob.Host} does not match its digest", blob.Host, digest);
        return buf;
    }

    /// <summary>Finds the blob (HEAD, mirrors first) and returns a handle for ranged reads.</summary>
    public async Task<RemoteBlob> OpenBlobAsync(ImageReference repoRef, string digest, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(repoRef);
        _ = repoRef.WithDigest(digest); // validates the digest
        var eps = EndpointsFor(repoRef.Host);
        var scope = PullScope(repoRef);
        var subject = $"{repoRef.Name}@{digest}";
        var found = await OnEndpointsAsync(eps, 0, subject, async (ep, a) =>
        {
            var url = ep.Url(repoRef.Repository, "blobs", digest);
            using var resp = await SendAsync(ep, () => new HttpRequestMessage(HttpMethod.Head, url), scope, subject, a.Token, repoRef).ConfigureAwait(false);
            a.Progress();
            if (IsRedirect(resp.StatusCode) && resp.Headers.Location is { } loc)
            {
                var (size, final) = await SizeAtRedirectAsync(ep, new Uri(new Uri(url), loc), subject, a.Token, a.Progress).ConfigureAwait(false);
                return (ep: ep, size: size, redirect: (string?)final);
            }
            ThrowForStatus(resp, ep.Host, subject);
            var length = resp.Content.Headers.ContentLength
                ?? throw new RegistryException($"{ep.Host} sent no Content-Length for HEAD {subject}", resp.StatusCode, ep.Host, subject);
            return (ep: ep, size: length, redirect: (string?)null);
        }, ct).ConfigureAwait(false);
        var index = 0;
        while (!ReferenceEquals(eps[index], found.ep)) index++;
        return new RemoteBlob(this, repoRef, digest, found.size, eps, index, scope, found.redirect);
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
        var eps = EndpointsFor(repoRef.Host);
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
                var (size, final) = await SizeAtRedirectAsync(eps[0], uri, subject, timeout.Token).ConfigureAwait(false);
                Logger.LogInformation("blob {Subject}: served from its URL {Host} ({Size} bytes)", subject, uri.Authority, size);
                return new RemoteBlob(this, repoRef, digest, size, eps, 0, PullScope(repoRef), final);
            }
            catch (Exception e) when (!ct.IsCancellationRequested && e is RegistryException or HttpRequestException or IOException or OperationCanceledException)
            {
                Logger.LogInformation("blob {Subject}: URL {Host} failed ({Error}); trying the next, then the registry", subject, uri.Authority, e.Message);
            }
        }
        return await OpenBlobAsync(repoRef, digest, ct).ConfigureAwait(false);
    }

    /// <summary>Redirect hops followed from a registry to where a blob's bytes are (registry -> CDN -> bucket).</summary>
    internal const int MaxRedirects = 5;

    /// <summary>
    /// The size of a blob a registry redirected to <paramref name="target"/> (a storage backend, another origin), and the
    /// URL that finally serves it. HEAD first; a backend that refuses HEAD (S3 URLs presigned for GET answer 403) is asked
    /// for its first byte instead and the size read from Content-Range, as the reference does. The registry's
    /// Authorization is never sent there. The Content-Length of a redirect answer is its own body's, never the blob's.
    /// </summary>
    internal async Task<(long Size, string Url)> SizeAtRedirectAsync(Endpoint ep, Uri target, string subject, CancellationToken ct,
        Action? progress = null)
    {
        HttpStatusCode headStatus = 0;
        for (var hop = 0; hop < MaxRedirects; hop++)
        {
            CountRequest();
            using var head = new HttpRequestMessage(HttpMethod.Head, target);
            using var resp = await ep.Client.SendAsync(head, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
            progress?.Invoke();
            if (IsRedirect(resp.StatusCode) && resp.Headers.Location is { } next)
            {
                target = new Uri(target, next);
                continue;
            }
            if (resp.StatusCode == HttpStatusCode.OK && resp.Content.Headers.ContentLength is long len) return (len, target.AbsoluteUri);
            headStatus = resp.StatusCode;
            break;
        }
        for (var hop = 0; hop < MaxRedirects; hop++)
        {
            CountRequest();
            using var get = new HttpRequestMessage(HttpMethod.Get, target);
            get.Headers.Range = new RangeHeaderValue(0, 0);
            using var resp = await ep.Client.SendAsync(get, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
            progress?.Invoke();
            if (IsRedirect(resp.StatusCode) && resp.Headers.Location is { } next)
            {
                target = new Uri(target, next);
                continue;
            }
            if (resp.StatusCode == HttpStatusCode.PartialContent && resp.Content.Headers.ContentRange?.Length is long total)
                return (total, target.AbsoluteUri);
            if (resp.StatusCode == HttpStatusCode.OK && resp.Content.Headers.ContentLength is long whole)
                return (whole, target.AbsoluteUri);
            ThrowForStatus(resp, target.Authority, subject);
            throw new RegistryException($"redirect target {target.Authority} gave no size for {subject} (HEAD {(int)headStatus}, GET {(int)resp.StatusCode})",
                resp.StatusCode, target.Authority, subject);
        }
        throw new RegistryException($"more than {MaxRedirects} redirects for {subject} from {ep.Host}", host: ep.Host, subject: subject);
    }

    private static string ResolveMediaType(string header, ManifestJson m)
    {
        if (MediaTypes.IsIndex(header) || MediaTypes.IsManifest(header)) return header;
        if (!string.IsNullOrEmpty(m.MediaType)) return m.MediaType;
        // OCI allows mediaType to be absent: tell index from manifest by shape.
        return m.Manifests is not null ? MediaTypes.OciIndex : MediaTypes.OciManifest;
    }

    internal static string Sha256Digest(ReadOnlySpan<byte> data)
    {
        Span<byte> h = stackalloc byte[32];
        SHA256.HashData(data, h);
        return "sha256:" + Convert.ToHexStringLower(h);
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

    // ---------------------------------------------------------------- request plumbing

    internal static bool IsRedirect(HttpStatusCode s) => s is HttpStatusCode.MovedPermanently or HttpStatusCode.Found
        or HttpStatusCode.SeeOther or HttpStatusCode.TemporaryRedirect or HttpStatusCode.PermanentRedirect;

    /// <summary>Maps an unsuccessful status to the typed exception; 5xx/429 become retryable.</summary>
    internal static void ThrowForStatus(HttpResponseMessage resp, string host, string subject)
    {
        var s = resp.StatusCode;
        if ((int)s is >= 200 and < 300) return;
        if (s == HttpStatusCode.NotFound) throw new NotFoundException($"{subject} not found on {host}", host, subject);
        if (s is HttpStatusCode.Unauthorized or HttpStatusCode.Forbidden)
            throw new UnauthorizedException($"{host} refused access to {subject}: {(int)s} {s}", s, host, subject);
        if ((int)s >= 500 || s == HttpStatusCode.TooManyRequests || s == HttpStatusCode.RequestTimeout)
            throw new TransientRegistryException($"{host} answered {(int)s} {s} for {subject}", s, host, subject, RetryAfter(resp));
        throw new RegistryException($"{host} answered {(int)s} {s} for {subject}", s, host, subject);
    }

    private static TimeSpan? RetryAfter(HttpResponseMessage resp)
    {
        var ra = resp.Headers.RetryAfter;
        if (ra?.Delta is { } d) return d;
        if (ra?.Date is { } at) return at - DateTimeOffset.UtcNow;
        return null;
    }

    /// <summary>
    /// Sends one request to the registry with authentication. A 401 updates the endpoint's challenge
    /// (and drops a stale token) and the request is sent once more; a second 401 is returned to the caller.
    /// </summary>
    /// <param name="image">the image the request is for: credential providers keyed by image (CRI) look it up.</param>
    internal async Task<HttpResponseMessage> SendAsync(Endpoint ep, Func<HttpRequestMessage> make, string scope, string subject,
        CancellationToken ct, ImageReference? image = null)
    {
        for (var pass = 0; ; pass++)
        {
            var (auth, tokenTask) = await ep.Auth.GetHeaderAsync(this, ep, scope, image, ct).ConfigureAwait(false);
            using var req = make();
            req.Headers.Authorization = auth;
            CountRequest();
            var resp = await ep.Client.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
            if (resp.StatusCode != HttpStatusCode.Unauthorized || pass > 0) return resp;
            var ch = AuthChallenge.Pick(resp.Headers);
            if (ch is null) return resp;
            resp.Dispose();
            var before = ep.Auth.Challenge;
            ep.Auth.Challenge = ch;
            if (tokenTask is not null) ep.Auth.Invalidate(scope, tokenTask);
            if (auth is not null && before is not null && before.Scheme == ch.Scheme && tokenTask is null)
                throw new UnauthorizedException($"{ep.Host} rejected the {ch.Scheme} credentials for {subject}", HttpStatusCode.Unauthorized, ep.Host, subject);
            Logger.LogDebug("{Host} asked for {Scheme} auth for {Subject}", ep.Host, ch.Scheme, subject);
        }
    }

    /// <summary>
    /// Runs <paramref name="op"/> on each endpoint from <paramref name="start"/> until one succeeds.
    /// NotFound/Unauthorized/transport failures and stalls on a mirror move on to the next; the last endpoint's error is
    /// thrown. Every attempt is watched for stalls (<see cref="BlobOptions.StallTimeout"/>); a configured per-mirror
    /// request timeout is a hard limit on top.
    /// </summary>
    internal async Task<T> OnEndpointsAsync<T>(IReadOnlyList<Endpoint> eps, int start, string subject,
        Func<Endpoint, Attempt, Task<T>> op, CancellationToken ct)
    {
        for (var i = start; ; i++)
        {
            var ep = eps[i];
            var last = i == eps.Count - 1;
            try
            {
                // Without the watchdog (stall_timeout_sec = 0) every attempt has fetching_timeout_sec as a hard limit, as before.
                var hard = ep.RequestTimeout ?? (Blob.StallTimeout > TimeSpan.Zero ? null : Blob.FetchingTimeout);
                return await RetryAsync(ep, subject, op, hard, Blob.StallTimeout, Blob.OutageTimeout, failFast: !last, ct)
                    .ConfigureAwait(false);
            }
            catch (RegistryException e) when (!last && !ct.IsCancellationRequested && e is not DigestMismatchException)
            {
                Logger.LogWarning("endpoint {Host} failed for {Subject} ({Error}); trying {Next}", ep.Host, subject, e.Message, eps[i + 1].Host);
            }
        }
    }

    /// <summary>
    /// One operation with a hard per-attempt timeout and jittered exponential backoff on 5xx/429, connection resets and
    /// timeouts (up to <see cref="BlobOptions.MaxRetries"/>), without a stall watchdog (pushes: an upload shows no
    /// progress until the registry answers). Caller cancellation stops at once.
    /// </summary>
    internal Task<T> RetryAsync<T>(Endpoint ep, string subject, Func<Endpoint, CancellationToken, Task<T>> op, TimeSpan timeout,
        bool failFastOnConnect, CancellationToken ct)
        => RetryAsync(ep, subject, (e, a) => op(e, a.Token), timeout, TimeSpan.Zero, TimeSpan.Zero, failFastOnConnect, ct);

    /// <summary>Longest pause between two tries while a host refuses, resets or stalls: its return is noticed within it.</summary>
    internal static readonly TimeSpan OutageBackoffCap = TimeSpan.FromSeconds(1);

    /// <summary>
    /// One operation, tried again after failures with jittered exponential backoff. 5xx/429 and hard timeouts are retried
    /// up to <see cref="BlobOptions.MaxRetries"/> times. Connection failures (refused, reset, cut bodies) and stalls (no
    /// byte for <paramref name="stall"/>: the connection is dropped, so the next try gets a fresh one) are retried until
    /// the host has sent nothing for <paramref name="outage"/> (when set; else up to MaxRetries too); with
    /// <paramref name="failFast"/> (a mirror with endpoints after it) a refused connection or a stall fails at once, so the
    /// next endpoint is tried. Caller cancellation stops at once.
    /// </summary>
    internal async Task<T> RetryAsync<T>(Endpoint ep, string subject, Func<Endpoint, Attempt, Task<T>> op, TimeSpan? timeout,
        TimeSpan stall, TimeSpan outage, bool failFast, CancellationToken ct)
    {
        var max = Blob.MaxRetries;
        var lastProgress = Environment.TickCount64;
        for (var attempt = 0; ; attempt++)
        {
            Exception error;
            TimeSpan? hint = null;
            var connection = false;
            using (var a = new Attempt(ct, timeout, stall))
            {
                try
                {
                    return await op(ep, a).ConfigureAwait(false);
                }
                catch (OperationCanceledException) when (ct.IsCancellationRequested)
                {
                    throw;
                }
                catch (OperationCanceledException e) when (a.TimedOut || stall <= TimeSpan.Zero)
                {
                    var t = timeout ?? TimeSpan.Zero;
                    error = new RegistryException($"request to {ep.Host} for {subject} timed out after {t.TotalSeconds:0.#} s", host: ep.Host, subject: subject, inner: e);
                }
                catch (OperationCanceledException e)
                {
                    error = new RegistryException($"{ep.Host} sent nothing for {stall.TotalSeconds:0.#} s for {subject} (stalled; connection dropped)",
                        host: ep.Host, subject: subject, inner: e);
                    connection = true;
                    Interlocked.Increment(ref _stalls);
                    Logger.LogInformation("{Host} stalled on {Subject}: nothing received for {Stall} s; the request is abandoned", ep.Host, subject, stall.TotalSeconds);
                    if (failFast) throw error;
                }
                catch (TransientRegistryException e)
                {
                    error = e;
                    hint = e.RetryAfter;
                    // A body cut short is the connection's failure; an answered 5xx/429 is the server's.
                    connection = e.StatusCode is null;
                }
                catch (HttpRequestException e) when (failFast && IsConnectFailure(e))
                {
                    throw new RegistryException($"cannot connect to {ep.Host} for {subject}: {e.Message}", host: ep.Host, subject: subject, inner: e);
                }
                catch (Exception e) when (e is HttpRequestException or IOException)
                {
                    error = new RegistryException($"connection to {ep.Host} failed for {subject}: {e.Message}", host: ep.Host, subject: subject, inner: e);
                    connection = true;
                }
                lastProgress = Math.Max(lastProgress, a.LastProgress);
            }
            var delay = Backoff(attempt, hint);
            bool retry;
            if (connection && outage > TimeSpan.Zero)
            {
                // An outage: keep trying (never pausing long, so the host's return is noticed) until it has been
                // silent for the whole window; the last try starts when the window ends.
                if (delay > OutageBackoffCap) delay = OutageBackoffCap;
                var quiet = TimeSpan.FromMilliseconds(Environment.TickCount64 - lastProgress);
                retry = quiet < outage;
                if (retry && quiet + delay > outage) delay = outage - quiet;
            }
            else
            {
                retry = attempt < max;
            }
            if (!retry)
            {
                if (error is RegistryException re && re is not TransientRegistryException) throw re;
                throw new RegistryException($"{error.Message} (gave up after {attempt + 1} attempts)",
                    (error as RegistryException)?.StatusCode, ep.Host, subject, error);
            }
            Interlocked.Increment(ref _retries);
            Logger.LogDebug("retrying {Subject} on {Host} in {Delay} ms after: {Error}", subject, ep.Host, (int)delay.TotalMilliseconds, error.Message);
            await Task.Delay(delay, ct).ConfigureAwait(false);
        }
    }

    internal TimeSpan Backoff(int attempt, TimeSpan? hint)
    {
        var min = Blob.MinWait.TotalMilliseconds;
        var maxw = Blob.MaxWait.TotalMilliseconds;
        var cap = Math.Min(maxw, min * Math.Pow(2, Math.Min(attempt, 30)));
        // Half fixed, half random: spreads retries of many readers without ever going below min/2.
        var ms = cap / 2 + Random.Shared.NextDouble() * cap / 2;
        if (hint is { } h && h.TotalMilliseconds > ms) ms = Math.Min(h.TotalMilliseconds, maxw);
        return TimeSpan.FromMilliseconds(ms);
    }

    private static bool IsConnectFailure(HttpRequestException e)
        => e.HttpRequestError == HttpRequestError.ConnectionError
           && e.InnerException is SocketException { SocketErrorCode: SocketError.ConnectionRefused or SocketError.HostUnreachable or SocketError.NetworkUnreachable or SocketError.HostNotFound };

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var ep in _endpoints.Values) ep.Dispose();
        _endpoints.Clear();
    }
}

/// <summary>A failure worth retrying (5xx, 429, a short body); surfaces as <see cref="RegistryException"/> when retries run out.</summary>
public sealed class TransientRegistryException(string message, HttpStatusCode? status, string? host, string? subject, TimeSpan? retryAfter = null)
    : RegistryException(message, status, host, subject)
{
    public TimeSpan? RetryAfter { get; } = retryAfter;
}
