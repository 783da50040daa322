using System.Collections.Concurrent;
using Microsoft.AspNetCore.Http;

namespace Stargz.Registry.Tests.Infra;

/// <summary>One request the proxy saw.</summary>
public sealed record SeenRequest(string Method, string Path, string? Range, bool HasAuthorization);

/// <summary>
/// A counting reverse proxy on 127.0.0.1 in front of a real registry. A hook may answer a request
/// itself (to inject 500s, cut connections, redirect); everything else is forwarded unchanged.
/// </summary>
public sealed class RegistryProxy : IAsyncDisposable
{
    private readonly TestHttpServer _server;
    private readonly HttpClient _upstream;
    private readonly ConcurrentQueue<SeenRequest> _seen = new();

    /// <summary>Return true when the hook answered the request itself.</summary>
    public Func<HttpContext, RegistryProxy, Task<bool>>? Hook { get; set; }
    public string Upstream { get; }
    public string Host => _server.Host;
    public string BaseUrl => _server.BaseUrl;
    public IReadOnlyCollection<SeenRequest> Seen => _seen;

    private RegistryProxy(TestHttpServer server, string upstream, HttpClient http)
    {
        _server = server; Upstream = upstream; _upstream = http;
    }

    public static async Task<RegistryProxy> StartAsync(string upstreamBaseUrl, Func<HttpContext, RegistryProxy, Task<bool>>? hook = null)
    {
        var http = new HttpClient(new SocketsHttpHandler { AllowAutoRedirect = false, UseCookies = false });
        RegistryProxy? self = null;
        var server = await TestHttpServer.StartAsync(async ctx =>
        {
            var p = self!;
            var req = ctx.Request;
            p._seen.Enqueue(new SeenRequest(req.Method, req.Path.Value ?? "", req.Headers.Range.ToString() is { Length: > 0 } r ? r : null,
                req.Headers.Authorization.Count > 0));
            if (p.Hook is { } h && await h(ctx, p)) return;
            await p.ForwardAsync(ctx);
        });
        self = new RegistryProxy(server, upstreamBaseUrl, http) { Hook = hook };
        return self;
    }

    /// <summary>Blob GETs seen so far (the requests a range read costs).</summary>
    public int BlobGets(string? digest = null)
    {
        var n = 0;
        foreach (var s in _seen)
            if (s.Method == "GET" && s.Path.Contains("/blobs/", StringComparison.Ordinal) && (digest is null || s.Path.EndsWith(digest, StringComparison.Ordinal))) n++;
        return n;
    }

    public void Reset() => _seen.Clear();

    /// <summary>Forwards to the upstream registry, streaming the answer back.</summary>
    public async Task ForwardAsync(HttpContext ctx)
    {
        var req = ctx.Request;
        using var msg = new HttpRequestMessage(new HttpMethod(req.Method), Upstream + req.Path + req.QueryString);
        foreach (var h in req.Headers)
        {
            if (h.Key is "Host" or "Content-Length" or "Content-Type" or "Transfer-Encoding" or "Connection") continue;
            msg.Headers.TryAddWithoutValidation(h.Key, (IEnumerable<string?>)h.Value);
        }
        if (req.ContentLength > 0 || req.Headers.TransferEncoding.Count > 0)
        {
            msg.Content = new StreamContent(req.Body);
            if (req.ContentType is { } ct) msg.Content.Headers.TryAddWithoutValidation("Content-Type", ct);
        }
        using var resp = await _upstream.SendAsync(msg, HttpCompletionOption.ResponseHeadersRead, ctx.RequestAborted);
        ctx.Response.StatusCode = (int)resp.StatusCode;
        foreach (var h in resp.Headers)
        {
            if (h.Key is "Transfer-Encoding" or "Connection") continue;
            ctx.Response.Headers[h.Key] = h.Value.ToArray();
        }
        foreach (var h in resp.Content.Headers) ctx.Response.Headers[h.Key] = h.Value.ToArray();
        if (req.Method != "HEAD")
            await resp.Content.CopyToAsync(ctx.Response.Body, ctx.RequestAborted);
    }

    public async ValueTask DisposeAsync()
    {
        await _server.DisposeAsync();
        _upstream.Dispose();
    }
}
