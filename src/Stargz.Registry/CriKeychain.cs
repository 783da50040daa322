using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Registry;

/// <summary>
/// The credentials kubelet sends with CRI PullImage (its AuthConfig), kept per image so the lazy layers of that image
/// can read their blobs with them: the reference's CRI keychain. The daemon's CRI ImageService proxy calls
/// <see cref="Remember"/> on every PullImage and <see cref="Forget"/> on RemoveImage; the registry client asks
/// <see cref="GetAsync(string, ImageReference?, CancellationToken)"/> with the image of the blob it reads.
/// By default held in memory only: after a daemon restart, kubelet's next pull of the image brings them back, but
/// kubelet does not pull an image that is present, so until then the not yet fetched chunks of a private image cannot
/// be read (reference issue #1989). With a store path (<c>[cri_keychain] persist_credentials</c>) every change is also
/// written to that file (mode 0600, replaced atomically) and read back at start, so the credentials last as long as
/// the image is on the node. Secrets are never logged.
/// </summary>
public sealed class CriKeychain : ICredentialProvider
{
    private sealed record Entry(RegistryCredential Credential, string? ServerHost, long Order);

    private readonly Lock _lock = new();
    private readonly Dictionary<string, Entry> _byImage = new(StringComparer.Ordinal);
    private long _order;
    private readonly string? _storePath;
    private readonly ILogger _log;
    // Serialises whole saves (snapshot + write + rename), so an older snapshot never replaces a newer file.
    private readonly Lock _saveLock = new();

    /// <summary>A keychain in memory only.</summary>
    public CriKeychain() : this(null, null) { }

    /// <param name="storePath">the file the credentials persist in (null: memory only). Loaded now when it exists.</param>
    /// <param name="log">where load/save problems are reported (never a secret).</param>
    public CriKeychain(string? storePath, ILogger? log)
    {
        _storePath = storePath;
        _log = log ?? NullLogger.Instance;
        if (storePath != null) Load(storePath);
    }

    /// <summary>The file the credentials persist in, or null.</summary>
    public string? StorePath => _storePath;

    /// <summary>Images with credentials now.</summary>
    public int Count { get { lock (_lock) return _byImage.Count; } }

    /// <summary>
    /// Keeps <paramref name="credential"/> for <paramref name="image"/> (normalised, so "busybox" and
    /// "docker.io/library/busybox:latest" are the same key). A pull without credentials (null) drops what an earlier
    /// pull of the image left, as the reference does: the latest pull says how the image is reached.
    /// </summary>
    /// <param name="serverAddress">AuthConfig.server_address: when set, the credentials go to that host only.</param>
    /// <exception cref="InvalidReferenceException">the image is not a valid reference.</exception>
    public void Remember(string image, RegistryCredential? credential, string? serverAddress = null)
    {
        var key = ImageReference.Parse(image).ToString();
        var server = string.IsNullOrEmpty(serverAddress) ? null : HostOf(serverAddress);
        bool changed;
        lock (_lock)
        {
            if (credential is null) changed = _byImage.Remove(key);
            else
            {
                // A re-pull with the same credentials (kubelet's imagePullPolicy: Always) rewrites nothing.
                changed = !_byImage.TryGetValue(key, out var old) || old.Credential != credential || old.ServerHost != server;
                _byImage[key] = new Entry(credential, server, ++_order);
            }
        }
        if (changed) Save();
    }

    /// <summary>Drops the credentials of <paramref name="image"/> (CRI RemoveImage). False when it had none or is not a reference.</summary>
    public bool Forget(string image) => Forget([image]) > 0;

    /// <summary>Drops the credentials of every reference in <paramref name="images"/> (an image's tags and digests, as
    /// RemoveImage by image ID removes them all); names that are not references are skipped. Returns how many were held.</summary>
    public int Forget(IEnumerable<string> images)
    {
        var n = 0;
        lock (_lock)
        {
            foreach (var image in images)
                if (ImageReference.TryParse(image, out var r) && _byImage.Remove(r.ToString())) n++;
        }
        if (n > 0) Save();
        return n;
    }

    /// <summary>The images credentials are held for (normalised references), for logs and tests; no secret.</summary>
    public IReadOnlyList<string> Images()
    {
        lock (_lock) return [.. _byImage.Keys];
    }

