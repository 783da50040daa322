using System.Globalization;
using System.Net;
using Tomlyn;
using Tomlyn.Model;
using Stargz.Registry;

namespace Stargz.Daemon;

/// <summary>A config file the daemon refuses to start with; the message names the file and the key.</summary>
public sealed class ConfigException(string message) : Exception(message);

/// <summary>
/// Reads config.toml into <see cref="DaemonConfig"/>: every key typed and range-checked; unknown keys are collected
/// as warnings (the daemon logs them) so a config written for the reference still starts.
/// </summary>
public static class ConfigLoader
{
    public const string DefaultPath = "/etc/containerd-stargz-grpc/config.toml";

    /// <summary>Loads <paramref name="path"/>. A missing file is fine only when it is the default path (defaults apply).</summary>
    public static DaemonConfig Load(string path, bool explicitPath, List<string> warnings)
    {
        if (!File.Exists(path))
        {
            if (explicitPath && path != DefaultPath) throw new ConfigException($"config file {path} does not exist");
            return new DaemonConfig();
        }
        string text;
        try { text = File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new ConfigException($"config file {path}: {e.Message}"); }
        return Parse(text, path, warnings);
    }

    public static DaemonConfig Parse(string toml, string source, List<string> warnings)
    {
        TomlTable model;
        try { model = TomlModel.Parse(toml); }
        catch (TomlException e) { throw new ConfigException($"config file {source} is not valid TOML: {e.Message}"); }
        var c = new DaemonConfig();
        var r = new Reader(source, warnings);
        foreach (var (key, value) in model)
        {
            switch (key)
            {
                case "noprefetch": c.NoPrefetch = r.Bool(key, value); break;
                case "no_background_fetch": c.NoBackgroundFetch = r.Bool(key, value); break;
                case "prefetch_size": c.PrefetchSize = r.NonNegative(key, value); break;
                case "prefetch_timeout_sec": c.PrefetchTimeoutSec = r.NonNegative(key, value); break;
                case "allow_no_verification": c.AllowNoVerification = r.Bool(key, value); break;
                case "disable_verification": c.DisableVerification = r.Bool(key, value); break;
                case "max_concurrency": c.MaxConcurrency = r.NonNegative(key, value); break;
                case "no_prometheus": c.NoPrometheus = r.Bool(key, value); break;
                case "debug": c.Debug = r.Bool(key, value); break;
                case "async_remove": c.AsyncRemove = r.Bool(key, value); break;
                case "resolve_result_entry_ttl_sec": c.ResolveResultEntryTtlSec = r.NonNegative(key, value); break;
                case "metrics_address": c.MetricsAddress = r.Str(key, value); break;
                case "blob": ReadBlob(c.Blob, r.Table(key, value), r); break;
                case "directory_cache": ReadDirCache(c.DirectoryCache, r.Table(key, value), r); break;
                case "fuse": ReadFuse(c.Fuse, r.Table(key, value), r); break;
                case "erofs": ReadErofs(c.Erofs, r.Table(key, value), r); break;
                case "resolver": ReadResolver(c, r.Table(key, value), r); break;
                case "registry": ReadRegistry(c.Registry, r.Table(key, value), r); break;
                case "cri_keychain": ReadCriKeychain(c.CriKeychain, r.Table(key, value), r); break;
                case "kubeconfig_keychain": ReadKubeconfigKeychain(c.KubeconfigKeychain, r.Table(key, value), r); break;
                default: r.Unknown(key); break;
            }
        }
        Validate(c, source);
        return c;
    }

