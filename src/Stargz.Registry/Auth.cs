using System.Collections.Concurrent;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;

namespace Stargz.Registry;

/// <summary>One parsed <c>WWW-Authenticate</c> challenge.</summary>
internal sealed record AuthChallenge(string Scheme, IReadOnlyDictionary<string, string> Parameters)
{
    public string? Realm => Parameters.TryGetValue("realm", out var r) ? r : null;
    public string? Service => Parameters.TryGetValue("service", out var s) ? s : null;
    public bool IsBearer => Scheme.Equals("Bearer", StringComparison.OrdinalIgnoreCase);
    public bool IsBasic => Scheme.Equals("Basic", StringComparison.OrdinalIgnoreCase);

    /// <summary>Parses every challenge in the headers; Bearer first since it is what registries prefer.</summary>
    public static AuthChallenge? Pick(HttpResponseHeaders headers)
    {
        AuthChallenge? basic = null;
        foreach (var h in headers.WwwAuthenticate)
        {
            var c = Parse(h.Scheme, h.Parameter);
            if (c.IsBearer) return c;
            if (c.IsBasic) basic ??= c;
        }
        return basic;
    }

    // auth-params: key=value or key="quoted, value" separated by commas.
    internal static AuthChallenge Parse(string scheme, string? parameter)
    {
        var d = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        var s = parameter ?? "";
        var i = 0;
        while (i < s.Length)
        {
            while (i < s.Length && (s[i] == ',' || s[i] == ' ')) i++;
            var eq = s.IndexOf('=', i);
            if (eq < 0) break;
            var key = s[i..eq].Trim();
            i = eq + 1;
            string value;
            if (i < s.Length && s[i] == '"')
            {
                var sb = new StringBuilder();
                i++;
                while (i < s.Length && s[i] != '"')
                {
                    if (s[i] == '\\' && i + 1 < s.Length) i++;
                    sb.Append(s[i++]);
                }
                i++;
                value = sb.ToString();
            }
            else
            {
                var end = s.IndexOf(',', i);
                if (end < 0) end = s.Length;
                value = s[i..end].Trim();
                i = end;
            }
            d[key] = value;
        }
        return new AuthChallenge(scheme, d);
    }
}

internal sealed class BearerToken(string value, DateTime expiresUtc)
{
    public string Value { get; } = value;
    public DateTime ExpiresUtc { get; } = expiresUtc;
    public bool Fresh => DateTime.UtcNow < ExpiresUtc;
}

/// <summary>
/// Per-endpoint auth: remembers the last challenge so later requests authenticate up front, and caches
/// bearer tokens per scope, fetching each at most once at a time (concurrent requests share the fetch).
/// </summary>
internal sealed class AuthState
{
    private readonly ConcurrentDictionary<string, Task<BearerToken>> _tokens = new(StringComparer.Ordinal);
    public volatile AuthChallenge? Challenge;

    public void Invalidate(string scope, Task<BearerToken>? failed)
    {
        if (failed is not null) _tokens.TryRemove(new KeyValuePair<string, Task<BearerToken>>(scope, failed));
        else _tokens.TryRemove(scope, out _);
    }

    /// <param name="image">the image the request is for (credentials may be keyed by image, as CRI's are), or null.</param>
    public async Task<(AuthenticationHeaderValue? header, Task<BearerToken>? used)> GetHeaderAsync(
        RegistryTransport transport, Endpoint ep, string scope, ImageReference? image, CancellationToken ct)
    {
        var ch = Challenge;
        if (ch is null) return (null, null);
        if (ch.IsBasic)
        {
            var cred = await transport.Credentials.GetAsync(ep.Host, image, ct).ConfigureAwait(false);
            if (cred is null || !cred.HasBasic)
                throw new UnauthorizedException($"registry {ep.Host} asks for Basic auth and no credentials are configured for it",
                    System.Net.HttpStatusCode.Unauthorized, ep.Host, scope);
            return (new AuthenticationHeaderValue("Basic",
                Convert.ToBase64String(Encoding.UTF8.GetBytes(cred.Username + ":" + cred.Secret))), null);
        }
        if (!ch.IsBearer) return (null, null);
        while (true)
        {
            // A cached token needs no credential lookup: the common path of every blob read.
            if (!_tokens.TryGetValue(scope, out var task))
            {
                var cred = await transport.Credentials.GetAsync(ep.Host, image, ct).ConfigureAwait(false);
                // A registry token (CRI's registry_token) is already the bearer token: no token server round trip,
                // and nothing cached, since it belongs to that image's credentials rather than to the scope.
                if (cred?.RegistryToken is { Length: > 0 } rt) return (new AuthenticationHeaderValue("Bearer", rt), null);
                // GetOrAdd's factory may run on several threads at once and every run would ask the token server:
                // each caller offers an unstarted task, and only the one whose task went in starts the fetch.
                var mine = new TaskCompletionSource<BearerToken>(TaskCreationOptions.RunContinuationsAsynchronously);
                task = _tokens.GetOrAdd(scope, mine.Task);
                if (ReferenceEquals(task, mine.Task)) _ = CompleteWithTokenAsync(mine, transport, ep, ch, scope, cred);
            }
            BearerToken tok;
            try
            {
                tok = await task.WaitAsync(ct).ConfigureAwait(false);
            }
            catch (Exception) when (!ct.IsCancellationRequested)
            {
                _tokens.TryRemove(new KeyValuePair<string, Task<BearerToken>>(scope, task));
                throw;
            }
            if (tok.Fresh) return (new AuthenticationHeaderValue("Bearer", tok.Value), task);
            _tokens.TryRemove(new KeyValuePair<string, Task<BearerToken>>(scope, task));
        }
    }

