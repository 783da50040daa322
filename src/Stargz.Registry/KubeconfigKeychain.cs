using System.Diagnostics;
using System.Net;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Registry;

/// <summary>
/// Registry credentials from the cluster's image pull secrets (<c>[kubeconfig_keychain]</c>): every Secret of type
/// <c>kubernetes.io/dockerconfigjson</c> in all namespaces, listed and then watched through the Kubernetes API with
/// the kubeconfig's identity, each read like a docker config's <c>auths</c>. A host's credentials come from the first
/// secret (by namespace/name) that has any. Nothing is known until the first list succeeds; a dropped watch resumes
/// from the last resource version, an expired one (410 Gone) lists again, and errors (and watches the server ends at
/// once) back off up to 30 s. A malformed secret is logged by namespace/name and skipped; a kubeconfig that cannot be
/// used turns syncing off with a warning, as in the reference.
/// </summary>
public sealed class KubeconfigKeychain : ICredentialProvider, IAsyncDisposable
{
    public const string SecretType = "kubernetes.io/dockerconfigjson";
    public const string DockerConfigJsonKey = ".dockerconfigjson";
    private const string Selector = "fieldSelector=type%3D" + "kubernetes.io%2Fdockerconfigjson";
    /// <summary>A watch that ends sooner than this was not held open by the server.</summary>
    private static readonly TimeSpan QuickWatch = TimeSpan.FromSeconds(1);

    private readonly string? _path;
    private readonly ILogger _log;
    private readonly TimeSpan _waitForConfig;
    // Between failed syncs and watches the server ends at once: 1 s doubling to maxBackoff.
    private readonly Backoff _backoff;
    private readonly CancellationTokenSource _stop = new();
    private readonly TaskCompletionSource _synced = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Lock _lock = new();
    // Keyed "namespace/name"; replaced as a whole on every list, edited under _lock by watch events.
    private SortedDictionary<string, Dictionary<string, RegistryCredential>> _secrets = new(StringComparer.Ordinal);
    private Task? _run;
    private long _lists, _events;

    /// <param name="kubeconfigPath">the kubeconfig; null or empty: $KUBECONFIG, ~/.kube/config, in-cluster. An explicit
    /// path that does not exist yet is waited for (checked every <paramref name="waitForConfig"/>, default 10 s).</param>
    public KubeconfigKeychain(string? kubeconfigPath = null, ILogger? logger = null, TimeSpan? waitForConfig = null, TimeSpan? maxBackoff = null)
    {
        _path = string.IsNullOrEmpty(kubeconfigPath) ? null : kubeconfigPath;
        _log = logger ?? NullLogger.Instance;
        _waitForConfig = waitForConfig ?? TimeSpan.FromSeconds(10);
        _backoff = new Backoff(TimeSpan.FromSeconds(1), maxBackoff ?? TimeSpan.FromSeconds(30));
    }

    /// <summary>Complete once the first list has been taken in.</summary>
    public Task Synced => _synced.Task;

    /// <summary>Secrets held now.</summary>
    public int SecretCount { get { lock (_lock) return _secrets.Count; } }

    /// <summary>Lists taken so far (the first, and one after each expired or failed watch).</summary>
    public long Lists => Interlocked.Read(ref _lists);

    /// <summary>Watch events applied so far.</summary>
    public long Events => Interlocked.Read(ref _events);

    /// <summary>Starts syncing in the background; a second call does nothing.</summary>
    public KubeconfigKeychain Start()
    {
        lock (_lock) _run ??= Task.Run(() => RunAsync(_stop.Token));
        return this;
    }

    public ValueTask<RegistryCredential?> GetAsync(string host, CancellationToken ct)
    {
        lock (_lock)
        {
            foreach (var auths in _secrets.Values)
                if (DockerConfigCredentialProvider.ForHost(auths, host) is { } c) return ValueTask.FromResult<RegistryCredential?>(c);
        }
        return ValueTask.FromResult<RegistryCredential?>(null);
    }

