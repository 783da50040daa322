using System.Text;
using System.Text.Json;

namespace Stargz.Registry;

/// <summary>
/// Credentials for one registry host. <see cref="IdentityToken"/> is an OAuth refresh token exchanged at the token
/// server; <see cref="RegistryToken"/> is a bearer token sent to the registry as it is (CRI's registry_token).
/// ToString never shows a secret.
/// </summary>
public sealed record RegistryCredential(string? Username, string? Secret, string? IdentityToken = null, string? RegistryToken = null)
{
    public bool HasBasic => !string.IsNullOrEmpty(Username) && Secret is not null;
    public override string ToString() => $"credential(user={Username ?? "-"}, secret={(Secret is null ? "none" : "***")}, identitytoken={(IdentityToken is null ? "none" : "***")}, registrytoken={(RegistryToken is null ? "none" : "***")})";
}

/// <summary>Supplies credentials for a registry host (host[:port]); null when it has none.</summary>
public interface ICredentialProvider
{
    ValueTask<RegistryCredential?> GetAsync(string host, CancellationToken ct);

    /// <summary>
    /// Credentials for <paramref name="host"/> while working on <paramref name="image"/> (null when the request is not
    /// about one image). Providers keyed by image (the CRI keychain) override this; host-keyed ones need not.
    /// </summary>
    ValueTask<RegistryCredential?> GetAsync(string host, ImageReference? image, CancellationToken ct) => GetAsync(host, ct);
}

/// <summary>Credentials given in code or by the daemon's config, keyed by host.</summary>
public sealed class StaticCredentialProvider : ICredentialProvider
{
    private readonly Dictionary<string, RegistryCredential> _byHost = new(StringComparer.OrdinalIgnoreCase);

    public StaticCredentialProvider Add(string host, RegistryCredential credential)
    {
        _byHost[host] = credential;
        return this;
    }

    public StaticCredentialProvider Add(string host, string username, string password) => Add(host, new RegistryCredential(username, password));

    public ValueTask<RegistryCredential?> GetAsync(string host, CancellationToken ct)
        => ValueTask.FromResult(_byHost.TryGetValue(host, out var c) ? c
            : host == ImageReference.DockerHubApiHost && _byHost.TryGetValue(ImageReference.DockerHubHost, out var d) ? d : null);
}

/// <summary>Asks several providers in order; the first that knows the host wins.</summary>
public sealed class ChainedCredentialProvider(params ICredentialProvider[] providers) : ICredentialProvider
{
    public ValueTask<RegistryCredential?> GetAsync(string host, CancellationToken ct) => GetAsync(host, null, ct);

    public async ValueTask<RegistryCredential?> GetAsync(string host, ImageReference? image, CancellationToken ct)
    {
        foreach (var p in providers)
        {
            var c = await p.GetAsync(host, image, ct).ConfigureAwait(false);
            if (c is not null) return c;
        }
        return null;
    }
}

/// <summary>
/// Reads docker's <c>config.json</c> (<c>$DOCKER_CONFIG/config.json</c> or <c>~/.docker/config.json</c>):
/// <c>auths[HOST].auth</c> (base64 user:password), <c>username</c>/<c>password</c>, <c>identitytoken</c>; and, as docker
/// does, asks a credential helper first when one is named for the host (<c>credHelpers[HOST]</c>) or for all hosts
/// (<c>credsStore</c>), falling back to <c>auths</c> when the helper has nothing. Re-read when the file changes.
/// </summary>
public sealed class DockerConfigCredentialProvider : ICredentialProvider
{
    private const string DockerHubServer = "https://index.docker.io/v1/";

    private sealed record Loaded(Dictionary<string, RegistryCredential> Entries, string? CredsStore, Dictionary<string, string> CredHelpers)
    {
        public static readonly Loaded Empty = new(new(StringComparer.OrdinalIgnoreCase), null, new(StringComparer.OrdinalIgnoreCase));
    }

    private readonly string _path;
    private readonly Lock _lock = new();
    private DateTime _loadedMtime = DateTime.MinValue;
    private long _checkedAtMs;
    private bool _checkedOnce;
    private readonly long _recheckMs;
    private readonly CredentialHelpers _helpers;
    private Loaded _loaded = Loaded.Empty;

    /// <param name="recheckInterval">how often the file's mtime is looked at (default 1 s).</param>
    /// <param name="helpers">runs the credential helpers the file names (default: from $PATH, 10 s timeout, answers kept 60 s).</param>
    public DockerConfigCredentialProvider(string? path = null, TimeSpan? recheckInterval = null, CredentialHelpers? helpers = null)
    {
        _path = path ?? DefaultPath();
        _recheckMs = (long)(recheckInterval ?? TimeSpan.FromSeconds(1)).TotalMilliseconds;
        _helpers = helpers ?? new CredentialHelpers();
    }

    public string Path => _path;

