using System.Net;

namespace Stargz.TestSupport;

/// <summary>
/// An HTTP proxy on 127.0.0.1 in front of a registry that counts what clients ask for: requests, blob requests
/// with a Range header, and the ranges in them. <see cref="Down"/> makes it stop answering (requests hang until
/// the client gives up), as an unreachable registry would; <see cref="Up"/> lets it answer again.
/// </summary>
public sealed class CountingProxy : IAsyncDisposable
{
    private readonly HttpListener _listener = new();
    private readonly HttpClient _upstream;
    private readonly string _target;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;
    private readonly object _lock = new();
    private TaskCompletionSource _open = Open();
    private long _requests, _rangeRequests, _ranges, _blobGets;

    public int Port { get; }
    /// <summary>host:port to give the client instead of the registry's.</summary>
    public string Host => $"127.0.0.1:{Port}";

    public long Requests => Interlocked.Read(ref _requests);
    /// <summary>GET requests for blobs that carried a Range header.</summary>
    public long RangeRequests => Interlocked.Read(ref _rangeRequests);
    /// <summary>Ranges asked for in those requests (a multi-range request counts each).</summary>
    public long Ranges => Interlocked.Read(ref _ranges);
    /// <summary>GET requests for blobs (with or without Range).</summary>
    public long BlobGets => Interlocked.Read(ref _blobGets);
    public List<string> Log { get; } = [];

    private static TaskCompletionSource Open()
    {
        var t = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        t.SetResult();
        return t;
    }

    public CountingProxy(string registryHost, int? port = null)
    {
        _target = "http://" + registryHost;
        _upstream = new HttpClient(new SocketsHttpHandler { AllowAutoRedirect = false, AutomaticDecompression = DecompressionMethods.None })
        {
            Timeout = Timeout.InfiniteTimeSpan,
        };
        Port = port ?? LocalRegistry.FreePort();
        _listener.Prefixes.Add($"http://127.0.0.1:{Port}/");
        _listener.Start();
        _loop = Task.Run(LoopAsync);
    }

    public void ResetCounts()
    {
        Interlocked.Exchange(ref _requests, 0);
        Interlocked.Exchange(ref _rangeRequests, 0);
        Interlocked.Exchange(ref _ranges, 0);
        Interlocked.Exchange(ref _blobGets, 0);
        lock (Log) Log.Clear();
    }

    public void Down()
    {
        lock (_lock) if (_open.Task.IsCompleted) _open = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    public void Up()
    {
        lock (_lock) _open.TrySetResult();
    }

    private async Task LoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            HttpListenerContext ctx;
            try { ctx = await _listener.GetContextAsync(); }
            catch (Exception) when (_stop.IsCancellationRequested) { return; }
            catch (HttpListenerException) { return; }
            catch (ObjectDisposedException) { return; }
            _ = Task.Run(() => HandleAsync(ctx));
        }
    }

    private async Task HandleAsync(HttpListenerContext ctx)
    {
        var req = ctx.Request;
        var resp = ctx.Response;
        try
        {
            Task open;
            lock (_lock) open = _open.Task;
            await open.WaitAsync(_stop.Token);
            Interlocked.Increment(ref _requests);
            var range = req.Headers["Range"];
            var path = req.Url!.PathAndQuery;
            if (req.HttpMethod == "GET" && path.Contains("/blobs/", StringComparison.Ordinal))
            {
                Interlocked.Increment(ref _blobGets);
                if (range != null)
                {
                    Interlocked.Increment(ref _rangeRequests);
                    Interlocked.Add(ref _ranges, range.Split(',').Length);
                }
            }
            lock (Log) Log.Add($"{req.HttpMethod} {path} {range}");
            using var up = new HttpRequestMessage(new HttpMethod(req.HttpMethod), _target + path);
            foreach (var key in req.Headers.AllKeys)
            {
                if (key is null || key is "Host" or "Connection" or "Content-Length" or "Transfer-Encoding") continue;
                up.Headers.TryAddWithoutValidation(key, req.Headers.GetValues(key) ?? []);
            }
            if (req.HasEntityBody)
            {
                var body = new MemoryStream();
                await req.InputStream.CopyToAsync(body);
                up.Content = new ByteArrayContent(body.ToArray());
                if (req.ContentType != null) up.Content.Headers.TryAddWithoutValidation("Content-Type", req.ContentType);
            }
            using var r = await _upstream.SendAsync(up, HttpCompletionOption.ResponseHeadersRead, _stop.Token);
            resp.StatusCode = (int)r.StatusCode;
            foreach (var h in r.Headers)
            {
                if (h.Key is "Transfer-Encoding" or "Connection") continue;
                if (h.Key == "Location")
                {
                    resp.RedirectLocation = string.Join(",", h.Value).Replace(_target, "http://" + Host);
                    continue;
                }
                resp.Headers[h.Key] = string.Join(",", h.Value);
            }
            foreach (var h in r.Content.Headers)
            {
                if (h.Key == "Content-Length") resp.ContentLength64 = long.Parse(h.Value.First());
                else if (h.Key == "Content-Type") resp.ContentType = h.Value.First();
                else resp.Headers[h.Key] = string.Join(",", h.Value);
            }
            if (req.HttpMethod != "HEAD")
                await r.Content.CopyToAsync(resp.OutputStream, _stop.Token);
            resp.Close();
        }
        catch (Exception)
        {
            try { resp.Abort(); } catch (Exception) { }
        }
    }

    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        Up();
        try { _listener.Stop(); _listener.Close(); } catch (Exception) { }
        try { await _loop; } catch (Exception) { }
        _upstream.Dispose();
        _stop.Dispose();
    }
}
