using System.Collections.Concurrent;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;

namespace Stargz.Registry;

/// <summary>
/// How requests reach a registry, shared by <see cref="RegistryClient"/> and every <see cref="RemoteBlob"/> it opens: the
/// endpoints (mirrors in order, then the origin) each with its connection pool and auth state, authentication on 401,
/// failover between endpoints, retries with backoff and the stall/outage watch, redirects to storage, the hosts found
/// not to serve multi-range requests, and the counters. Thread-safe; one per client.
/// </summary>
internal sealed class RegistryTransport(RegistryHostsConfig hosts, ICredentialProvider credentials, ILogger logger) : IDisposable
{
    private readonly ConcurrentDictionary<string, Endpoint> _endpoints = new(StringComparer.Ordinal);
    // Hosts (endpoint or redirect target) found not to support multi-range requests.
    private readonly ConcurrentDictionary<string, bool> _singleRangeHosts = new(StringComparer.OrdinalIgnoreCase);
    private long _requests;
    private long _bytes;
    private long _stalls;
    private long _retries;
    private bool _disposed;

    public RegistryHostsConfig Hosts { get; } = hosts;
    public ICredentialProvider Credentials { get; } = credentials;
    public ILogger Logger { get; } = logger;
    public BlobOptions Blob => Hosts.Blob;

    /// <summary>HTTP requests sent (all hosts, including token requests and retries).</summary>
    public long RequestCount => Interlocked.Read(ref _requests);
    /// <summary>Blob body bytes received.</summary>
    public long BytesFetched => Interlocked.Read(ref _bytes);
    /// <summary>Requests abandoned because they received nothing for the stall timeout.</summary>
    public long StallCount => Interlocked.Read(ref _stalls);
    /// <summary>Requests tried again after a failure (any endpoint).</summary>
    public long RetryCount => Interlocked.Read(ref _retries);

    public void CountRequest() => Interlocked.Increment(ref _requests);
    public void CountBytes(long n) => Interlocked.Add(ref _bytes, n);

    public bool IsSingleRangeHost(string host) => Hosts.Blob.ForceSingleRangeMode || _singleRangeHosts.ContainsKey(host);
    public void MarkSingleRangeHost(string host)
    {
        if (_singleRangeHosts.TryAdd(host, true))
            Logger.LogInformation("host {Host} does not serve multi-range requests; using single ranges from now on", host);
    }

    public IReadOnlyList<Endpoint> EndpointsFor(string registryHost)
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

    /// <summary>Redirect hops followed from a registry to where a blob's bytes are (registry -> CDN -> bucket).</summary>
    public const int MaxRedirects = 5;

    /// <summary>
    /// The size of a blob a registry redirected to <paramref name="target"/> (a storage backend, another origin), and the
    /// URL that finally serves it. HEAD first; a backend that refuses HEAD (S3 URLs presigned for GET answer 403) is asked
    /// for its first byte instead and the size read from Content-Range, as the reference does. The registry's
    /// Authorization is never sent there. The Content-Length of a redirect answer is its own body's, never the blob's.
    /// </summary>
    public async Task<(long Size, string Url)> SizeAtRedirectAsync(Endpoint ep, Uri target, string subject, CancellationToken ct,
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

    public static bool IsRedirect(HttpStatusCode s) => s is HttpStatusCode.MovedPermanently or HttpStatusCode.Found
        or HttpStatusCode.SeeOther or HttpStatusCode.TemporaryRedirect or HttpStatusCode.PermanentRedirect;

    /// <summary>Maps an unsuccessful status to the typed exception; 5xx/429 become retryable.</summary>
    public static void ThrowForStatus(HttpResponseMessage resp, string host, string subject)
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
    public async Task<HttpResponseMessage> SendAsync(Endpoint ep, Func<HttpRequestMessage> make, string scope, string subject,
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
    public async Task<T> OnEndpointsAsync<T>(IReadOnlyList<Endpoint> eps, int start, string subject,
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
    public Task<T> RetryAsync<T>(Endpoint ep, string subject, Func<Endpoint, CancellationToken, Task<T>> op, TimeSpan timeout,
        bool failFastOnConnect, CancellationToken ct)
        => RetryAsync(ep, subject, (e, a) => op(e, a.Token), timeout, TimeSpan.Zero, TimeSpan.Zero, failFastOnConnect, ct);

    /// <summary>Longest pause between two tries while a host refuses, resets or stalls: its return is noticed within it.</summary>
    public static readonly TimeSpan OutageBackoffCap = TimeSpan.FromSeconds(1);

    /// <summary>
    /// One operation, tried again after failures with jittered exponential backoff. 5xx/429 and hard timeouts are retried
    /// up to <see cref="BlobOptions.MaxRetries"/> times. Connection failures (refused, reset, cut bodies) and stalls (no
    /// byte for <paramref name="stall"/>: the connection is dropped, so the next try gets a fresh one) are retried until
    /// the host has sent nothing for <paramref name="outage"/> (when set; else up to MaxRetries too); with
    /// <paramref name="failFast"/> (a mirror with endpoints after it) a refused connection or a stall fails at once, so the
    /// next endpoint is tried. Caller cancellation stops at once.
    /// </summary>
    public async Task<T> RetryAsync<T>(Endpoint ep, string subject, Func<Endpoint, Attempt, Task<T>> op, TimeSpan? timeout,
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
            var delay = RetryBackoff.Delay(attempt, hint);
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

    /// <summary>min_wait_msec doubling to max_wait_msec, jittered (many readers retrying one host spread out), Retry-After respected.</summary>
    private Backoff RetryBackoff => new(Blob.MinWait, Blob.MaxWait, Jitter: true);

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