    public static string DefaultPath()
    {
        var dir = Environment.GetEnvironmentVariable("DOCKER_CONFIG");
        if (string.IsNullOrEmpty(dir))
            dir = System.IO.Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".docker");
        return System.IO.Path.Combine(dir, "config.json");
    }

    public ValueTask<RegistryCredential?> GetAsync(string host, CancellationToken ct)
    {
        var loaded = Load();
        var hub = IsDockerHub(host);
        if (HelperFor(loaded, host, hub) is { } helper)
            return WithHelperAsync(loaded, helper, hub ? DockerHubServer : host, host, hub, ct);
        return ValueTask.FromResult(FromAuths(loaded.Entries, host, hub));
    }

    private async ValueTask<RegistryCredential?> WithHelperAsync(Loaded loaded, string helper, string server, string host, bool hub, CancellationToken ct)
        => await _helpers.GetAsync(helper, server, ct).ConfigureAwait(false) ?? FromAuths(loaded.Entries, host, hub);

    private static string? HelperFor(Loaded loaded, string host, bool hub) => ForHost(loaded.CredHelpers, host, hub) ?? loaded.CredsStore;

    private static RegistryCredential? FromAuths(Dictionary<string, RegistryCredential> entries, string host, bool hub) => ForHost(entries, host, hub);

    /// <summary>The <c>auths</c> of a docker config (as in an image pull secret), keyed by host.</summary>
    internal static Dictionary<string, RegistryCredential> ParseAuths(byte[] json, string source) => Parse(json, source).Entries;

    /// <summary>The entry of <c>auths</c> parsed by <see cref="ParseAuths"/> for <paramref name="host"/>.</summary>
    internal static RegistryCredential? ForHost(Dictionary<string, RegistryCredential> auths, string host)
        => ForHost(auths, host, IsDockerHub(host));

    private static bool IsDockerHub(string host) => host is ImageReference.DockerHubHost or ImageReference.DockerHubApiHost or "index.docker.io";

    /// <summary>The entry for <paramref name="host"/>; for Docker Hub also under any of the names docker files it by.</summary>
    private static T? ForHost<T>(Dictionary<string, T> byHost, string host, bool hub) where T : class
    {
        if (byHost.TryGetValue(host, out var v)) return v;
        if (hub)
            foreach (var k in (ReadOnlySpan<string>)[DockerHubServer, "index.docker.io", "docker.io", "registry-1.docker.io"])
                if (byHost.TryGetValue(k, out v)) return v;
        return null;
    }

    private Loaded Load()
    {
        lock (_lock)
        {
            // Look at the file at most once per interval: this can run for requests on the hot path.
            var now = Environment.TickCount64;
            if (_checkedOnce && now - _checkedAtMs < _recheckMs) return _loaded;
            _checkedOnce = true;
            _checkedAtMs = now;
            var mtime = File.Exists(_path) ? File.GetLastWriteTimeUtc(_path) : DateTime.MinValue;
            if (mtime == _loadedMtime) return _loaded;
            _loaded = mtime == DateTime.MinValue ? Loaded.Empty : Parse(File.ReadAllBytes(_path), _path);
            _loadedMtime = mtime;
            return _loaded;
        }
    }

    private static Loaded Parse(byte[] json, string source)
    {
        var result = new Dictionary<string, RegistryCredential>(StringComparer.OrdinalIgnoreCase);
        var helpers = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        string? store;
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json); }
        catch (JsonException e) { throw new FormatException($"{source}: not valid JSON: {e.Message}", e); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new FormatException($"{source}: not a JSON object");
            store = Str(doc.RootElement, "credsStore");
            if (store is not null) CheckHelperName(store, "credsStore", source);
            if (doc.RootElement.TryGetProperty("credHelpers", out var ch) && ch.ValueKind == JsonValueKind.Object)
                foreach (var h in ch.EnumerateObject())
                {
                    if (h.Value.ValueKind != JsonValueKind.String) throw new FormatException($"{source}: credHelpers[\"{h.Name}\"] is not a string");
                    var name = h.Value.GetString()!;
                    CheckHelperName(name, $"credHelpers[\"{h.Name}\"]", source);
                    helpers[KeyOf(h.Name)] = name;
                }
            if (!doc.RootElement.TryGetProperty("auths", out var auths) || auths.ValueKind != JsonValueKind.Object)
                return new Loaded(result, string.IsNullOrEmpty(store) ? null : store, helpers);
            foreach (var entry in auths.EnumerateObject())
            {
                if (entry.Value.ValueKind != JsonValueKind.Object) continue;
                string? user = Str(entry.Value, "username"), pass = Str(entry.Value, "password");
                var auth = Str(entry.Value, "auth");
                if (!string.IsNullOrEmpty(auth))
                {
                    string decoded;
                    try { decoded = Encoding.UTF8.GetString(Convert.FromBase64String(auth)); }
                    catch (FormatException) { throw new FormatException($"{source}: auths[\"{entry.Name}\"].auth is not base64"); }
                    var colon = decoded.IndexOf(':');
                    if (colon < 0) throw new FormatException($"{source}: auths[\"{entry.Name}\"].auth is not user:password");
                    user = decoded[..colon];
                    pass = decoded[(colon + 1)..];
                }
                var idt = Str(entry.Value, "identitytoken");
                if (user is null && pass is null && idt is null) continue;
                result[KeyOf(entry.Name)] = new RegistryCredential(user, pass, string.IsNullOrEmpty(idt) ? null : idt);
            }
        }
        return new Loaded(result, string.IsNullOrEmpty(store) ? null : store, helpers);
    }

    // The name becomes part of a program name looked up on the search path: no path separators.
    private static void CheckHelperName(string name, string key, string source)
    {
        if (name.Contains('/') || name.Contains('\0') || name is "." or "..")
            throw new FormatException($"{source}: {key} \"{name}\" is not a credential helper name");
    }

    // Keys may be URLs ("https://host:port/v1/"); the host part is what we look up by.
    private static string KeyOf(string name)
    {
        if (name == "https://index.docker.io/v1/") return name;
        var s = name;
        var scheme = s.IndexOf("://", StringComparison.Ordinal);
        if (scheme >= 0) s = s[(scheme + 3)..];
        var slash = s.IndexOf('/');
        return slash >= 0 ? s[..slash] : s;
    }

    private static string? Str(JsonElement e, string name)
        => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
}