    private static void ReadBlob(DaemonConfig.BlobConfig b, TomlTable t, Reader r)
    {
        foreach (var (k, v) in t)
        {
            var key = "blob." + k;
            switch (k)
            {
                case "chunk_size": b.ChunkSize = r.NonNegative(key, v); break;
                case "fetching_timeout_sec": b.FetchingTimeoutSec = r.NonNegative(key, v); break;
                case "force_single_range_mode": b.ForceSingleRangeMode = r.Bool(key, v); break;
                case "prefetch_chunk_size": b.PrefetchChunkSize = r.NonNegative(key, v); break;
                case "max_retries": b.MaxRetries = r.NonNegative(key, v); break;
                case "min_wait_msec": b.MinWaitMsec = r.NonNegative(key, v); break;
                case "max_wait_msec": b.MaxWaitMsec = r.NonNegative(key, v); break;
                case "valid_interval": b.ValidInterval = r.NonNegative(key, v); break;
                case "check_always": b.CheckAlways = r.Bool(key, v); break;
                case "stall_timeout_sec": b.StallTimeoutSec = r.NonNegative(key, v); break;
                case "outage_timeout_sec": b.OutageTimeoutSec = r.NonNegative(key, v); break;
                default: r.Unknown(key); break;
            }
        }
    }

    private static void ReadDirCache(DaemonConfig.DirectoryCacheConfig d, TomlTable t, Reader r)
    {
        foreach (var (k, v) in t)
        {
            var key = "directory_cache." + k;
            switch (k)
            {
                case "max_lru_cache_entry": d.MaxLruCacheEntry = r.NonNegative(key, v); break;
                case "max_lru_cache_bytes": d.MaxLruCacheBytes = r.NonNegative(key, v); break;
                case "max_cache_fds": d.MaxCacheFds = r.NonNegative(key, v); break;
                case "sync_add": d.SyncAdd = r.Bool(key, v); break;
                case "direct": d.Direct = r.Bool(key, v); break;
                case "max_disk_mb": d.MaxDiskMb = r.NonNegative(key, v); break;
                default: r.Unknown(key); break;
            }
        }
    }

    private static void ReadFuse(DaemonConfig.FuseConfig f, TomlTable t, Reader r)
    {
        foreach (var (k, v) in t)
        {
            var key = "fuse." + k;
            switch (k)
            {
                case "attr_timeout": f.AttrTimeout = r.Long(key, v); break;
                case "entry_timeout": f.EntryTimeout = r.Long(key, v); break;
                case "passthrough": f.Passthrough = r.Bool(key, v); break;
                default: r.Unknown(key); break;
            }
        }
    }

    private static void ReadErofs(DaemonConfig.ErofsConfig e, TomlTable t, Reader r)
    {
        foreach (var (k, v) in t)
        {
            var key = "erofs." + k;
            switch (k)
            {
                case "promote": e.Promote = r.Bool(key, v); break;
                default: r.Unknown(key); break;
            }
        }
    }

    private static void ReadCriKeychain(DaemonConfig.CriKeychainConfig k, TomlTable t, Reader r)
    {
        foreach (var (key, v) in t)
        {
            switch (key)
            {
                case "enable_keychain": k.EnableKeychain = r.Bool("cri_keychain.enable_keychain", v); break;
                case "image_service_path": k.ImageServicePath = r.Str("cri_keychain.image_service_path", v); break;
                case "persist_credentials": k.PersistCredentials = r.Bool("cri_keychain.persist_credentials", v); break;
                default: r.Unknown("cri_keychain." + key); break;
            }
        }
        if (!k.EnableKeychain && k.ImageServicePath.Length > 0)
            r.Warn("cri_keychain.image_service_path is set but cri_keychain.enable_keychain is not true: the CRI keychain is off");
        if (!k.EnableKeychain && k.PersistCredentials)
            r.Warn("cri_keychain.persist_credentials is set but cri_keychain.enable_keychain is not true: nothing is persisted");
        // The reference proxies to containerd's socket unless told otherwise; configs written for it rely on that.
        if (k.EnableKeychain && k.ImageServicePath.Length == 0) k.ImageServicePath = DaemonConfig.CriKeychainConfig.DefaultImageServicePath;
    }

