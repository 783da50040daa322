using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;

namespace Stargz.Registry.Tests.Infra;

/// <summary>A real Kestrel HTTP/1.1 server on 127.0.0.1 running one request delegate. Dispose stops it.</summary>
public sealed class TestHttpServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    public int Port { get; }
    public string Host => $"127.0.0.1:{Port}";
    public string BaseUrl => $"http://{Host}";

    private TestHttpServer(WebApplication app, int port) { _app = app; Port = port; }

    public static async Task<TestHttpServer> StartAsync(RequestDelegate handler)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Listen(IPAddress.Loopback, 0, o => o.Protocols = HttpProtocols.Http1);
            k.Limits.MaxRequestHeadersTotalSize = 1 << 20;
            k.Limits.MaxRequestLineSize = 1 << 16;
        });
        var app = builder.Build();
        app.Run(handler);
        await app.StartAsync();
        var addr = app.Urls.First();
        var port = new Uri(addr).Port;
        return new TestHttpServer(app, port);
    }

    public async ValueTask DisposeAsync()
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        await _app.StopAsync(cts.Token);
        await _app.DisposeAsync();
    }
}