    private async Task RunAsync(CancellationToken ct)
    {
        try
        {
            if (_path is not null)
                while (!File.Exists(_path))
                {
                    _log.LogDebug("kubeconfig keychain: waiting for {Kubeconfig} to be installed", _path);
                    await Task.Delay(_waitForConfig, ct).ConfigureAwait(false);
                }
            KubeClientConfig config;
            try { config = KubeClientConfig.Load(_path); }
            catch (Exception e) when (e is FormatException or FileNotFoundException)
            {
                _log.LogWarning("kubeconfig keychain: {Error}; not syncing image pull secrets", e.Message);
                return;
            }
            using var http = new HttpClient(config.CreateHandler()) { Timeout = Timeout.InfiniteTimeSpan };
            var baseUri = new Uri(config.Server.AbsoluteUri.TrimEnd('/') + "/");
            var failures = 0;
            while (!ct.IsCancellationRequested)
            {
                try
                {
                    var rv = await ListAsync(http, config, baseUri, ct).ConfigureAwait(false);
                    failures = 0;
                    while (rv is not null)
                    {
                        var opened = Stopwatch.GetTimestamp();
                        rv = await WatchAsync(http, config, baseUri, rv, ct).ConfigureAwait(false);
                        // A real API server holds a watch for timeoutSeconds; one that ends every watch at once
                        // (a proxy, an overloaded server) must not be asked again in a tight loop.
                        if (Stopwatch.GetElapsedTime(opened) < QuickWatch)
                        {
                            var delay = _backoff.Delay(failures++);
                            _log.LogDebug("kubeconfig keychain: watch on {Server} ended at once; reopening in {Delay} s", config.Server, delay.TotalSeconds);
                            await Task.Delay(delay, ct).ConfigureAwait(false);
                        }
                        else failures = 0;
                    }
                    _log.LogDebug("kubeconfig keychain: watch on {Server} expired; listing again", config.Server);
                }
                catch (Exception e) when (!ct.IsCancellationRequested)
                {
                    var delay = _backoff.Delay(failures++);
                    _log.LogWarning("kubeconfig keychain: syncing image pull secrets from {Server} ({Kubeconfig}) failed: {Error}; retrying in {Delay} s",
                        config.Server, config.Source, e.Message, delay.TotalSeconds);
                    await Task.Delay(delay, ct).ConfigureAwait(false);
                }
            }
        }
        // Stopping cancels whatever is in flight; its exception (cancelled read, aborted connection) is no failure.
        catch (Exception) when (ct.IsCancellationRequested) { }
    }