    private static void ReadKubeconfigKeychain(DaemonConfig.KubeconfigKeychainConfig k, TomlTable t, Reader r)
    {
        foreach (var (key, v) in t)
        {
            switch (key)
            {
                case "enable_keychain": k.EnableKeychain = r.Bool("kubeconfig_keychain.enable_keychain", v); break;
                case "kubeconfig_path": k.KubeconfigPath = r.Str("kubeconfig_keychain.kubeconfig_path", v); break;
                default: r.Unknown("kubeconfig_keychain." + key); break;
            }
        }
        if (!k.EnableKeychain && k.KubeconfigPath.Length > 0)
            r.Warn("kubeconfig_keychain.kubeconfig_path is set but kubeconfig_keychain.enable_keychain is not true: the kubeconfig keychain is off");
        if (k.KubeconfigPath.Length > 0 && !Path.IsPathRooted(k.KubeconfigPath))
            throw new ConfigException($"{r.Source}: kubeconfig_keychain.kubeconfig_path \"{k.KubeconfigPath}\" is not an absolute path");
    }

    /// <summary>The unix socket path of a CRI address ("/run/x.sock" or "unix:///run/x.sock"), or null when it is neither.</summary>
    public static string? CriSocketPath(string address)
    {
        var p = address.StartsWith("unix://", StringComparison.Ordinal) ? address["unix://".Length..] : address;
        return p.Length > 0 && Path.IsPathRooted(p) ? p : null;
    }

    private static void ReadRegistry(DaemonConfig.RegistryConfig g, TomlTable t, Reader r)
    {
        foreach (var (k, v) in t)
        {
            switch (k)
            {
                case "config_path": g.ConfigPath = r.Str("registry.config_path", v); break;
                // containerd's deprecated forms; config_path replaces them (the reference ignores them when it is set).
                case "mirrors" or "configs":
                    r.Warn($"registry.{k} is not supported (ignored): use registry.config_path (hosts.toml directories) or [resolver.host]");
                    break;
                default: r.Unknown("registry." + k); break;
            }
        }
        foreach (var dir in g.ConfigPaths)
        {
            if (!Path.IsPathRooted(dir)) throw new ConfigException($"{r.Source}: registry.config_path: {dir} is not an absolute path");
            if (!Directory.Exists(dir))
            {
                r.Warn($"registry.config_path: {dir} does not exist (no host is configured from it)");
                continue;
            }
            // Parsed once here so that a broken hosts.toml stops the start with its name, not later in a pull.
            try { new Stargz.Registry.RegistryHostsConfig().LoadHostsDirectory(dir); }
            catch (Exception e) when (e is FormatException or Tomlyn.TomlException or IOException or UnauthorizedAccessException or InvalidOperationException)
            {
                throw new ConfigException($"{r.Source}: registry.config_path: a hosts.toml under {dir} is invalid: {e.Message}");
            }
        }
    }

    private static void ReadResolver(DaemonConfig c, TomlTable t, Reader r)
    {
        foreach (var (k, v) in t)
        {
            if (k != "host") { r.Unknown("resolver." + k); continue; }
            foreach (var (host, hv) in r.Table("resolver.host", v))
            {
                var hostKey = $"resolver.host.\"{host}\"";
                var mirrors = new List<DaemonConfig.MirrorConfig>();
                foreach (var (hk, mv) in r.Table(hostKey, hv))
                {
                    if (hk != "mirrors") { r.Unknown(hostKey + "." + hk); continue; }
                    IEnumerable<object?> items = mv switch
                    {
                        TomlTableArray ta => ta,
                        TomlArray a => a,
                        _ => throw new ConfigException($"{r.Source}: {hostKey}.mirrors must be an array of tables, got {TypeName(mv)}"),
                    };
                    int i = 0;
                    foreach (var item in items)
                    {
                        var mk = $"{hostKey}.mirrors[{i++}]";
                        var mt = r.Table(mk, item);
                        string? mhost = null;
                        bool insecure = false;
                        long timeout = 0;
                        foreach (var (fk, fv) in mt)
                        {
                            switch (fk)
                            {
                                case "host": mhost = r.Str(mk + ".host", fv); break;
                                case "insecure": insecure = r.Bool(mk + ".insecure", fv); break;
                                case "request_timeout_sec": timeout = r.NonNegative(mk + ".request_timeout_sec", fv); break;
                                default: r.Unknown(mk + "." + fk); break;
                            }
                        }
                        if (string.IsNullOrWhiteSpace(mhost)) throw new ConfigException($"{r.Source}: {mk}.host is required");
                        mirrors.Add(new DaemonConfig.MirrorConfig(mhost, insecure, timeout));
                    }
                }
                c.ResolverHosts[host] = mirrors;
            }
        }
    }

