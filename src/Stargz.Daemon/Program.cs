using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using System.Runtime.InteropServices;
using Prometheus;
using Stargz.Fuse.Handover;
using Stargz.Registry;
using Stargz.Snapshotter;

namespace Stargz.Daemon;

public static class Program
{
    private static async Task DisposeRemoteAsync(IRemoteFileSystem? remote)
    {
        if (remote is IAsyncDisposable ad) await ad.DisposeAsync();
        else if (remote is IDisposable d) d.Dispose();
    }

    public static async Task<int> Main(string[] args)
    {
        // A parent that keeps the FUSE connections (the fd store) when no systemd does, and restarts the daemon.
        if (args.Length > 0 && args[0] == "supervise") return Supervise.Supervisor.Run(args[1..]);
        // Process metrics stay (as the reference's Go collector has them); the event-counter and meter adapters would
        // keep a runtime EventListener polling every second in an idle daemon. Must run before any metric is created.
        Prometheus.Metrics.SuppressDefaultMetrics(new Prometheus.SuppressDefaultMetricOptions
        {
            SuppressProcessMetrics = false, SuppressDebugMetrics = true, SuppressEventCounters = true, SuppressMeters = true,
        });
        DaemonOptions opt;
        try { opt = DaemonOptions.Parse(args); }
        catch (ArgumentException e)
        {
            await Console.Error.WriteLineAsync($"stargz-snapshotter: {e.Message}\n{DaemonOptions.Usage}");
            return 2;
        }
        if (opt.ShowHelp)
        {
            Console.WriteLine(DaemonOptions.Usage);
            return 0;
        }

        var warnings = new List<string>();
        DaemonConfig config;
        try { config = ConfigLoader.Load(opt.ConfigPath, opt.ConfigGiven, warnings); }
        catch (ConfigException e)
        {
            await Console.Error.WriteLineAsync($"stargz-snapshotter: invalid config: {e.Message}");
            return 1;
        }

        var level = DaemonOptions.ParseLogLevel(opt.LogLevel);
        if (config.Debug && level > LogLevel.Debug) level = LogLevel.Debug;
        // Logs go to stderr like the reference's (stdout stays free); the host logs through the same factory.
        using var loggerFactory = new JsonLineLoggerFactory(level);
        void ConfigureLogging(ILoggingBuilder b) => b.Services.AddSingleton<ILoggerFactory>(loggerFactory);
        var log = loggerFactory.CreateLogger("stargz-snapshotter");
        foreach (var w in warnings) log.LogWarning("config: {Warning}", w);

        // The socket first (see ListeningSocket): containerd may dial while the rest starts.
        var serverOpt = new SnapshotterServerOptions { SocketPath = opt.Address, SocketGroup = opt.SocketGroup };
        try { serverOpt.Listening = SnapshotterServer.Listen(serverOpt); }
        catch (Exception e) when (e is IOException or ArgumentException or UnauthorizedAccessException)
        {
            log.LogCritical("cannot serve on {Address}: {Error}", opt.Address, e.Message);
            return 1;
        }
        using var listening = serverOpt.Listening;

        // [cri_keychain]: CRI ImageService on our socket, proxied to the backing one; its pull credentials feed the layers.
        CriKeychain? criKeychain = null;
        CriBackend? criBackend = null;
        if (config.CriKeychain.EnableKeychain)
        {
            var backendPath = ConfigLoader.CriSocketPath(config.CriKeychain.ImageServicePath)!;
            if (Path.GetFullPath(backendPath) == Path.GetFullPath(opt.Address))
            {
                log.LogCritical("cri_keychain.image_service_path {Path} is the socket this daemon serves on (--address); it must be the backing CRI image service, e.g. the containerd socket",
                    config.CriKeychain.ImageServicePath);
                return 1;
            }
            var store = Path.Combine(opt.Root, DaemonConfig.CriKeychainConfig.StoreFileName);
            if (config.CriKeychain.PersistCredentials)
            {
                // Root-only from the start: the file under it holds registry secrets.
                if (!Directory.Exists(opt.Root)) Directory.CreateDirectory(opt.Root, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
                criKeychain = new CriKeychain(store, loggerFactory.CreateLogger("stargz.cri"));
            }
            else
            {
                criKeychain = new CriKeychain();
                // Persistence was on before and is off now: the secrets it left must not linger.
                try
                {
                    if (CriKeychain.DeleteStore(store)) log.LogInformation("cri_keychain.persist_credentials is off: removed the credentials file {Path}", store);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    log.LogWarning("cri_keychain.persist_credentials is off but the credentials file {Path} cannot be removed: {Error}", store, e.Message);
                }
            }
            criBackend = new CriBackend(config.CriKeychain.ImageServicePath, loggerFactory.CreateLogger("stargz.cri"));
        }

        // [kubeconfig_keychain]: image pull secrets of the cluster, synced in the background (stopped on any return).
        await using var kubeKeychain = config.KubeconfigKeychain.EnableKeychain
            ? new KubeconfigKeychain(config.KubeconfigKeychain.KubeconfigPath, loggerFactory.CreateLogger("stargz.kubeconfig")).Start()
            : null;

        // Under systemd (or supervise) the FUSE connections are kept in the service manager's fd store, so running
        // containers keep their layers over a restart: SIGTERM hands them over, SIGINT ends them (unmounts).
        var handoverLog = loggerFactory.CreateLogger("stargz.handover");
        FuseConnectionStore? connections = null;
        try { connections = FuseConnectionStore.FromEnvironment(Path.Combine(opt.Root, "fuse-connections"), m => handoverLog.LogWarning("{Message}", m)); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            log.LogWarning("no fd store: FUSE connections end with this process ({Error})", e.Message);
        }
        Environment.SetEnvironmentVariable("NOTIFY_SOCKET", null); // not for our children (fusermount3, mkfs)
        PosixSignal? stopSignal = null;
        using var onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, _ => stopSignal ??= PosixSignal.SIGTERM);
        using var onInt = PosixSignalRegistration.Create(PosixSignal.SIGINT, _ => stopSignal ??= PosixSignal.SIGINT);

        var remote = RemoteLayerWiring.Create(config, opt.Root, loggerFactory, log, criKeychain, kubeKeychain, connections);
        StargzSnapshotter snapshotter;
        try
        {
            snapshotter = await StargzSnapshotter.OpenAsync(new SnapshotterOptions
            {
                Root = opt.Root,
                RemoteFileSystem = remote,
                CheckValidInterval = TimeSpan.FromSeconds(config.Blob.ValidInterval),
                CheckAlways = config.Blob.CheckAlways,
                AsyncRemove = config.AsyncRemove,
            }, loggerFactory.CreateLogger<StargzSnapshotter>(), CancellationToken.None);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or LiteDB.LiteException)
        {
            log.LogCritical("cannot open root {Root}: {Error}", opt.Root, e.Message);
            await DisposeRemoteAsync(remote);
            criBackend?.Dispose();
            return 1;
        }

        MetricsInterceptor.TrackSnapshotter(snapshotter);
        var metricsEndpoint = !config.NoPrometheus && config.MetricsAddress.Length > 0 ? ConfigLoader.ParseEndpoint(config.MetricsAddress) : null;
        var app = SnapshotterServer.Build(snapshotter, serverOpt,
            configureBuilder: b =>
            {
                b.Services.AddSingleton<MetricsInterceptor>();
                b.Services.AddSingleton(new StatusSource(snapshotter, remote as LazyLayerFileSystem));
                b.Services.Configure<Grpc.AspNetCore.Server.GrpcServiceOptions>(o => o.Interceptors.Add<MetricsInterceptor>());
                if (criBackend != null)
                {
                    b.Services.AddSingleton(criBackend);
                    b.Services.AddSingleton(criKeychain!);
                }
                if (metricsEndpoint != null)
                    b.WebHost.ConfigureKestrel(k => k.Listen(metricsEndpoint, lo => lo.Protocols = Microsoft.AspNetCore.Server.Kestrel.Core.HttpProtocols.Http1));
            },
            configureApp: a =>
            {
                a.MapGrpcService<StatusGrpcService>();
                if (metricsEndpoint != null) a.MapMetrics("/metrics").RequireHost($"*:{metricsEndpoint.Port}");
                if (criBackend != null)
                {
                    a.MapGrpcService<CriImageServiceProxy>();
                    a.MapGrpcService<CriImageServiceProxyV1Alpha2>();
                }
            },
            configureLogging: ConfigureLogging);
        try
        {
            await SnapshotterServer.StartAsync(app, serverOpt, CancellationToken.None);
        }
        catch (Exception e) when (e is IOException or ArgumentException or InvalidOperationException)
        {
            log.LogCritical("cannot serve on {Address}: {Error}", opt.Address, e.Message);
            await snapshotter.DisposeAsync();
            await DisposeRemoteAsync(remote);
            criBackend?.Dispose();
            return 1;
        }
        if (criBackend != null)
            log.LogInformation("serving CRI ImageService on {Address} for the CRI keychain, proxied to {Backend}", opt.Address, criBackend.Address);
        log.LogInformation("serving containerd snapshots API on {Address} (root {Root}, remote layers {Remote}, metrics {Metrics})",
            opt.Address, opt.Root, remote != null ? "on" : "off", metricsEndpoint?.ToString() ?? "off");

        connections?.Notify("READY=1");
        using var memoryTrim = new IdleMemoryTrim(loggerFactory.CreateLogger("stargz.memory"));

        // SIGTERM/SIGINT: the host stops accepting, drains in-flight calls (shutdown timeout), then we close the store.
        await app.WaitForShutdownAsync();
        if (remote is IRemoteHandover handover && connections != null)
        {
            handover.HandingOver = stopSignal != PosixSignal.SIGINT;
            log.LogInformation(handover.HandingOver
                ? "stopping: FUSE connections stay in the fd store; running containers keep their layers and the next daemon adopts them"
                : "stopping for good (SIGINT): remote layers are unmounted and dropped from the fd store");
            connections.Notify("STOPPING=1");
        }
        log.LogInformation("shutting down: in-flight calls drained, closing the metadata store");
        await app.DisposeAsync();
        await snapshotter.DisposeAsync();
        await DisposeRemoteAsync(remote);
        criBackend?.Dispose();
        log.LogInformation("stopped");
        return 0;
    }
}
