namespace Stargz.Snapshotter;

/// <summary>
/// Where the keys of one call live in the store when the call carries a `containerd-namespace` header.
/// <para>
/// containerd 1.6 sends the header only on calls made from its own namespaced contexts (CRI's unpack), with keys it
/// already prefixed (`NS/N/KEY`) or bare chainIDs of remote snapshots, and sends no header on the calls it forwards
/// from ctr for the same snapshots. So keys in containerd's form for the header's namespace, and bare names created
/// without a header, must mean the same snapshot with or without the header. Any other key from a header-carrying
/// (direct) client is kept in that namespace: it is stored as `NS//KEY`, a form containerd never produces (its
/// sequence numbers are never empty), so direct clients of different namespaces never see each other's snapshots.
/// </para>
/// </summary>
public readonly struct HeaderNamespace
{
    private readonly string? _owned;  // "NS/": containerd's own prefix for this namespace
    private readonly string? _scoped; // "NS//": where a direct client's keys are stored

    public HeaderNamespace(string? ns)
    {
        if (string.IsNullOrEmpty(ns)) return;
        _owned = ns + "/";
        _scoped = ns + "//";
    }

    /// <summary>No header: keys are taken as they are.</summary>
    public bool IsNone => _owned == null;

    /// <summary>True when the key is in containerd's form for this namespace (or there is no header).</summary>
    public bool IsContainerdKey(string key)
        => _owned == null || key.Length == 0 || (key.StartsWith(_owned, StringComparison.Ordinal) && !key.StartsWith(_scoped!, StringComparison.Ordinal));

    /// <summary>The store key for a name this call creates.</summary>
    public string ToStore(string key) => IsContainerdKey(key) ? key : _scoped + key;

    /// <summary>
    /// The store key for a name this call refers to: the namespace's own snapshot if there is one, else a shared
    /// snapshot (a name without '/', created without a header, e.g. a remote snapshot under its chainID), else the
    /// namespace's key (which does not exist, so the caller answers NotFound).
    /// </summary>
    public async ValueTask<string> ResolveAsync(string key, Func<string, Task<bool>> exists)
    {
        if (IsContainerdKey(key)) return key;
        var scoped = _scoped + key;
        if (await exists(scoped)) return scoped;
        if (IsShared(key) && await exists(key)) return key;
        return scoped;
    }

    /// <summary>Whether List under this header shows the store key.</summary>
    public bool Sees(string storeKey) => _owned == null || storeKey.StartsWith(_owned, StringComparison.Ordinal) || IsShared(storeKey);

    /// <summary>The name this call's client knows a store key by (the inverse of <see cref="ToStore"/>).</summary>
    public string ToClient(string storeKey)
        => _scoped != null && storeKey.StartsWith(_scoped, StringComparison.Ordinal) ? storeKey[_scoped.Length..] : storeKey;

    private static bool IsShared(string key) => !key.Contains('/');
}