    /// <summary>
    /// Drops every held credential whose image is not in <paramref name="liveImages"/> (normalised references of the
    /// images whose remote snapshots are still there): an image removed while the daemon was down, or by a client
    /// other than kubelet, takes its credentials along at the next start. Returns how many were dropped.
    /// </summary>
    public int Retain(IReadOnlyCollection<string> liveImages)
    {
        var live = new HashSet<string>(StringComparer.Ordinal);
        foreach (var i in liveImages)
            if (ImageReference.TryParse(i, out var r)) live.Add(r.ToString());
        var n = 0;
        lock (_lock)
        {
            foreach (var k in _byImage.Keys.ToList())
                if (!live.Contains(k) && _byImage.Remove(k)) n++;
        }
        if (n > 0)
        {
            _log.LogInformation("CRI keychain: dropped the credentials of {Count} image(s) no remote snapshot refers to any more", n);
            Save();
        }
        return n;
    }

    /// <summary>Removes a credentials file left from when persistence was on (it is off now: nothing may linger).</summary>
    public static bool DeleteStore(string path)
    {
        if (!File.Exists(path)) return false;
        File.Delete(path);
        return true;
    }

    private const int StoreVersion = 1;

    private void Save()
    {
        if (_storePath is not { } path) return;
        lock (_saveLock)
        {
            List<(string Image, Entry E)> entries;
            lock (_lock)
            {
                entries = new List<(string, Entry)>(_byImage.Count);
                foreach (var (k, e) in _byImage) entries.Add((k, e));
            }
            var tmp = path + ".tmp";
            try
            {
                if (entries.Count == 0)
                {
                    // Nothing held: no file with nothing in it lying around either.
                    if (File.Exists(path)) File.Delete(path);
                    return;
                }
                // Created 0600 from the first byte (never readable by others, not even between create and chmod).
                var opts = new FileStreamOptions
                {
                    Mode = FileMode.Create, Access = FileAccess.Write, Share = FileShare.None,
                    UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite,
                };
                using (var fs = new FileStream(tmp, opts))
                {
                    // An earlier .tmp may have been created with other bits; make sure.
                    File.SetUnixFileMode(fs.SafeFileHandle, UnixFileMode.UserRead | UnixFileMode.UserWrite);
                    using (var w = new Utf8JsonWriter(fs))
                    {
                        w.WriteStartObject();
                        w.WriteNumber("version", StoreVersion);
                        w.WriteStartArray("images");
                        foreach (var (image, e) in entries)
                        {
                            w.WriteStartObject();
                            w.WriteString("image", image);
                            if (e.ServerHost != null) w.WriteString("server", e.ServerHost);
                            w.WriteNumber("order", e.Order);
                            var c = e.Credential;
                            if (c.Username != null) w.WriteString("username", c.Username);
                            if (c.Secret != null) w.WriteString("secret", c.Secret);
                            if (c.IdentityToken != null) w.WriteString("identity_token", c.IdentityToken);
                            if (c.RegistryToken != null) w.WriteString("registry_token", c.RegistryToken);
                            w.WriteEndObject();
                        }
                        w.WriteEndArray();
                        w.WriteEndObject();
                    }
                    fs.Flush(flushToDisk: true);
                }
                File.Move(tmp, path, overwrite: true);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // The in-memory keychain still works; only a restart would lose what was not written.
                _log.LogWarning("cannot persist the CRI keychain's credentials to {Path}: {Error}; they are kept in memory only until the next change",
                    path, e.Message);
                try { File.Delete(tmp); } catch (Exception d) when (d is IOException or UnauthorizedAccessException) { }
            }
        }
    }

    private void Load(string path)
    {
        if (!File.Exists(path)) return;
        try
        {
            var mode = File.GetUnixFileMode(path);
            if ((mode & ~(UnixFileMode.UserRead | UnixFileMode.UserWrite)) != 0)
            {
                _log.LogWarning("CRI keychain store {Path} had mode {Mode}; set to 0600", path, Convert.ToString((int)mode, 8));
                File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            }
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("version", out var v) || v.ValueKind != JsonValueKind.Number
                || v.GetInt32() != StoreVersion || !root.TryGetProperty("images", out var images) || images.ValueKind != JsonValueKind.Array)
                throw new FormatException($"not a version {StoreVersion} CRI keychain store");
            var n = 0;
            lock (_lock)
            {
                foreach (var i in images.EnumerateArray())
                {
                    var image = Str(i, "image");
                    if (image is null || !ImageReference.TryParse(image, out var r)) continue;
                    var cred = new RegistryCredential(Str(i, "username"), Str(i, "secret"), Str(i, "identity_token"), Str(i, "registry_token"));
                    if (cred.Username is null && cred.IdentityToken is null && cred.RegistryToken is null) continue;
                    var order = i.TryGetProperty("order", out var o) && o.ValueKind == JsonValueKind.Number ? o.GetInt64() : 0;
                    _byImage[r.ToString()] = new Entry(cred, Str(i, "server"), order);
                    _order = Math.Max(_order, order);
                    n++;
                }
            }
            _log.LogInformation("CRI keychain: credentials of {Count} image(s) restored from {Path}", n, path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or JsonException or FormatException or InvalidOperationException)
        {
            // Never the content: it holds secrets. kubelet's next pull of each image brings its credentials back.
            // (a JSON error's message may quote the text it choked on)
            _log.LogWarning("CRI keychain store {Path} cannot be read ({Error}); starting without persisted credentials", path,
                e is JsonException ? "not valid JSON" : e.Message);
        }
    }

