using System.Text.Json;
using Google.Protobuf.WellKnownTypes;
using Spectre.Console;
using Stargz.StatusApi.V1;

namespace Stargz.Cli.Tests;

/// <summary>`stargz status`: arguments, the status API's answer as JSON and as the terminal table.</summary>
public class StatusCommandTests
{
    private static readonly DateTime Since = new(2026, 12, 5, 11, 30, 0, DateTimeKind.Utc);

    private static GetStatusResponse Sample()
    {
        var r = new GetStatusResponse { Time = Timestamp.FromDateTime(new DateTime(2026, 12, 5, 12, 0, 0, DateTimeKind.Utc)) };
        r.Layers.Add(new LayerStatus
        {
            Namespace = "default", SnapshotKey = "sha256:1111", ImageReference = "127.0.0.1:5000/app:esgz",
            LayerDigest = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", TocDigest = "sha256:toc", MountPoint = "/r/snapshots/1/fs",
            State = LayerState.Serving, Size = 3 << 20, FetchedBytes = 1536 * 1024, FetchedOnDemandBytes = 1024 * 1024, FetchedPrefetchBytes = 512 * 1024,
            FetchRequests = 7, ChunksCached = 12, ChunksTotal = 40, CacheHits = 3, CacheMisses = 1, HitRatio = 0.75,
        });
        r.Layers.Add(new LayerStatus
        {
            Namespace = "default", SnapshotKey = "sha256:2222", ImageReference = "127.0.0.1:5000/app:esgz",
            LayerDigest = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", State = LayerState.Unavailable,
            UnavailableSince = Timestamp.FromDateTime(Since), LastError = "registry 127.0.0.1:5000: connection refused",
        });
        r.Fallbacks.Add(new Fallback
        {
            Time = Timestamp.FromDateTime(Since), Namespace = "default", SnapshotKey = "sha256:3333", ImageReference = "127.0.0.1:5000/plain:v1",
            LayerDigest = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc", Reason = "not_estargz",
            Message = "layer sha256:ccc has no eStargz footer (not eStargz, or truncated)",
        });
        return r;
    }

    [Fact]
    public void JsonCarriesEveryFieldOfEveryLayerAndFallback()
    {
        var json = StatusCommand.ToJson(StatusCommand.FromProto(Sample()));
        using var doc = JsonDocument.Parse(json);
        var layers = doc.RootElement.GetProperty("layers");
        Assert.Equal(2, layers.GetArrayLength());
        var l = layers[0];
        Assert.Equal("127.0.0.1:5000/app:esgz", l.GetProperty("imageReference").GetString());
        Assert.Equal("sha256:1111", l.GetProperty("snapshotKey").GetString());
        Assert.Equal("serving", l.GetProperty("state").GetString());
        Assert.Equal(3L << 20, l.GetProperty("size").GetInt64());
        Assert.Equal(1536 * 1024, l.GetProperty("fetchedBytes").GetInt64());
        Assert.Equal(1024 * 1024, l.GetProperty("fetchedOnDemandBytes").GetInt64());
        Assert.Equal(512 * 1024, l.GetProperty("fetchedPrefetchBytes").GetInt64());
        Assert.Equal(0, l.GetProperty("fetchedBackgroundBytes").GetInt64());
        Assert.Equal(12, l.GetProperty("chunksCached").GetInt32());
        Assert.Equal(40, l.GetProperty("chunksTotal").GetInt32());
        Assert.Equal(0.75, l.GetProperty("hitRatio").GetDouble());
        Assert.Equal(JsonValueKind.Null, l.GetProperty("unavailableSince").ValueKind);
        Assert.Equal(JsonValueKind.Null, l.GetProperty("lastError").ValueKind);
        var u = layers[1];
        Assert.Equal("unavailable", u.GetProperty("state").GetString());
        Assert.Equal(Since, u.GetProperty("unavailableSince").GetDateTime().ToUniversalTime());
        Assert.Equal("registry 127.0.0.1:5000: connection refused", u.GetProperty("lastError").GetString());
        var f = Assert.Single(doc.RootElement.GetProperty("fallbacks").EnumerateArray());
        Assert.Equal("not_estargz", f.GetProperty("reason").GetString());
        Assert.Equal("127.0.0.1:5000/plain:v1", f.GetProperty("imageReference").GetString());
        Assert.Contains("no eStargz footer", f.GetProperty("message").GetString());
    }

    [Fact]
    public void TableShowsStatesBytesChunksHitRatioAndFallbackReasons()
    {
        var text = RenderToText(StatusCommand.Render(StatusCommand.FromProto(Sample())));
        Assert.Contains("127.0.0.1:5000/app:esgz", text);
        Assert.Contains("sha256:aaaaaaaaaaaa", text);        // digests shortened to 12 hex digits
        Assert.DoesNotContain("sha256:aaaaaaaaaaaaa", text);
        Assert.Contains("serving", text);
        Assert.Contains("3.0 MiB", text);                    // size
        Assert.Contains("1.5 MiB (1.0 MiB/512.0 KiB/0 B)", text);
        Assert.Contains("12/40", text);
        Assert.Contains("75.0%", text);
        Assert.Contains("unavailable", text);
        Assert.Contains("since " + Since.ToLocalTime().ToString("yyyy-MM-dd HH:mm:ss"), text);
        Assert.Contains("connection refused", text);
        Assert.Contains("recent fallbacks", text);
        Assert.Contains("not_estargz", text);
        Assert.Contains("127.0.0.1:5000/plain:v1", text);
    }

    [Fact]
    public void TableOfNoLayersSaysSoAndHasNoFallbackTable()
    {
        var text = RenderToText(StatusCommand.Render(StatusCommand.FromProto(new GetStatusResponse { Time = Timestamp.FromDateTime(Since) })));
        Assert.Contains("remote layers (0)", text);
        Assert.DoesNotContain("fallbacks", text);
    }

    [Fact]
    public void ArgumentsDefaultToTheDaemonsSocketAndRefuseExtras()
    {
        var a = StatusCommand.Parse([]);
        Assert.Equal("/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", a.Address);
        Assert.False(a.Json);
        Assert.False(a.Watch);
        Assert.Equal(TimeSpan.FromSeconds(2), a.Interval);
        a = StatusCommand.Parse(["--address", "/tmp/d.sock", "--json", "-w", "--interval=5"]);
        Assert.Equal(("/tmp/d.sock", true, true, TimeSpan.FromSeconds(5)), (a.Address, a.Json, a.Watch, a.Interval));
        Assert.Contains("no arguments", Assert.Throws<UsageException>(() => StatusCommand.Parse(["extra"])).Message);
        Assert.Contains("at least 1", Assert.Throws<UsageException>(() => StatusCommand.Parse(["--interval", "0"])).Message);
    }

    [Fact]
    public async Task AMissingDaemonSocketIsAClearErrorNamingThePath()
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        var code = await StatusCommand.RunAsync(["--address", "/nonexistent/stargz.sock", "--json"], stdout, stderr, TestContext.Current.CancellationToken);
        Assert.Equal(1, code);
        Assert.Contains("/nonexistent/stargz.sock does not exist", stderr.ToString());
        Assert.Empty(stdout.ToString());
    }

    private static string RenderToText(Spectre.Console.Rendering.IRenderable r)
    {
        var w = new StringWriter();
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors, Out = new AnsiConsoleOutput(w), Interactive = InteractionSupport.No,
        });
        console.Profile.Width = 240;
        console.Write(r);
        return w.ToString();
    }
}
