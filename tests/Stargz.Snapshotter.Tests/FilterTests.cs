namespace Stargz.Snapshotter.Tests;

/// <summary>containerd's filter syntax on its own (the gRPC List tests cover the wire).</summary>
public class FilterTests
{
    private static SnapshotRecord Rec(string key, string parent = "", SnapshotKind kind = SnapshotKind.Committed, params (string, string)[] labels)
    {
        var r = new SnapshotRecord { Key = key, Parent = parent, Kind = kind };
        foreach (var (k, v) in labels) r.Labels[k] = v;
        return r;
    }

    [Theory]
    [InlineData("labels.\"containerd.io/snapshot.ref\"==sha256:abc", true)]
    [InlineData("labels.`containerd.io/snapshot.ref`==\"sha256:abc\"", true)]
    [InlineData("labels.\"containerd.io/snapshot.ref\"==sha256:abd", false)]
    [InlineData("labels.\"containerd.io/snapshot.ref\"==sha256:abc,parent==\"p\"", true)]
    [InlineData("labels.\"containerd.io/snapshot.ref\"==sha256:abc,parent==\"q\"", false)]
    [InlineData("labels.\"with \\\"quote\\\"\"==yes", true)]
    [InlineData("labels.plain", true)]
    [InlineData("labels.absent", false)]
    [InlineData("labels.absent!=x", true)]
    [InlineData("kind==committed", true)]
    [InlineData("kind==active", false)]
    [InlineData("name~=^sha", true)]
    [InlineData(" name == sha256:abc-snap ", true)]
    public void SelectorsMatchAsContainerdDefinesThem(string filter, bool expected)
    {
        var r = Rec("sha256:abc-snap", "p", SnapshotKind.Committed,
            ("containerd.io/snapshot.ref", "sha256:abc"), ("with \"quote\"", "yes"), ("plain", "v"));
        Assert.Equal(expected, SnapshotFilter.Parse([filter]).Match(r));
    }

    [Fact]
    public void NoFiltersMatchEverythingAndSeveralAreOred()
    {
        var a = Rec("a");
        var b = Rec("b");
        Assert.True(SnapshotFilter.Parse([]).Match(a));
        var f = SnapshotFilter.Parse(["name==a", "name==b"]);
        Assert.True(f.Match(a));
        Assert.True(f.Match(b));
        Assert.False(f.Match(Rec("c")));
    }

    [Theory]
    [InlineData("labels.\"open")]
    [InlineData("name==")]
    [InlineData("==x")]
    [InlineData("name~=(")]
    public void MalformedFiltersAreInvalidArgument(string filter)
    {
        var e = Assert.Throws<SnapshotterException>(() => SnapshotFilter.Parse([filter]));
        Assert.Equal(SnapshotterErrorKind.InvalidArgument, e.Kind);
    }
}
