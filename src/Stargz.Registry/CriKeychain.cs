using System.Text;

namespace Stargz.Registry;

/// <summary>
/// The credentials kubelet sends with CRI PullImage (its AuthConfig), kept per image so the lazy layers of that image
/// can read their blobs with them: the reference's CRI keychain. The daemon's CRI ImageService proxy calls
/// <see cref="Remember"/> on every PullImage and <see cref="Forget"/> on RemoveImage; the registry client asks
/// <see cref="GetAsync(string, ImageReference?, CancellationToken)"/> with the image of the blob it reads.
/// Held in memory only (never written to disk): after a daemon restart, kubelet's next pull brings them back.
/// </summary>
public sealed class CriKeychain : ICredentialProvider
{
    private sealed record Entry(RegistryCredential Credential, string? ServerHost, long Order);

    private readonly Lock _lock = new();
    private readonly Dictionary<string, Entry> _byImage = new(StringComparer.Ordinal);
    private long _order;

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
        lock (_lock)
        {
            if (credential is null) _byImage.Remove(key);
            else _byImage[key] = new Entry(credential, string.IsNullOrEmpty(serverAddress) ? null : HostOf(serverAddress), ++_order);
        }
    }

    /// <summary>Drops the credentials of <paramref name="image"/> (CRI RemoveImage). False when it had none or is not a reference.</summary>
    public bool Forget(string image)
    {
        if (!ImageReference.TryParse(image, out var r)) return false;
        lock (_lock) return _byImage.Remove(r.ToString());
    }

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
