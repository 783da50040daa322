using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using Grpc.Core;
using Spectre.Console;
using Spectre.Console.Rendering;
using Stargz.Protos;
using Stargz.StatusApi.V1;

namespace Stargz.Cli;

/// <summary>One remote layer as <c>stargz status</c> prints it (JSON field names are these, camelCase).</summary>
internal sealed record LayerReport(
    string Namespace, string SnapshotKey, string ImageReference, string LayerDigest, string TocDigest, string MountPoint, string State,
    long Size, long FetchedBytes, long FetchedOnDemandBytes, long FetchedPrefetchBytes, long FetchedBackgroundBytes, long FetchRequests,
    int ChunksCached, int ChunksTotal, long CacheHits, long CacheMisses, double HitRatio, long Errors, DateTime? UnavailableSince, string? LastError,
    string? ErofsImage = null, bool Adopted = false);

/// <summary>A layer that fell back to a full download.</summary>
internal sealed record FallbackReport(DateTime Time, string Namespace, string SnapshotKey, string ImageReference, string LayerDigest, string Reason,
    string Message);

internal sealed record StatusReport(DateTime Time, IReadOnlyList<LayerReport> Layers, IReadOnlyList<FallbackReport> Fallbacks);

/// <summary>Source-generated (the CLI is native AOT: no reflection-based serialization).</summary>
[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(StatusReport))]
internal sealed partial class StatusJsonContext : JsonSerializerContext;

/// <summary>
/// <c>stargz status [--address DAEMON_SOCK] [--json] [--watch] [--interval S]</c>: the daemon's remote layers (state, bytes
/// fetched, cache) and recent fallbacks, from the status API on the daemon's socket. A table on a terminal (redrawn
/// with --watch), JSON otherwise or with --json (one document per refresh with --watch). Exit 0, 1 (daemon not
/// reachable), 2 (usage).
/// </summary>
internal static class StatusCommand
{
    public const string DefaultAddress = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock";

    public const string Usage = """
          stargz status [--address DAEMON_SOCK] [--json] [--watch] [--interval S]
              the snapshotter daemon's remote layers: image, layer, snapshot, state (mounting, serving, fully-fetched,
              unavailable since T with the last error), size, bytes fetched on demand / by prefetch / in the background,
              chunks cached, cache hit ratio; and the recent layers that fell back to a full download, with why.
              A table on a terminal, JSON otherwise (--json: always); --watch redraws every --interval s (default 2)
              default --address /run/containerd-stargz-grpc/containerd-stargz-grpc.sock (the daemon's own socket)
        """;

    private static readonly ArgParser Options = new ArgParser().Value("--address", "-a").Switch("--json").Switch("--watch", "-w").Value("--interval");

    internal sealed record Args(string Address, bool Json, bool Watch, TimeSpan Interval);

    internal static Args Parse(IReadOnlyList<string> argv)
    {
        var f = Options.Parse(argv);
        if (f.Positional.Count > 0) throw new UsageException($"status takes no arguments (got \"{f.Positional[0]}\")");
        var interval = f.Int("--interval", min: 1) ?? 2;
        var address = f.Last("--address") ?? DefaultAddress;
        if (address.Length == 0) throw new UsageException("--address must not be empty");
        return new Args(address, f.Has("--json"), f.Has("--watch"), TimeSpan.FromSeconds(interval));
    }