    private static string? Str(JsonElement o, string name)
        => o.TryGetProperty(name, out var p) && p.ValueKind == JsonValueKind.String ? p.GetString() : null;

    /// <summary>Not keyed by image: nothing (the chain goes on to the docker config).</summary>
    public ValueTask<RegistryCredential?> GetAsync(string host, CancellationToken ct) => ValueTask.FromResult<RegistryCredential?>(null);

    /// <summary>
    /// The credentials of <paramref name="image"/> when <paramref name="host"/> may receive them; else, those of the most
    /// recent pull of the same repository (a layer label may name the image by another tag or by digest).
    /// Credentials go to the server_address host when one was given, else only to the image's own registry (never to
    /// a mirror of it).
    /// </summary>
    public ValueTask<RegistryCredential?> GetAsync(string host, ImageReference? image, CancellationToken ct)
    {
        if (image is null) return ValueTask.FromResult<RegistryCredential?>(null);
        Entry? hit = null;
        lock (_lock)
        {
            if (!_byImage.TryGetValue(image.ToString(), out hit))
            {
                var prefix = image.Name + ":";
                var prefixDigest = image.Name + "@";
                foreach (var (k, e) in _byImage)
                    if ((k.StartsWith(prefix, StringComparison.Ordinal) || k.StartsWith(prefixDigest, StringComparison.Ordinal))
                        && (hit is null || e.Order > hit.Order))
                        hit = e;
            }
        }
        if (hit is null) return ValueTask.FromResult<RegistryCredential?>(null);
        var allowed = hit.ServerHost ?? image.Host;
        return ValueTask.FromResult(SameRegistry(allowed, host) ? hit.Credential : null);
    }

    /// <summary>
    /// Maps CRI's AuthConfig fields to a credential: username/password, else <paramref name="auth"/> (base64
    /// "user:password"); identity_token (an OAuth refresh token) and registry_token (a bearer token) as they are.
    /// Null when every field is empty (an anonymous pull).
    /// </summary>
    /// <exception cref="FormatException">auth is not base64 "user:password" (the message never contains it).</exception>
    public static RegistryCredential? FromAuthConfig(string? username, string? password, string? auth, string? identityToken, string? registryToken)
    {
        string? user = NullIfEmpty(username), secret = user is null ? null : password ?? "";
        if (user is null && NullIfEmpty(auth) is { } a)
        {
            string decoded;
            try { decoded = Encoding.UTF8.GetString(Convert.FromBase64String(a)); }
            catch (FormatException) { throw new FormatException("AuthConfig.auth is not base64"); }
            var colon = decoded.IndexOf(':');
            if (colon < 0) throw new FormatException("AuthConfig.auth is not base64 of user:password");
            user = decoded[..colon];
            // docker pads with NULs in some versions; the reference trims them too.
            secret = decoded[(colon + 1)..].Trim('\0');
        }
        var idt = NullIfEmpty(identityToken);
        var rt = NullIfEmpty(registryToken);
        if (user is null && idt is null && rt is null) return null;
        return new RegistryCredential(user, secret, idt, rt);
    }

    private static string? NullIfEmpty(string? s) => string.IsNullOrEmpty(s) ? null : s;

    // "https://index.docker.io/v1/", "registry:5000", "http://127.0.0.1:5000/v2/" -> host[:port].
    internal static string HostOf(string serverAddress)
    {
        var s = serverAddress.Trim();
        var scheme = s.IndexOf("://", StringComparison.Ordinal);
        if (scheme >= 0) s = s[(scheme + 3)..];
        var slash = s.IndexOf('/');
        return slash >= 0 ? s[..slash] : s;
    }

    private static bool SameRegistry(string a, string b)
        => string.Equals(Canonical(a), Canonical(b), StringComparison.OrdinalIgnoreCase);

    // Docker Hub answers under three names; its credentials are keyed by index.docker.io.
    private static string Canonical(string host)
        => host is ImageReference.DockerHubHost or ImageReference.DockerHubApiHost or "index.docker.io" ? "index.docker.io" : host;
}