    private static async Task CompleteWithTokenAsync(TaskCompletionSource<BearerToken> into, RegistryTransport transport, Endpoint ep,
        AuthChallenge ch, string scope, RegistryCredential? cred)
    {
        try { into.SetResult(await FetchTokenAsync(transport, ep, ch, scope, cred).ConfigureAwait(false)); }
        catch (Exception e) { into.SetException(e); }
    }

    // Runs detached from any one caller's token: the result is shared by every request for this scope.
    private static async Task<BearerToken> FetchTokenAsync(RegistryTransport transport, Endpoint ep, AuthChallenge ch, string scope, RegistryCredential? cred)
    {
        await Task.Yield();
        var realm = ch.Realm ?? throw new UnauthorizedException($"registry {ep.Host} sent a Bearer challenge without realm",
            System.Net.HttpStatusCode.Unauthorized, ep.Host, scope);
        if (!Uri.TryCreate(realm, UriKind.Absolute, out var realmUri))
            throw new UnauthorizedException($"registry {ep.Host} sent an invalid token realm", System.Net.HttpStatusCode.Unauthorized, ep.Host, scope);
        using var cts = new CancellationTokenSource(ep.RequestTimeout ?? TimeSpan.FromSeconds(30));
        HttpRequestMessage req;
        if (cred?.IdentityToken is { } refresh)
        {
            // OAuth2 refresh-token grant, as docker does for identity tokens.
            var form = new List<KeyValuePair<string, string>>
            {
                new("grant_type", "refresh_token"), new("refresh_token", refresh), new("client_id", "stargz"), new("scope", scope),
            };
            if (ch.Service is { } svc) form.Add(new("service", svc));
            req = new HttpRequestMessage(HttpMethod.Post, realmUri) { Content = new FormUrlEncodedContent(form) };
        }
        else
        {
            var q = new StringBuilder(realm);
            q.Append(realm.Contains('?') ? '&' : '?');
            if (ch.Service is { } svc) q.Append("service=").Append(Uri.EscapeDataString(svc)).Append('&');
            // One scope parameter per scope (distribution's token spec), e.g. a push plus a cross-repository mount source.
            var first = true;
            foreach (var one in scope.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            {
                if (!first) q.Append('&');
                q.Append("scope=").Append(Uri.EscapeDataString(one));
                first = false;
            }
            req = new HttpRequestMessage(HttpMethod.Get, q.ToString());
            if (cred is { HasBasic: true })
                req.Headers.Authorization = new AuthenticationHeaderValue("Basic",
                    Convert.ToBase64String(Encoding.UTF8.GetBytes(cred.Username + ":" + cred.Secret)));
        }
        using (req)
        {
            transport.CountRequest();
            using var resp = await ep.Client.SendAsync(req, HttpCompletionOption.ResponseContentRead, cts.Token).ConfigureAwait(false);
            if (resp.StatusCode is System.Net.HttpStatusCode.Unauthorized or System.Net.HttpStatusCode.Forbidden)
                throw new UnauthorizedException($"token server {realmUri.Authority} refused {(cred is null ? "anonymous access" : "the credentials")} for {scope} on {ep.Host}: {(int)resp.StatusCode}",
                    resp.StatusCode, ep.Host, scope);
            if (!resp.IsSuccessStatusCode)
                throw new RegistryException($"token server {realmUri.Authority} answered {(int)resp.StatusCode} for {scope} on {ep.Host}",
                    resp.StatusCode, ep.Host, scope);
            var body = await resp.Content.ReadAsByteArrayAsync(cts.Token).ConfigureAwait(false);
            using var doc = JsonDocument.Parse(body);
            var root = doc.RootElement;
            string? token = null;
            if (root.TryGetProperty("token", out var t) && t.ValueKind == JsonValueKind.String) token = t.GetString();
            if (string.IsNullOrEmpty(token) && root.TryGetProperty("access_token", out var a) && a.ValueKind == JsonValueKind.String) token = a.GetString();
            if (string.IsNullOrEmpty(token))
                throw new UnauthorizedException($"token server {realmUri.Authority} returned no token for {scope} on {ep.Host}",
                    System.Net.HttpStatusCode.Unauthorized, ep.Host, scope);
            var expires = 60;
            if (root.TryGetProperty("expires_in", out var e) && e.TryGetInt32(out var ei) && ei > 0) expires = ei;
            // Refresh a little early so a token does not expire in flight.
            var margin = Math.Min(10, expires / 5);
            return new BearerToken(token, DateTime.UtcNow.AddSeconds(expires - margin));
        }
    }
}