    public static async Task<int> RunAsync(string[] argv, TextWriter stdout, TextWriter stderr, CancellationToken ct)
    {
        Args a;
        try { a = Parse(argv); }
        catch (UsageException e)
        {
            await stderr.WriteLineAsync($"stargz: {e.Message}").ConfigureAwait(false);
            await stderr.WriteAsync("usage:\n" + Usage).ConfigureAwait(false);
            return 2;
        }
        if (!File.Exists(a.Address))
        {
            await stderr.WriteLineAsync($"stargz: daemon socket {a.Address} does not exist (is stargz-snapshotter running? use --address)").ConfigureAwait(false);
            return 1;
        }
        using var channel = UnixGrpcChannel.Create(a.Address);
        var client = new Stargz.StatusApi.V1.Status.StatusClient(channel);
        var table = !a.Json && !Console.IsOutputRedirected && ReferenceEquals(stdout, Console.Out);
        try
        {
            if (!table)
            {
                while (true)
                {
                    var r = await FetchAsync(client, ct).ConfigureAwait(false);
                    await stdout.WriteLineAsync(ToJson(r)).ConfigureAwait(false);
                    await stdout.FlushAsync(ct).ConfigureAwait(false);
                    if (!a.Watch) return 0;
                    await Task.Delay(a.Interval, ct).ConfigureAwait(false);
                }
            }
            var first = await FetchAsync(client, ct).ConfigureAwait(false);
            if (!a.Watch)
            {
                AnsiConsole.Write(Render(first));
                return 0;
            }
            await AnsiConsole.Live(Render(first)).StartAsync(async ctx =>
            {
                while (true)
                {
                    await Task.Delay(a.Interval, ct).ConfigureAwait(false);
                    ctx.UpdateTarget(Render(await FetchAsync(client, ct).ConfigureAwait(false)));
                    ctx.Refresh();
                }
            }).ConfigureAwait(false);
            return 0;
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested) { return a.Watch ? 0 : 130; }
        catch (RpcException e) when (ct.IsCancellationRequested && e.StatusCode == StatusCode.Cancelled) { return a.Watch ? 0 : 130; }
        catch (RpcException e)
        {
            await stderr.WriteLineAsync(e.StatusCode == StatusCode.Unimplemented
                ? $"stargz: the daemon at {a.Address} has no status API (an older stargz-snapshotter, or not a stargz daemon)"
                : $"stargz: daemon at {a.Address}: {e.Status.Detail} ({e.StatusCode})").ConfigureAwait(false);
            return 1;
        }
    }

    private static async Task<StatusReport> FetchAsync(Stargz.StatusApi.V1.Status.StatusClient client, CancellationToken ct)
    {
        var resp = await client.GetAsync(new GetStatusRequest(), deadline: DateTime.UtcNow.AddSeconds(30), cancellationToken: ct).ConfigureAwait(false);
        return FromProto(resp);
    }

    internal static StatusReport FromProto(GetStatusResponse r)
    {
        var layers = new List<LayerReport>(r.Layers.Count);
        foreach (var l in r.Layers)
            layers.Add(new LayerReport(l.Namespace, l.SnapshotKey, l.ImageReference, l.LayerDigest, l.TocDigest, l.MountPoint, StateName(l.State),
                l.Size, l.FetchedBytes, l.FetchedOnDemandBytes, l.FetchedPrefetchBytes, l.FetchedBackgroundBytes, l.FetchRequests,
                l.ChunksCached, l.ChunksTotal, l.CacheHits, l.CacheMisses, l.HitRatio, l.Errors,
                l.UnavailableSince?.ToDateTime(), l.LastError.Length > 0 ? l.LastError : null,
                l.ErofsImage.Length > 0 ? l.ErofsImage : null, l.Adopted));
        var fallbacks = new List<FallbackReport>(r.Fallbacks.Count);
        foreach (var f in r.Fallbacks)
            fallbacks.Add(new FallbackReport(f.Time?.ToDateTime() ?? default, f.Namespace, f.SnapshotKey, f.ImageReference, f.LayerDigest, f.Reason, f.Message));
        return new StatusReport(r.Time?.ToDateTime() ?? DateTime.UtcNow, layers, fallbacks);
    }

    internal static string StateName(LayerState s) => s switch
    {
        LayerState.Mounting => "mounting",
        LayerState.Serving => "serving",
        LayerState.FullyFetched => "fully-fetched",
        LayerState.Unavailable => "unavailable",
        LayerState.Promoted => "promoted",
        _ => "unknown",
    };