    private static void Validate(DaemonConfig c, string source)
    {
        if (c.Blob.MaxWaitMsec < c.Blob.MinWaitMsec)
            throw new ConfigException($"{source}: blob.max_wait_msec ({c.Blob.MaxWaitMsec}) is less than blob.min_wait_msec ({c.Blob.MinWaitMsec})");
        if (c.Blob.ChunkSize == 0)
            throw new ConfigException($"{source}: blob.chunk_size must be greater than 0");
        if (c.CriKeychain.ImageServicePath.Length > 0 && CriSocketPath(c.CriKeychain.ImageServicePath) == null)
            throw new ConfigException($"{source}: cri_keychain.image_service_path \"{c.CriKeychain.ImageServicePath}\" is not an absolute unix socket path " +
                "(\"/run/containerd/containerd.sock\" or \"unix:///run/containerd/containerd.sock\")");
        if (c.MetricsAddress.Length > 0 && ParseEndpoint(c.MetricsAddress) == null)
            throw new ConfigException($"{source}: metrics_address \"{c.MetricsAddress}\" is not HOST:PORT with an IP host (e.g. 127.0.0.1:8234)");
    }

    /// <summary>"127.0.0.1:8234", "[::1]:8234" or "localhost:8234" -> endpoint; null when malformed.</summary>
    public static IPEndPoint? ParseEndpoint(string s)
    {
        var colon = s.LastIndexOf(':');
        if (colon <= 0) return null;
        var host = s[..colon].Trim('[', ']');
        if (!int.TryParse(s[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out var port) || port is < 1 or > 65535) return null;
        if (host == "localhost") return new IPEndPoint(IPAddress.Loopback, port);
        return IPAddress.TryParse(host, out var ip) ? new IPEndPoint(ip, port) : null;
    }

    /// <summary>Keys the reference daemon knows that this build does not act on (cache types, FUSE manager...).</summary>
    private static readonly HashSet<string> ReferenceOnlyKeys = new(StringComparer.Ordinal)
    {
        "http_cache_type", "filesystem_cache_type", "resolve_result_entry",
        "snapshotter", "listen_path", "metadata_store", "debug_address", "fuse_manager", "fuse.merge_buffer_size", "fuse.merge_worker_count",
        "fuse.passthrough_max_stack_depth", "directory_cache.cache_dir",
    };

    private static string TypeName(object? v) => v switch
    {
        null => "nothing",
        bool => "a boolean",
        long or int => "an integer",
        double => "a float",
        string => "a string",
        TomlTable => "a table",
        TomlArray or TomlTableArray => "an array",
        _ => v.GetType().Name,
    };

    private sealed class Reader(string source, List<string> warnings)
    {
        public string Source => source;

        public void Warn(string message) => warnings.Add($"{source}: {message}");

        public void Unknown(string key) => warnings.Add(ReferenceOnlyKeys.Contains(key)
            ? $"{source}: key \"{key}\" of the reference daemon is not supported by this build and is ignored"
            : $"{source}: unknown key \"{key}\" ignored");

        public bool Bool(string key, object? v) => v is bool b ? b
            : throw new ConfigException($"{source}: {key} must be a boolean (true/false), got {TypeName(v)}");

        public long Long(string key, object? v) => v switch
        {
            long l => l,
            int i => i,
            _ => throw new ConfigException($"{source}: {key} must be an integer, got {TypeName(v)}"),
        };

        public long NonNegative(string key, object? v)
        {
            var l = Long(key, v);
            return l >= 0 ? l : throw new ConfigException($"{source}: {key} must not be negative, got {l}");
        }

        public string Str(string key, object? v) => v as string
            ?? throw new ConfigException($"{source}: {key} must be a string, got {TypeName(v)}");

        public TomlTable Table(string key, object? v) => v as TomlTable
            ?? throw new ConfigException($"{source}: {key} must be a table, got {TypeName(v)}");
    }
}
