using System.Net;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.AspNetCore.Server.Kestrel.Https;
using Microsoft.Extensions.Logging;

namespace Stargz.Registry.Tests.Infra;

/// <summary>
/// The part of the Kubernetes API the kubeconfig keychain uses: <c>GET /api/v1/secrets</c> with the dockerconfigjson
/// field selector, as a list and as a watch (one JSON event per line, from a resource version), over HTTPS on
/// 127.0.0.1. No kube-apiserver can be installed here (Debian has none), so the tests run this Kestrel stand-in;
/// it answers as the API server documents (410 Gone as an ERROR event for an expired resource version).
/// Authenticates by client certificate (issued by <see cref="Pki"/>) or bearer token.
/// </summary>
public sealed class KubeApiServer : IAsyncDisposable
{
    public const string Selector = "type=kubernetes.io/dockerconfigjson";

    private readonly WebApplication _app;
    private readonly Lock _lock = new();
    private readonly List<(long Rv, string Type, string Object)> _events = [];
    private readonly Dictionary<string, string> _secrets = new(StringComparer.Ordinal); // "ns/name" -> object JSON
    private TaskCompletionSource _changed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private long _rv = 100;
    private long _expiredBefore;
    private int _lists, _watches, _unauthorized;

    public int Port { get; private set; }
    public string Server => $"https://127.0.0.1:{Port}";
    /// <summary>Bearer token accepted (null: none is).</summary>
    public string? Token { get; set; }
    /// <summary>Thumbprint of the client certificate accepted (null: none is).</summary>
    public string? ClientThumbprint { get; set; }
    /// <summary>Misbehave: answer every watch with an empty 200 and end it at once.</summary>
    public bool EndWatchesAtOnce { get; set; }
    public int Lists => Volatile.Read(ref _lists);
    public int Watches => Volatile.Read(ref _watches);
    public int Unauthorized => Volatile.Read(ref _unauthorized);

    private KubeApiServer(WebApplication app) => _app = app;

    public static Task<KubeApiServer> StartAsync(Pki pki) => StartAsync(pki.ServerCert, pki.ServerKey);

    /// <param name="serverCert">PEM certificate for 127.0.0.1 (with <paramref name="serverKey"/>), e.g. <see cref="Pki"/>'s.</param>
    public static async Task<KubeApiServer> StartAsync(string serverCert, string serverKey)
    {
        var cert = X509Certificate2.CreateFromPemFile(serverCert, serverKey);
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, o =>
        {
            o.Protocols = HttpProtocols.Http1;
            o.UseHttps(cert, h =>
            {
                h.ClientCertificateMode = ClientCertificateMode.AllowCertificate;
                h.AllowAnyClientCertificate(); // checked by thumbprint below
            });
        }));
        var app = builder.Build();
        var server = new KubeApiServer(app);
        app.Run(server.HandleAsync);
        await app.StartAsync();
        server.Port = new Uri(app.Urls.First()).Port;
        return server;
    }

    /// <summary>Adds or replaces a secret holding <paramref name="dockerConfigJson"/> (raw, base64-encoded here).</summary>
    public void Put(string ns, string name, string dockerConfigJson) => PutRaw(ns, name, Convert.ToBase64String(Encoding.UTF8.GetBytes(dockerConfigJson)));

    /// <summary>Adds or replaces a secret whose .dockerconfigjson field is <paramref name="base64"/> as given.</summary>
    public void PutRaw(string ns, string name, string base64)
    {
        lock (_lock)
        {
            var rv = ++_rv;
            var key = ns + "/" + name;
            var type = _secrets.ContainsKey(key) ? "MODIFIED" : "ADDED";
            var obj = JsonSerializer.Serialize(new
            {
                kind = "Secret", apiVersion = "v1",
                metadata = new { name, @namespace = ns, resourceVersion = rv.ToString() },
                type = "kubernetes.io/dockerconfigjson",
                data = new Dictionary<string, string> { [".dockerconfigjson"] = base64 },
            });
            _secrets[key] = obj;
            Publish(rv, type, obj);
        }
    }

    public void Delete(string ns, string name)
    {
        lock (_lock)
        {
            if (!_secrets.Remove(ns + "/" + name, out var obj)) return;
            Publish(++_rv, "DELETED", obj);
        }
    }

    /// <summary>Every resource version up to now becomes too old to watch from: open watches get 410 Gone.</summary>
    public void ExpireWatches()
    {
        lock (_lock)
        {
            _expiredBefore = ++_rv;
            Publish(_rv, "EXPIRE", "");
        }
    }

    private void Publish(long rv, string type, string obj)
    {
        _events.Add((rv, type, obj));
        _changed.TrySetResult();
        _changed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    private async Task HandleAsync(HttpContext ctx)
    {
        var cert = await ctx.Connection.GetClientCertificateAsync();
        bool byCert = cert is not null && ClientThumbprint is not null && cert.Thumbprint == ClientThumbprint;
        bool byToken = Token is not null && ctx.Request.Headers.Authorization.ToString() == "Bearer " + Token;
        if (!byCert && !byToken)
        {
            Interlocked.Increment(ref _unauthorized);
            ctx.Response.StatusCode = 401;
            await ctx.Response.WriteAsync("""{"kind":"Status","status":"Failure","reason":"Unauthorized","code":401}""");
            return;
        }
        if (ctx.Request.Path != "/api/v1/secrets" || ctx.Request.Query["fieldSelector"] != Selector)
        {
            ctx.Response.StatusCode = 404;
            return;
        }
        ctx.Response.ContentType = "application/json";
        if (ctx.Request.Query["watch"] == "true") await WatchAsync(ctx);
        else await ListAsync(ctx);
    }

    private async Task ListAsync(HttpContext ctx)
    {
        Interlocked.Increment(ref _lists);
        string body;
        lock (_lock)
            body = $$"""{"kind":"SecretList","apiVersion":"v1","metadata":{"resourceVersion":"{{_rv}}"},"items":[{{string.Join(",", _secrets.Values)}}]}""";
        await ctx.Response.WriteAsync(body);
    }

    private async Task WatchAsync(HttpContext ctx)
    {
        Interlocked.Increment(ref _watches);
        if (!long.TryParse(ctx.Request.Query["resourceVersion"], out var from)) { ctx.Response.StatusCode = 400; return; }
        var ct = ctx.RequestAborted;
        await ctx.Response.StartAsync(ct);
        if (EndWatchesAtOnce) return;
        while (!ct.IsCancellationRequested)
        {
            List<(long Rv, string Type, string Object)> pending;
            Task changed;
            bool expired;
            lock (_lock)
            {
                expired = from < _expiredBefore;
                pending = _events.FindAll(e => e.Rv > from && e.Type != "EXPIRE");
                changed = _changed.Task;
            }
            if (expired)
            {
                await ctx.Response.WriteAsync("""{"type":"ERROR","object":{"kind":"Status","status":"Failure","reason":"Expired","code":410,"message":"too old resource version"}}""" + "\n", ct);
                return;
            }
            foreach (var e in pending)
            {
                await ctx.Response.WriteAsync($$"""{"type":"{{e.Type}}","object":{{e.Object}}}""" + "\n", ct);
                from = e.Rv;
            }
            await ctx.Response.Body.FlushAsync(ct);
            try { await changed.WaitAsync(ct); }
            catch (OperationCanceledException) { return; }
        }
    }

    public async ValueTask DisposeAsync()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        await _app.StopAsync(cts.Token);
        await _app.DisposeAsync();
    }
}