    internal static string ToJson(StatusReport r) => JsonSerializer.Serialize(r, StatusJsonContext.Default.StatusReport);

    /// <summary>The terminal view: one table of layers, one of recent fallbacks (when there are any).</summary>
    internal static IRenderable Render(StatusReport r)
    {
        var layers = new Table().Border(TableBorder.Rounded).Title($"remote layers ({r.Layers.Count}) at {r.Time.ToLocalTime():HH:mm:ss}");
        layers.AddColumns("IMAGE", "LAYER", "SNAPSHOT", "STATE", "SIZE", "FETCHED (demand/prefetch/bg)", "CHUNKS", "HITS");
        foreach (var c in layers.Columns.Skip(4)) c.RightAligned();
        foreach (var l in r.Layers)
        {
            var state = l.State switch
            {
                "serving" => "[green]serving[/]",
                "fully-fetched" => "[blue]fully fetched[/]",
                "promoted" => "[blue]promoted (EROFS)[/]",
                "mounting" => "[yellow]mounting[/]",
                _ => "[red]" + Markup.Escape(l.State) + "[/]",
            };
            if (l.State == "unavailable" && l.UnavailableSince is { } since)
                state += $"\n[red]since {since.ToLocalTime():yyyy-MM-dd HH:mm:ss}[/]";
            if (l.Adopted) state += "\n[grey]kept over a restart[/]";
            if (l.LastError != null) state += "\n[grey]" + Markup.Escape(Shorten(l.LastError, 80)) + "[/]";
            layers.AddRow(
                new Markup(Markup.Escape(l.ImageReference)),
                new Markup(Markup.Escape(ShortDigest(l.LayerDigest))),
                new Markup(Markup.Escape(Shorten(l.SnapshotKey, 24))),
                new Markup(state),
                new Markup(Bytes(l.Size)),
                new Markup($"{Bytes(l.FetchedBytes)} ({Bytes(l.FetchedOnDemandBytes)}/{Bytes(l.FetchedPrefetchBytes)}/{Bytes(l.FetchedBackgroundBytes)})"),
                new Markup($"{l.ChunksCached}/{l.ChunksTotal}"),
                new Markup(l.CacheHits + l.CacheMisses == 0 ? "-" : (l.HitRatio * 100).ToString("0.0", CultureInfo.InvariantCulture) + "%"));
        }
        if (r.Fallbacks.Count == 0) return layers;
        var fb = new Table().Border(TableBorder.Rounded).Title($"recent fallbacks to a full download ({r.Fallbacks.Count})");
        fb.AddColumns("TIME", "IMAGE", "LAYER", "REASON", "WHY");
        foreach (var f in r.Fallbacks)
            fb.AddRow(
                new Markup(f.Time.ToLocalTime().ToString("HH:mm:ss", CultureInfo.InvariantCulture)),
                new Markup(Markup.Escape(f.ImageReference)),
                new Markup(Markup.Escape(ShortDigest(f.LayerDigest))),
                new Markup("[yellow]" + Markup.Escape(f.Reason) + "[/]"),
                new Markup(Markup.Escape(Shorten(f.Message, 120))));
        return new Rows(layers, fb);
    }

    internal static string ShortDigest(string d)
    {
        var colon = d.IndexOf(':');
        return colon >= 0 && d.Length > colon + 13 ? d[..(colon + 13)] : d;
    }

    private static string Shorten(string s, int max) => s.Length <= max ? s : s[..(max - 1)] + "…";

    internal static string Bytes(long n) => n switch
    {
        < 1024 => n.ToString(CultureInfo.InvariantCulture) + " B",
        < 1024 * 1024 => (n / 1024.0).ToString("0.0", CultureInfo.InvariantCulture) + " KiB",
        < 1024L * 1024 * 1024 => (n / (1024.0 * 1024)).ToString("0.0", CultureInfo.InvariantCulture) + " MiB",
        _ => (n / (1024.0 * 1024 * 1024)).ToString("0.00", CultureInfo.InvariantCulture) + " GiB",
    };
}