    /// <summary>Takes in the full list; returns its resource version.</summary>
    private async Task<string> ListAsync(HttpClient http, KubeClientConfig config, Uri baseUri, CancellationToken ct)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        timeout.CancelAfter(TimeSpan.FromSeconds(60));
        using var req = Request(config, new Uri(baseUri, "api/v1/secrets?" + Selector));
        using var resp = await http.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, timeout.Token).ConfigureAwait(false);
        await EnsureOkAsync(resp, "list secrets", timeout.Token).ConfigureAwait(false);
        await using var body = await resp.Content.ReadAsStreamAsync(timeout.Token).ConfigureAwait(false);
        using var doc = await JsonDocument.ParseAsync(body, cancellationToken: timeout.Token).ConfigureAwait(false);
        var fresh = new SortedDictionary<string, Dictionary<string, RegistryCredential>>(StringComparer.Ordinal);
        if (doc.RootElement.TryGetProperty("items", out var items) && items.ValueKind == JsonValueKind.Array)
            foreach (var item in items.EnumerateArray())
                if (Read(item) is { } s && s.Auths is not null) fresh[s.Key] = s.Auths;
        var rv = doc.RootElement.TryGetProperty("metadata", out var md) && md.TryGetProperty("resourceVersion", out var r) ? r.GetString() : null;
        if (string.IsNullOrEmpty(rv)) throw new FormatException("secret list without metadata.resourceVersion");
        lock (_lock) _secrets = fresh;
        Interlocked.Increment(ref _lists);
        _log.LogInformation("kubeconfig keychain: {Count} image pull secret(s) from {Server}", fresh.Count, config.Server);
        _synced.TrySetResult();
        return rv;
    }

    /// <summary>Applies watch events until the stream ends; returns the resource version to resume from, or null when
    /// the server says it is too old (410 Gone) and a new list is needed.</summary>
    private async Task<string?> WatchAsync(HttpClient http, KubeClientConfig config, Uri baseUri, string rv, CancellationToken ct)
    {
        // The server ends the watch after timeoutSeconds; one still open a minute later is a dead connection.
        const int ServerTimeout = 300;
        using var idle = CancellationTokenSource.CreateLinkedTokenSource(ct);
        idle.CancelAfter(TimeSpan.FromSeconds(ServerTimeout + 60));
        using var req = Request(config, new Uri(baseUri,
            $"api/v1/secrets?{Selector}&watch=true&allowWatchBookmarks=true&timeoutSeconds={ServerTimeout}&resourceVersion={Uri.EscapeDataString(rv)}"));
        using var resp = await http.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, idle.Token).ConfigureAwait(false);
        if (resp.StatusCode == HttpStatusCode.Gone) return null;
        await EnsureOkAsync(resp, "watch secrets", idle.Token).ConfigureAwait(false);
        await using var body = await resp.Content.ReadAsStreamAsync(idle.Token).ConfigureAwait(false);
        using var reader = new StreamReader(body);
        while (await reader.ReadLineAsync(idle.Token).ConfigureAwait(false) is { } line)
        {
            if (line.Length == 0) continue;
            using var ev = JsonDocument.Parse(line);
            var type = ev.RootElement.TryGetProperty("type", out var t) ? t.GetString() : null;
            if (!ev.RootElement.TryGetProperty("object", out var obj)) throw new FormatException($"watch event {type} without object");
            if (type == "ERROR")
            {
                var code = obj.TryGetProperty("code", out var c) && c.TryGetInt32(out var ci) ? ci : 0;
                if (code == 410) return null;
                var msg = obj.TryGetProperty("message", out var m) ? m.GetString() : null;
                throw new HttpRequestException($"watch error {code}: {msg}");
            }
            if (obj.TryGetProperty("metadata", out var md) && md.TryGetProperty("resourceVersion", out var r) && r.GetString() is { Length: > 0 } nrv)
                rv = nrv;
            if (type == "BOOKMARK") continue;
            var s = Read(obj);
            if (s is null) continue;
            lock (_lock)
            {
                if (type == "DELETED" || s.Auths is null) _secrets.Remove(s.Key);
                else if (type is "ADDED" or "MODIFIED") _secrets[s.Key] = s.Auths;
            }
            Interlocked.Increment(ref _events);
            _log.LogDebug("kubeconfig keychain: {Event} {Secret}", type, s.Key);
        }
        return rv;
    }

    private sealed record Secret(string Key, Dictionary<string, RegistryCredential>? Auths);

    /// <summary>One secret's key and auths; Auths null when it holds no usable docker config (logged).</summary>
    private Secret? Read(JsonElement obj)
    {
        if (!obj.TryGetProperty("metadata", out var md)) return null;
        string? ns = md.TryGetProperty("namespace", out var n) ? n.GetString() : null, name = md.TryGetProperty("name", out var nm) ? nm.GetString() : null;
        if (string.IsNullOrEmpty(name)) return null;
        var key = $"{ns}/{name}";
        if (obj.TryGetProperty("type", out var type) && type.GetString() != SecretType) return new Secret(key, null);
        if (!obj.TryGetProperty("data", out var data) || !data.TryGetProperty(DockerConfigJsonKey, out var cfg) || cfg.GetString() is not { } b64)
        {
            _log.LogWarning("kubeconfig keychain: secret {Secret} has no {Key}; skipped", key, DockerConfigJsonKey);
            return new Secret(key, null);
        }
        try
        {
            return new Secret(key, DockerConfigCredentialProvider.ParseAuths(Convert.FromBase64String(b64), $"secret {key}"));
        }
        catch (FormatException e)
        {
            _log.LogWarning("kubeconfig keychain: secret {Secret} is not a usable docker config: {Error}; skipped", key, e.Message);
            return new Secret(key, null);
        }
    }

    private static HttpRequestMessage Request(KubeClientConfig config, Uri uri)
    {
        var req = new HttpRequestMessage(HttpMethod.Get, uri);
        req.Headers.Accept.ParseAdd("application/json");
        if (config.Authorization() is { } auth) req.Headers.TryAddWithoutValidation("Authorization", auth);
        return req;
    }

    private static async Task EnsureOkAsync(HttpResponseMessage resp, string what, CancellationToken ct)
    {
        if (resp.IsSuccessStatusCode) return;
        var text = await resp.Content.ReadAsStringAsync(ct).ConfigureAwait(false);
        if (text.Length > 300) text = text[..300];
        throw new HttpRequestException($"{what}: {(int)resp.StatusCode} {resp.ReasonPhrase}: {text}", null, resp.StatusCode);
    }

    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        Task? run;
        lock (_lock) run = _run;
        if (run is not null) await run.ConfigureAwait(false);
        _stop.Dispose();
    }
}
