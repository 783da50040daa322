namespace Stargz.Daemon;

/// <summary>
/// The daemon's config.toml, with the reference containerd-stargz-grpc's keys and defaults
/// (/etc/containerd-stargz-grpc/config.toml). Parsed and validated by <see cref="ConfigLoader"/>.
/// </summary>
public sealed class DaemonConfig
{
    // top level
    public bool NoPrefetch { get; set; }
    public bool NoBackgroundFetch { get; set; }
    public long PrefetchSize { get; set; }
    public long PrefetchTimeoutSec { get; set; } = 10;
    public bool AllowNoVerification { get; set; }
    public bool DisableVerification { get; set; }
    public long MaxConcurrency { get; set; } = 2;
    public bool NoPrometheus { get; set; }
    public bool Debug { get; set; }
    public long ResolveResultEntryTtlSec { get; set; } = 120;
    /// <summary>host:port for Prometheus /metrics ("" = off), e.g. 127.0.0.1:8234.</summary>
    public string MetricsAddress { get; set; } = "";
    /// <summary>async_remove: Remove leaves snapshot dirs for Cleanup (the reference's AsynchronousRemove option).</summary>
    public bool AsyncRemove { get; set; }

    public BlobConfig Blob { get; } = new();
    public DirectoryCacheConfig DirectoryCache { get; } = new();
    public FuseConfig Fuse { get; } = new();
    public ErofsConfig Erofs { get; } = new();
    public CriKeychainConfig CriKeychain { get; } = new();
    public KubeconfigKeychainConfig KubeconfigKeychain { get; } = new();
    /// <summary>[registry]: containerd's CRI registry config (its <c>config_path</c>: hosts.toml directories).</summary>
    public RegistryConfig Registry { get; } = new();
    /// <summary>[resolver.host."HOST"] mirrors, by host.</summary>
    public Dictionary<string, List<MirrorConfig>> ResolverHosts { get; } = new(StringComparer.Ordinal);

    public sealed class BlobConfig
    {
        public long ChunkSize { get; set; } = 50000;
        public long FetchingTimeoutSec { get; set; } = 300;
        public bool ForceSingleRangeMode { get; set; }
        public long PrefetchChunkSize { get; set; }
        public long MaxRetries { get; set; } = 5;
        public long MinWaitMsec { get; set; } = 30;
        public long MaxWaitMsec { get; set; } = 300;
        public long ValidInterval { get; set; } = 60;
        public bool CheckAlways { get; set; }
        /// <summary>stall_timeout_sec (ours): a registry response that sends nothing this long is retried on a fresh
        /// connection or the next mirror; 0 = no watchdog.</summary>
        public long StallTimeoutSec { get; set; } = Stargz.Registry.BlobOptions.DefaultStallTimeoutSec;
        /// <summary>outage_timeout_sec (ours): an uncached read fails with EIO once the registry has sent nothing this
        /// long (refused, reset and stalled requests are retried until then); 0 = fetching_timeout_sec alone.</summary>
        public long OutageTimeoutSec { get; set; } = Stargz.Registry.BlobOptions.DefaultOutageTimeoutSec;
    }

    public sealed class DirectoryCacheConfig
    {
        public long MaxLruCacheEntry { get; set; } = 10;
        /// <summary>max_lru_cache_bytes (ours): bytes of chunks kept in memory at most, beside the entry count; 0 = the
        /// layer's default (4 MiB, <see cref="Stargz.Layer.LayerOptions.DefaultMemoryCacheBytes"/>).</summary>
        public long MaxLruCacheBytes { get; set; }
        public long MaxCacheFds { get; set; } = 10;
        public bool SyncAdd { get; set; }
        public bool Direct { get; set; } = true;
        /// <summary>max_disk_mb (ours): the disk cache (chunks, TOCs, whole-file copies) stays within this many MiB
        /// (plus one background batch), least recently used evicted first; 0 = unbounded.</summary>
        public long MaxDiskMb { get; set; }
    }

    public sealed class FuseConfig
    {
        public long AttrTimeout { get; set; } = 1;
        public long EntryTimeout { get; set; } = 1;
        /// <summary>
        /// passthrough (reference default false): answer opens of files whose bytes are verified on disk with a kernel
        /// backing file (Linux 6.9+), so their reads skip the daemon; bigger files get a whole-file copy in the cache.
        /// </summary>
        public bool Passthrough { get; set; }
    }

    /// <summary>
    /// [erofs] (ours): a layer whose every chunk is fetched and verified is promoted to a kernel EROFS image (checked
    /// against its TOC), which new mounts of the layer use instead of FUSE.
    /// </summary>
    public sealed class ErofsConfig
    {
        /// <summary>promote: null (not set) = on where the kernel has erofs (/proc/filesystems) and mkfs.erofs is installed.</summary>
        public bool? Promote { get; set; }
    }

    /// <summary>
    /// [cri_keychain]: serve CRI's ImageService on the daemon's socket, proxied to <see cref="ImageServicePath"/>, and
    /// use the credentials of each PullImage for that image's lazy layers.
    /// </summary>
    public sealed class CriKeychainConfig
    {
        /// <summary>containerd's socket: where the reference proxies when image_service_path is not set.</summary>
        public const string DefaultImageServicePath = "/run/containerd/containerd.sock";

        public bool EnableKeychain { get; set; }
        /// <summary>The backing CRI image service's unix socket, as a path or unix:// address; <see cref="DefaultImageServicePath"/> when enabled without one.</summary>
        public string ImageServicePath { get; set; } = "";
        /// <summary>
        /// Keep each pulled image's credentials on disk (<see cref="StoreFileName"/> under the daemon root, mode 0600)
        /// for as long as the image is on the node, so its not yet fetched chunks still read after a daemon restart.
        /// Off by default: the reference holds them in memory only, and a file of registry secrets on the node is a
        /// thing an operator should choose.
        /// </summary>
        public bool PersistCredentials { get; set; }

        /// <summary>The credentials file's name under the daemon root.</summary>
        public const string StoreFileName = "cri-keychain.json";
    }

    /// <summary>
    /// [kubeconfig_keychain]: credentials from the cluster's image pull secrets (type kubernetes.io/dockerconfigjson,
    /// all namespaces), listed and watched with the identity of <see cref="KubeconfigPath"/>.
    /// </summary>
    public sealed class KubeconfigKeychainConfig
    {
        public bool EnableKeychain { get; set; }
        /// <summary>"" = $KUBECONFIG, ~/.kube/config, then the pod's service account; a set path is waited for.</summary>
        public string KubeconfigPath { get; set; } = "";
    }

    public sealed record MirrorConfig(string Host, bool Insecure, long RequestTimeoutSec);

    /// <summary>
    /// [registry] as the reference's containerd-plugin config and containerd's CRI plugin have it: <c>config_path</c>,
    /// directories (':'-separated, the first holding a host's directory wins) with one HOST/hosts.toml each
    /// (<c>server</c>, <c>[host."URL"]</c> mirrors tried in order, <c>ca</c>, <c>client</c>, <c>skip_verify</c>,
    /// <c>override_path</c>, <c>capabilities</c>). Read at start.
    /// </summary>
    public sealed class RegistryConfig
    {
        public string ConfigPath { get; set; } = "";

        /// <summary>The directories of <see cref="ConfigPath"/>, in order.</summary>
        public IReadOnlyList<string> ConfigPaths =>
            ConfigPath.Split(':', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
    }
}
