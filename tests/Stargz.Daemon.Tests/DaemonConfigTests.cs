using System.Net.Http;
using Containerd.Services.Snapshots.V1;
using Stargz.Daemon;
using Stargz.TestSupport;

namespace Stargz.Daemon.Tests;

/// <summary>The daemon's config.toml (reference keys), flags, and what an operator sees when one is wrong.</summary>
public class DaemonConfigTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public void EveryReferenceKeyIsParsedIntoTheTypedConfig()
    {
        var warnings = new List<string>();
        var c = ConfigLoader.Parse("""
            noprefetch = true
            no_background_fetch = true
            prefetch_size = 10485760
            prefetch_timeout_sec = 20
            allow_no_verification = true
            disable_verification = false
            max_concurrency = 4
            no_prometheus = false
            debug = true
            resolve_result_entry_ttl_sec = 30
            metrics_address = "127.0.0.1:8234"
            async_remove = true
            [blob]
            chunk_size = 100000
            fetching_timeout_sec = 60
            force_single_range_mode = true
            prefetch_chunk_size = 65536
            max_retries = 3
            min_wait_msec = 10
            max_wait_msec = 100
            valid_interval = 30
            check_always = true
            [directory_cache]
            max_lru_cache_entry = 50
            max_cache_fds = 20
            sync_add = true
            direct = false
            [fuse]
            attr_timeout = 5
            entry_timeout = -1
            passthrough = true
            [resolver.host."docker.io".mirrors]
            """.Replace("[resolver.host.\"docker.io\".mirrors]", """
            [[resolver.host."docker.io".mirrors]]
            host = "mirror.example:5000"
            insecure = true
            request_timeout_sec = 7
            [[resolver.host."docker.io".mirrors]]
            host = "second.example"
            """), "test.toml", warnings);
        Assert.Empty(warnings);
        Assert.True(c.NoPrefetch && c.NoBackgroundFetch && c.AllowNoVerification && c.Debug);
        Assert.Equal(10485760, c.PrefetchSize);
        Assert.Equal(20, c.PrefetchTimeoutSec);
        Assert.Equal(4, c.MaxConcurrency);
        Assert.Equal(30, c.ResolveResultEntryTtlSec);
        Assert.Equal("127.0.0.1:8234", c.MetricsAddress);
        Assert.True(c.AsyncRemove);
        Assert.Equal(100000, c.Blob.ChunkSize);
        Assert.Equal(60, c.Blob.FetchingTimeoutSec);
        Assert.True(c.Blob.ForceSingleRangeMode && c.Blob.CheckAlways);
        Assert.Equal(65536, c.Blob.PrefetchChunkSize);
        Assert.Equal((3L, 10L, 100L, 30L), (c.Blob.MaxRetries, c.Blob.MinWaitMsec, c.Blob.MaxWaitMsec, c.Blob.ValidInterval));
        Assert.Equal((50L, 20L, true, false), (c.DirectoryCache.MaxLruCacheEntry, c.DirectoryCache.MaxCacheFds, c.DirectoryCache.SyncAdd, c.DirectoryCache.Direct));
        Assert.Equal((5L, -1L, true), (c.Fuse.AttrTimeout, c.Fuse.EntryTimeout, c.Fuse.Passthrough));
        var mirrors = c.ResolverHosts["docker.io"];
        Assert.Equal([new DaemonConfig.MirrorConfig("mirror.example:5000", true, 7), new DaemonConfig.MirrorConfig("second.example", false, 0)], mirrors);
    }

    [Fact]
    public void DefaultsMatchTheReferenceAndUnknownKeysOnlyWarn()
    {
        var warnings = new List<string>();
        var c = ConfigLoader.Parse("""
            shiny_new_option = 1
            [blob]
            surprise = "x"
            [snapshotter]
            allow_invalid_mounts_on_restart = true
            """, "cfg.toml", warnings);
        Assert.Equal(3, warnings.Count);
        Assert.Contains(warnings, w => w.Contains("\"shiny_new_option\""));
        Assert.Contains(warnings, w => w.Contains("\"blob.surprise\""));
        Assert.Contains(warnings, w => w.Contains("\"snapshotter\" of the reference daemon is not supported"));
        Assert.Equal(60, c.Blob.ValidInterval);
        Assert.Equal(50000, c.Blob.ChunkSize);
        Assert.Equal(2, c.MaxConcurrency);
        Assert.True(c.DirectoryCache.Direct);
        Assert.Equal("", c.MetricsAddress);
        Assert.False(c.Fuse.Passthrough);
        Assert.Null(c.Erofs.Promote); // not set: on where the machine can (kernel erofs, mkfs.erofs)
    }

    [Fact]
    public void ErofsPromoteIsParsedAndOffWinsOverTheMachinesSupport()
    {
        var log = Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;
        var on = ConfigLoader.Parse("[erofs]\npromote = true", "cfg.toml", []);
        var off = ConfigLoader.Parse("[erofs]\npromote = false", "cfg.toml", []);
        Assert.True(on.Erofs.Promote);
        Assert.False(off.Erofs.Promote);
        Assert.False(RemoteLayerWiring.PromoteToErofs(off.Erofs, log));
        var machineCan = Stargz.Layer.Erofs.ErofsPromoter.KernelSupportsErofs() && Stargz.Layer.Erofs.ErofsPromoter.MkfsAvailable();
        Assert.Equal(machineCan, RemoteLayerWiring.PromoteToErofs(on.Erofs, log));
        Assert.Equal(machineCan, RemoteLayerWiring.PromoteToErofs(ConfigLoader.Parse("", "cfg.toml", []).Erofs, log));
    }

    [Theory]
    [InlineData("noprefetch = \"yes\"", "noprefetch must be a boolean")]
    [InlineData("prefetch_size = -1", "prefetch_size must not be negative")]
    [InlineData("[blob]\nchunk_size = 1.5", "blob.chunk_size must be an integer")]
    [InlineData("[blob]\nmin_wait_msec = 500\nmax_wait_msec = 100", "blob.max_wait_msec (100) is less than blob.min_wait_msec (500)")]
    [InlineData("blob = 3", "blob must be a table")]
    [InlineData("[fuse]\npassthrough = 1", "fuse.passthrough must be a boolean")]
    [InlineData("[erofs]\npromote = \"on\"", "erofs.promote must be a boolean")]
    [InlineData("metrics_address = \"nowhere\"", "metrics_address \"nowhere\" is not HOST:PORT")]
    [InlineData("[[resolver.host.\"r.io\".mirrors]]\ninsecure = true", "resolver.host.\"r.io\".mirrors[0].host is required")]
    [InlineData("this is = not toml [", "is not valid TOML")]
    public void BadValuesAreClearErrorsNamingTheKey(string toml, string expected)
    {
        var e = Assert.Throws<ConfigException>(() => ConfigLoader.Parse(toml, "bad.toml", []));
        Assert.Contains(expected, e.Message);
        Assert.Contains("bad.toml", e.Message);
    }

    [Fact]
    public void AMissingDefaultConfigMeansDefaults_AMissingNamedOneIsAnError()
    {
        using var dir = new TempDir("sgs-cfg");
        var missing = Path.Combine(dir.Path, "absent.toml");
        Assert.Equal(60, ConfigLoader.Load(missing, explicitPath: false, []).Blob.ValidInterval);
        var e = Assert.Throws<ConfigException>(() => ConfigLoader.Load(missing, explicitPath: true, []));
        Assert.Contains("does not exist", e.Message);
        var present = Path.Combine(dir.Path, "c.toml");
        File.WriteAllText(present, "[blob]\nvalid_interval = 5\n");
        Assert.Equal(5, ConfigLoader.Load(present, explicitPath: true, []).Blob.ValidInterval);
    }

    [Fact]
    public void FlagsParseLikeTheReferenceAndDefaultToItsPaths()
    {
        var d = DaemonOptions.Parse([]);
        Assert.Equal("/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", d.Address);
        Assert.Equal("/var/lib/containerd-stargz-grpc", d.Root);
        Assert.Equal("/etc/containerd-stargz-grpc/config.toml", d.ConfigPath);
        var o = DaemonOptions.Parse(["--address", "/tmp/x.sock", "-root=/tmp/r", "--config", "/tmp/c.toml", "--log-level", "debug"]);
        Assert.Equal(("/tmp/x.sock", "/tmp/r", "/tmp/c.toml", "debug"), (o.Address, o.Root, o.ConfigPath, o.LogLevel));
        Assert.Throws<ArgumentException>(() => DaemonOptions.Parse(["--log-level", "loud"]));
        Assert.Throws<ArgumentException>(() => DaemonOptions.Parse(["--bogus"]));
        Assert.Throws<ArgumentException>(() => DaemonOptions.Parse(["--root"]));
    }

    [Fact]
    public async Task SocketGroupMakesTheSocketGroupReadableAndWritable()
    {
        Requires.Root();
        await using var d = await LocalDaemon.StartAsync(extraArgs: ["--socket-group", "daemon"]);
        Assert.Equal((UnixFileMode)0b110_110_000, File.GetUnixFileMode(d.Socket));
        var group = (await ProcessRunner.RunAsync(Requires.Command("stat"), ["-c", "%G", d.Socket])).EnsureSuccess("stat").StdOut.Trim();
        Assert.Equal("daemon", group);
    }

    [Fact]
    public async Task AnInvalidConfigStopsTheDaemonWithAClearMessage()
    {
        await using var d = await LocalDaemon.StartAsync(configToml: "[blob]\nvalid_interval = \"soon\"\n", waitReady: false);
        Assert.Equal(1, await d.WaitExitAsync(TimeSpan.FromSeconds(30)));
        Assert.Contains("invalid config", d.Log);
        Assert.Contains("blob.valid_interval must be an integer", d.Log);
        Assert.False(File.Exists(d.Socket));
    }

    [Fact]
    public async Task UnknownKeysAreLoggedAndMetricsAreServedOnTheConfiguredAddress()
    {
        var port = LocalRegistry.FreePort();
        await using var d = await LocalDaemon.StartAsync(configToml: $"metrics_address = \"127.0.0.1:{port}\"\nnot_a_key = true\n");
        Assert.Contains("unknown key \\\"not_a_key\\\"", d.Log); // JSON-escaped in the log line
        using (var ch = Client.Channel(d.Socket))
        {
            var c = new Snapshots.SnapshotsClient(ch);
            await c.PrepareAsync(new PrepareSnapshotRequest { Key = "k" }, cancellationToken: Ct);
            await Client.CodeOf(async () => await c.StatAsync(new StatSnapshotRequest { Key = "missing" }, cancellationToken: Ct));
            using var list = c.List(new ListSnapshotsRequest(), cancellationToken: Ct); // a server-streaming call
            while (await list.ResponseStream.MoveNext(Ct)) { }
        }
        using var http = new HttpClient();
        var text = await http.GetStringAsync($"http://127.0.0.1:{port}/metrics", Ct);
        Assert.Contains("stargz_snapshotter_operations_total{operation=\"Prepare\",code=\"OK\"} 1", text);
        Assert.Contains("stargz_snapshotter_operations_total{operation=\"Stat\",code=\"NotFound\"} 1", text);
        Assert.Contains("stargz_snapshotter_operations_total{operation=\"List\",code=\"OK\"} 1", text);
        Assert.Contains("stargz_snapshotter_operation_duration_seconds_bucket{operation=\"Prepare\"", text);
        Assert.Contains("stargz_snapshotter_remote_snapshots 0", text);
        // The socket is owner-only.
        Assert.Equal((UnixFileMode)0b110_000_000, File.GetUnixFileMode(d.Socket));
    }

    [Fact]
    public void CriKeychainKeysAreParsedLikeTheReferences()
    {
        var warnings = new List<string>();
        var c = ConfigLoader.Parse("""
            [cri_keychain]
            enable_keychain = true
            image_service_path = "/run/containerd/containerd.sock"
            """, "cri.toml", warnings);
        Assert.Empty(warnings);
        Assert.True(c.CriKeychain.EnableKeychain);
        Assert.Equal("/run/containerd/containerd.sock", c.CriKeychain.ImageServicePath);
        Assert.Equal("/run/x.sock", ConfigLoader.CriSocketPath("unix:///run/x.sock"));
        Assert.False(ConfigLoader.Parse("", "empty.toml", []).CriKeychain.EnableKeychain);
        // Enabled without a path: containerd's socket, as the reference does.
        c = ConfigLoader.Parse("[cri_keychain]\nenable_keychain = true\n", "default.toml", warnings);
        Assert.Empty(warnings);
        Assert.Equal("/run/containerd/containerd.sock", c.CriKeychain.ImageServicePath);

        // Unknown keys inside the table warn, naming them; a path without enable_keychain says the keychain is off.
        warnings.Clear();
        c = ConfigLoader.Parse("""
            [cri_keychain]
            image_service_path = "unix:///run/containerd/containerd.sock"
            enable_keychian = true
            """, "typo.toml", warnings);
        Assert.False(c.CriKeychain.EnableKeychain);
        Assert.Equal(2, warnings.Count);
        Assert.Contains(warnings, w => w.Contains("unknown key \"cri_keychain.enable_keychian\""));
        Assert.Contains(warnings, w => w.Contains("enable_keychain is not true: the CRI keychain is off"));

        // persist_credentials: off unless set; set without the keychain it warns that nothing is persisted.
        Assert.False(ConfigLoader.Parse("[cri_keychain]\nenable_keychain = true\n", "d.toml", []).CriKeychain.PersistCredentials);
        warnings.Clear();
        Assert.True(ConfigLoader.Parse("[cri_keychain]\nenable_keychain = true\npersist_credentials = true\n", "p.toml", warnings).CriKeychain.PersistCredentials);
        Assert.Empty(warnings);
        ConfigLoader.Parse("[cri_keychain]\npersist_credentials = true\n", "p.toml", warnings);
        Assert.Contains(warnings, w => w.Contains("persist_credentials is set but cri_keychain.enable_keychain is not true"));
    }

    [Fact]
    public void KubeconfigKeychainKeysAreParsedLikeTheReferences()
    {
        var warnings = new List<string>();
        var c = ConfigLoader.Parse("""
            [kubeconfig_keychain]
            enable_keychain = true
            kubeconfig_path = "/etc/kubernetes/snapshotter/config.conf"
            """, "kube.toml", warnings);
        Assert.Empty(warnings);
        Assert.True(c.KubeconfigKeychain.EnableKeychain);
        Assert.Equal("/etc/kubernetes/snapshotter/config.conf", c.KubeconfigKeychain.KubeconfigPath);
        Assert.False(ConfigLoader.Parse("", "empty.toml", []).KubeconfigKeychain.EnableKeychain);

        c = ConfigLoader.Parse("[kubeconfig_keychain]\nkubeconfig_path = \"/k\"\nenable = true\n", "typo.toml", warnings);
        Assert.False(c.KubeconfigKeychain.EnableKeychain);
        Assert.Contains(warnings, w => w.Contains("unknown key \"kubeconfig_keychain.enable\""));
        Assert.Contains(warnings, w => w.Contains("enable_keychain is not true: the kubeconfig keychain is off"));

        var e = Assert.Throws<ConfigException>(() => ConfigLoader.Parse("[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = \"kube/config\"", "rel.toml", []));
        Assert.Contains("kubeconfig_keychain.kubeconfig_path \"kube/config\" is not an absolute path", e.Message);
        e = Assert.Throws<ConfigException>(() => ConfigLoader.Parse("[kubeconfig_keychain]\nenable_keychain = 1", "num.toml", []));
        Assert.Contains("kubeconfig_keychain.enable_keychain must be a boolean", e.Message);
    }

    [Theory]
    [InlineData("[cri_keychain]\nenable_keychain = \"yes\"\nimage_service_path = \"/run/c.sock\"", "cri_keychain.enable_keychain must be a boolean")]
    [InlineData("[cri_keychain]\nenable_keychain = true\nimage_service_path = 5", "cri_keychain.image_service_path must be a string")]
    [InlineData("[cri_keychain]\nenable_keychain = true\nimage_service_path = \"containerd.sock\"", "\"containerd.sock\" is not an absolute unix socket path")]
    [InlineData("[cri_keychain]\nenable_keychain = true\nimage_service_path = \"tcp://127.0.0.1:1234\"", "is not an absolute unix socket path")]
    [InlineData("cri_keychain = true", "cri_keychain must be a table")]
    [InlineData("[cri_keychain]\nenable_keychain = true\npersist_credentials = 1", "cri_keychain.persist_credentials must be a boolean")]
    public void BadCriKeychainValuesAreClearErrors(string toml, string expected)
    {
        var e = Assert.Throws<ConfigException>(() => ConfigLoader.Parse(toml, "bad.toml", []));
        Assert.Contains(expected, e.Message);
        Assert.Contains("bad.toml", e.Message);
    }

    [Fact]
    public async Task CriKeychainProxyingToTheDaemonsOwnSocketStopsIt()
    {
        // Proxying to itself would loop every kubelet call back into the daemon.
        await using var self = await LocalDaemon.StartAsync(configToml: "", waitReady: false);
        await self.WaitReadyAsync(TimeSpan.FromSeconds(60));
        await self.StopAsync();
        await File.WriteAllTextAsync(self.ConfigPath, $"[cri_keychain]\nenable_keychain = true\nimage_service_path = \"unix://{self.Socket}\"\n", Ct);
        await self.RestartAsync(waitReady: false);
        Assert.Equal(1, await self.WaitExitAsync(TimeSpan.FromSeconds(30)));
        Assert.Contains("is the socket this daemon serves on", self.Log);
    }
}
