using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using LiteDB;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// Keys and labels as big as a client can send: long keys are stored and found again (also after a restart), errors
/// about them are ordinary gRPC statuses quoting the key's start, oversized requests get ResourceExhausted, invalid
/// labels InvalidArgument.
/// </summary>
public class LongKeyTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static string LongKey(string prefix, int length) => prefix + new string('k', length - prefix.Length);

    private static PrepareSnapshotRequest Prep(string key, string parent = "", IDictionary<string, string>? labels = null)
    {
        var r = new PrepareSnapshotRequest { Snapshotter = "stargz", Key = key, Parent = parent };
        if (labels != null) r.Labels.Add(labels);
        return r;
    }

    private static async Task<RpcException> Fails(Func<Task> call)
    {
        try { await call(); }
        catch (RpcException e) { return e; }
        Assert.Fail("the call succeeded");
        return null!;
    }

    [Fact]
    public async Task KeysOf100KBAnd1MiBWorkThroughEveryCall_AndAreFoundAfterARestart()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var c = s.Client;
        var active = LongKey("default/1/extract-", 100_000);
        var layer = LongKey("default/2/sha256:", 1 << 20);
        // Two keys that differ only in their last character, both far beyond any index key limit.
        var view1 = LongKey("default/3/view-", 200_000) + "1";
        var view2 = LongKey("default/3/view-", 200_000) + "2";

        var m = (await c.PrepareAsync(Prep(active), cancellationToken: Ct)).Mounts.Single();
        await File.WriteAllTextAsync(Path.Combine(m.Source, "f.txt"), "long keys", Ct);
        await c.CommitAsync(new CommitSnapshotRequest { Snapshotter = "stargz", Name = layer, Key = active }, cancellationToken: Ct);
        await c.ViewAsync(new ViewSnapshotRequest { Snapshotter = "stargz", Key = view1, Parent = layer }, cancellationToken: Ct);
        var v2 = (await c.ViewAsync(new ViewSnapshotRequest { Snapshotter = "stargz", Key = view2, Parent = layer }, cancellationToken: Ct)).Mounts.Single();
        Assert.Equal("long keys", await File.ReadAllTextAsync(Path.Combine(v2.Source, "f.txt"), Ct));

        await s.ReopenAsync(null);
        c = s.Client;
        var info = (await c.StatAsync(new StatSnapshotRequest { Snapshotter = "stargz", Key = view2 }, cancellationToken: Ct)).Info;
        Assert.Equal(view2, info.Name);
        Assert.Equal(layer, info.Parent);
        Assert.Equal(Kind.View, info.Kind);
        var names = (await Client.ListAll(c, Ct)).Select(i => i.Name).Order(StringComparer.Ordinal).ToList();
        Assert.Equal(new[] { layer, view1, view2 }.Order(StringComparer.Ordinal), names);
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.StatAsync(new StatSnapshotRequest { Key = active }, cancellationToken: Ct)));
        // The parent has children: refused, by a status naming the key's start.
        var e = await Fails(async () => await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = layer }, cancellationToken: Ct));
        Assert.Equal(StatusCode.FailedPrecondition, e.StatusCode);
        await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = view1 }, cancellationToken: Ct);
        await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = view2 }, cancellationToken: Ct);
        await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = layer }, cancellationToken: Ct);
        Assert.Empty(await Client.ListAll(c, Ct));
    }

    [Fact]
    public async Task AnErrorAboutA1MiBKeyIsAGrpcStatusQuotingOnlyTheKeysStart()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var key = LongKey("default/9/a-key-that-goes-on-", 1 << 20);
        await s.Client.PrepareAsync(Prep(key), cancellationToken: Ct);

        var e = await Fails(async () => await s.Client.PrepareAsync(Prep(key), cancellationToken: Ct));
        Assert.Equal(StatusCode.AlreadyExists, e.StatusCode);
        Assert.Contains(key[..KeyText.MaxChars], e.Status.Detail);
        Assert.True(e.Status.Detail.Length < 2 * KeyText.MaxMessageChars, $"status message of {e.Status.Detail.Length} chars");

        var missing = LongKey("default/9/missing-", 300_000);
        e = await Fails(async () => await s.Client.PrepareAsync(Prep("default/10/child", parent: missing), cancellationToken: Ct));
        Assert.Equal(StatusCode.NotFound, e.StatusCode);
        Assert.Contains(missing[..KeyText.MaxChars], e.Status.Detail);
        Assert.True(e.Status.Detail.Length < 2 * KeyText.MaxMessageChars, $"status message of {e.Status.Detail.Length} chars");
    }

    [Fact]
    public async Task TenThousandLabelsAreStoredListedAndUpdated()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var labels = Enumerable.Range(0, 10_000).ToDictionary(i => $"example.com/label-{i:D5}", i => new string('v', i % 100) + i);
        await s.Client.PrepareAsync(Prep("default/1/many-labels", labels: labels), cancellationToken: Ct);
        var info = (await s.Client.StatAsync(new StatSnapshotRequest { Key = "default/1/many-labels" }, cancellationToken: Ct)).Info;
        Assert.Equal(labels, info.Labels.ToDictionary());

        var upd = new UpdateSnapshotRequest { Snapshotter = "stargz", Info = new Info { Name = "default/1/many-labels" } };
        upd.Info.Labels["example.com/label-00007"] = "changed";
        upd.UpdateMask = new Google.Protobuf.WellKnownTypes.FieldMask();
        upd.UpdateMask.Paths.Add("labels.example.com/label-00007");
        await s.Client.UpdateAsync(upd, cancellationToken: Ct);
        labels["example.com/label-00007"] = "changed";

        // A filter on one label finds it among them; List carries them whole.
        var found = await Client.ListAll(s.Client, Ct, "labels.\"example.com/label-00007\"==changed");
        Assert.Equal(labels, found.Single().Labels.ToDictionary());
    }

    [Fact]
    public async Task ListSplitsManyLargeSnapshotsIntoMessagesContainerdCanRead()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        // 40 snapshots of ~300 KB each (key and labels): 12 MB in all, three times what containerd's proxy client takes
        // in one message.
        var keys = new List<string>();
        for (int i = 0; i < 40; i++)
        {
            var key = LongKey($"default/{i + 1}/big-{i:D2}-", 200_000);
            var labels = Enumerable.Range(0, 30).ToDictionary(j => $"l{j}", j => new string('x', 3_000));
            await s.Client.PrepareAsync(Prep(key, labels: labels), cancellationToken: Ct);
            keys.Add(key);
        }
        using var call = s.Client.List(new ListSnapshotsRequest { Snapshotter = "stargz" }, cancellationToken: Ct);
        var seen = new List<string>();
        await foreach (var r in call.ResponseStream.ReadAllAsync(Ct))
        {
            Assert.True(r.CalculateSize() <= 4 << 20, $"a List message of {r.CalculateSize()} bytes");
            seen.AddRange(r.Info.Select(i => i.Name));
        }
        Assert.Equal(keys, seen);
    }

    [Fact]
    public async Task ARequestOverTheMessageLimitGetsResourceExhausted_AndALabelContainerdWouldRefuseGetsInvalidArgument()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        var huge = Prep("default/1/huge", labels: Enumerable.Range(0, 5_000).ToDictionary(i => $"l{i}", _ => new string('x', 4_000)));
        Assert.True(huge.CalculateSize() > SnapshotsGrpcService.MaxRequestBytes);
        var e = await Fails(async () => await s.Client.PrepareAsync(huge, cancellationToken: Ct));
        Assert.Equal(StatusCode.ResourceExhausted, e.StatusCode);

        e = await Fails(async () => await s.Client.PrepareAsync(Prep("default/2/bad-label", labels: new Dictionary<string, string>
        {
            ["example.com/too-long"] = new string('x', 5_000),
        }), cancellationToken: Ct));
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("example.com/too-long", e.Status.Detail);

        // Neither left anything behind; the snapshotter still serves.
        Assert.Empty(await Client.ListAll(s.Client, Ct));
        await s.Client.PrepareAsync(Prep("default/3/fine"), cancellationToken: Ct);
    }

    [Fact]
    public async Task AMalformedRequestGetsInvalidArgumentNamingTheMessage_AndTheServerGoesOn()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        await using var raw = await RawGrpcClient.ConnectAsync(s.Socket, Ct);
        const string svc = "/containerd.services.snapshots.v1.Snapshots/";
        // Field 2 (key), length-delimited, claims 100 bytes and has 3; then a tag with wire type 7, which does not exist.
        byte[][] malformed = [[0x12, 100, (byte)'a', (byte)'b', (byte)'c'], [0x0f, 0x01]];
        foreach (var body in malformed)
        {
            var r = await raw.CallAsync(svc + "Prepare", "localhost", body, Ct);
            Assert.Equal(((int)StatusCode.InvalidArgument).ToString(), r.Status);
            Assert.Contains("PrepareSnapshotRequest", r.ErrorMessage);
        }
        var stat = await raw.CallAsync(svc + "Stat", "localhost", [0x0a, 0x05, 0x01], Ct);
        Assert.Equal(((int)StatusCode.InvalidArgument).ToString(), stat.Status);
        Assert.Contains("StatSnapshotRequest", stat.ErrorMessage);

        // Well-formed calls on the same connection still work.
        var ok = await raw.CallAsync(svc + "Prepare", "localhost", new PrepareSnapshotRequest { Snapshotter = "stargz", Key = "default/1/fine" }, Ct);
        Assert.Equal("0", ok.Status);
    }

    [Fact]
    public async Task LabelsPiledUpByUpdatesBeyondWhatTheStoreHoldsGetResourceExhausted()
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        await s.Client.PrepareAsync(Prep("default/1/growing"), cancellationToken: Ct);
        StatusCode code = StatusCode.OK;
        for (int round = 0; round < 10 && code == StatusCode.OK; round++)
        {
            // 3 MB of labels per Update, each label within containerd's 4096-byte rule.
            var upd = new UpdateSnapshotRequest { Snapshotter = "stargz", Info = new Info { Name = "default/1/growing" } };
            upd.UpdateMask = new Google.Protobuf.WellKnownTypes.FieldMask();
            for (int i = 0; i < 750; i++)
            {
                var k = $"r{round}/l{i}";
                upd.Info.Labels[k] = new string('x', 4_000);
                upd.UpdateMask.Paths.Add("labels." + k);
            }
            code = await Client.CodeOf(async () => await s.Client.UpdateAsync(upd, cancellationToken: Ct));
        }
        Assert.Equal(StatusCode.ResourceExhausted, code);
        // What was stored before stays readable (from the store: one Stat answer of that size is more than a gRPC
        // client takes by default).
        var rec = await s.Snapshotter.StatAsync("", "default/1/growing", Ct);
        Assert.True(rec.Labels.Count >= 750 && rec.Labels.Count % 750 == 0, $"{rec.Labels.Count} labels");
    }

    [Fact]
    public async Task AStoreWrittenBeforeLongKeysWereHashedIsStillRead()
    {
        using var dir = new TempDir("sgs-old");
        var root = Path.Combine(dir.Path, "root");
        Directory.CreateDirectory(Path.Combine(root, "snapshots", "1", "fs"));
        // As the previous version stored it: the index field holds the namespaced key itself, here 700 bytes (which
        // LiteDB took, and which is hashed now).
        var key = LongKey("default/1/old-", 700);
        using (var db = new LiteDatabase(new ConnectionString { Filename = Path.Combine(root, "metadata.db"), Connection = ConnectionType.Direct }))
        {
            var snaps = db.GetCollection("snapshots", BsonAutoId.Int64);
            snaps.EnsureIndex("nk", "$.nk", unique: true);
            snaps.EnsureIndex("np", "$.np", unique: false);
            snaps.Insert(new BsonDocument
            {
                ["_id"] = 1L, ["ns"] = "", ["key"] = key, ["nk"] = "\u0000" + key, ["parent"] = "", ["np"] = BsonValue.Null,
                ["kind"] = (int)SnapshotKind.Committed, ["created"] = DateTime.UtcNow.Ticks, ["updated"] = DateTime.UtcNow.Ticks,
                ["labels"] = new BsonArray(), ["size"] = 0L, ["inodes"] = 1L,
            });
            db.GetCollection("meta").Upsert(new BsonDocument { ["_id"] = "seq", ["v"] = 1L });
        }
        await using var sn = await StargzSnapshotter.OpenAsync(new SnapshotterOptions { Root = root }, null, Ct);
        Assert.Equal(SnapshotKind.Committed, (await sn.StatAsync("", key, Ct)).Kind);
        await sn.PrepareAsync("", "default/2/child", key, new Dictionary<string, string>(), Ct);
        await Assert.ThrowsAsync<SnapshotterException>(() => sn.RemoveAsync("", key, Ct)); // has a child: found by parent
        await sn.RemoveAsync("", "default/2/child", Ct);
        await sn.RemoveAsync("", key, Ct);
    }

    [Fact]
    public async Task TheDaemonsLogQuotesAtMostTheStartOfA1MiBKey()
    {
        await using var daemon = await LocalDaemon.StartAsync(logLevel: "debug");
        using var ch = Client.Channel(daemon.Socket);
        var c = new Snapshots.SnapshotsClient(ch);
        var key = LongKey("default/1/logged-", 1 << 20);
        await c.PrepareAsync(Prep(key), cancellationToken: Ct);
        Assert.Equal(StatusCode.AlreadyExists, await Client.CodeOf(async () => await c.PrepareAsync(Prep(key), cancellationToken: Ct)));
        Assert.Equal(StatusCode.NotFound, await Client.CodeOf(async () =>
            await c.CommitAsync(new CommitSnapshotRequest { Snapshotter = "stargz", Name = key + "-c", Key = key + "-missing" }, cancellationToken: Ct)));
        await c.RemoveAsync(new RemoveSnapshotRequest { Snapshotter = "stargz", Key = key }, cancellationToken: Ct);
        Assert.Equal(0, await daemon.StopAsync());
        var lines = daemon.Log.Split('\n');
        Assert.Contains(lines, l => l.Contains(key[..KeyText.MaxChars], StringComparison.Ordinal));
        var longest = lines.Max(l => l.Length);
        Assert.True(longest < 4 * KeyText.MaxMessageChars, $"a log line of {longest} chars");
    }

    [Fact]
    public void ShortQuotesTheStartOfALongKeyAndItsLength()
    {
        Assert.Equal("abc", KeyText.Short("abc"));
        var k = new string('a', 199) + "\U0001F600" + new string('b', 1000);
        var s = KeyText.Short(k);
        Assert.StartsWith(new string('a', 199), s);
        Assert.DoesNotContain('\uD83D', s); // the surrogate pair is not split
        Assert.EndsWith($"({k.Length} chars)", s);
        var m = KeyText.Bound($"snapshot {k} and parent {k[..500]} exist", k, k[..500]);
        Assert.Equal($"snapshot {KeyText.Short(k)} and parent {KeyText.Short(k[..500])} exist", m);
    }
}
