using System.Diagnostics;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Prometheus;

namespace Stargz.Daemon;

/// <summary>Prometheus metrics of the snapshots API: latency histogram and call counter by operation and gRPC code.</summary>
public sealed class MetricsInterceptor : Interceptor
{
    public static readonly Histogram Latency = Prometheus.Metrics.CreateHistogram(
        "stargz_snapshotter_operation_duration_seconds", "Latency of snapshots API calls.",
        new HistogramConfiguration { LabelNames = ["operation"], Buckets = Histogram.ExponentialBuckets(0.0005, 2, 18) });

    public static readonly Counter Calls = Prometheus.Metrics.CreateCounter(
        "stargz_snapshotter_operations_total", "Snapshots API calls by operation and gRPC status code.",
        new CounterConfiguration { LabelNames = ["operation", "code"] });

    public static readonly Gauge InFlight = Prometheus.Metrics.CreateGauge(
        "stargz_snapshotter_operations_in_flight", "Snapshots API calls being served.");

    public static readonly Gauge RemoteSnapshots = Prometheus.Metrics.CreateGauge(
        "stargz_snapshotter_remote_snapshots", "Remote snapshots in the store.");

    public static readonly Gauge UnrestoredRemoteSnapshots = Prometheus.Metrics.CreateGauge(
        "stargz_snapshotter_remote_snapshots_unavailable", "Remote snapshots whose layer is not mounted (restore failed).");

    public static readonly Counter Fallbacks = Prometheus.Metrics.CreateCounter(
        "stargz_fallbacks_total", "Layers not served remotely (made by a full download instead), by reason.",
        new CounterConfiguration { LabelNames = ["reason"] });

    /// <summary>Every reason a fallback is counted under (each series is there from the start, at 0).</summary>
    public static readonly string[] FallbackReasonLabels =
    [
        Stargz.Layer.FallbackReasons.NoLabels, Stargz.Layer.FallbackReasons.NoTocDigest, Stargz.Layer.FallbackReasons.NotEstargz,
        Stargz.Layer.FallbackReasons.BadToc, Stargz.Layer.FallbackReasons.Unauthorized, Stargz.Layer.FallbackReasons.Registry,
        Stargz.Layer.FallbackReasons.Timeout, Stargz.Layer.FallbackReasons.MountFailed, Stargz.Layer.FallbackReasons.Other,
    ];

    /// <summary>Refreshes the snapshot gauges on every scrape; counts fallbacks by reason.</summary>
    public static void TrackSnapshotter(Stargz.Snapshotter.StargzSnapshotter sn)
    {
        foreach (var r in FallbackReasonLabels) Fallbacks.WithLabels(r);
        // The reason is one of the fixed set; anything else (a bug) is counted as "other" so the series stay bounded.
        sn.Remote.FallbackOccurred += f => Fallbacks.WithLabels(Array.IndexOf(FallbackReasonLabels, f.Reason) >= 0 ? f.Reason : Stargz.Layer.FallbackReasons.Other).Inc();
        Prometheus.Metrics.DefaultRegistry.AddBeforeCollectCallback(() =>
        {
            var (remote, unrestored) = sn.Remote.RemoteSnapshotCounts();
            RemoteSnapshots.Set(remote);
            UnrestoredRemoteSnapshots.Set(unrestored);
        });
    }

    private static string Op(string method) => method[(method.LastIndexOf('/') + 1)..];

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context,
        UnaryServerMethod<TRequest, TResponse> continuation) =>
        MeasureAsync(context.Method, () => continuation(request, context));

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream,
        ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation) =>
        MeasureAsync(context.Method, async () =>
        {
            await continuation(request, responseStream, context);
            return true;
        });

    /// <summary>One call, counted in flight, timed, and counted by its gRPC code (Unknown for anything not an RpcException).</summary>
    private static async Task<T> MeasureAsync<T>(string method, Func<Task<T>> call)
    {
        var op = Op(method);
        var sw = Stopwatch.StartNew();
        InFlight.Inc();
        var code = StatusCode.OK;
        try { return await call(); }
        catch (RpcException e) { code = e.StatusCode; throw; }
        catch { code = StatusCode.Unknown; throw; }
        finally
        {
            InFlight.Dec();
            Latency.WithLabels(op).Observe(sw.Elapsed.TotalSeconds);
            Calls.WithLabels(op, code.ToString()).Inc();
        }
    }
}
