namespace Stargz.Estargz.Tests;

/// <summary>The snapshot labels of a layer as the lazy layer reads them (ctr-remote's and CRI's).</summary>
public class LayerSourceTests
{
    private static string D(char c) => "sha256:" + new string(c, 64);

    [Fact]
    public void OursWinOverCrisAndCrisServeWhenOursAreMissing()
    {
        var both = LayerSource.FromLabels(new Dictionary<string, string>
        {
            [SnapshotLabels.Reference] = "ours/app:1", [SnapshotLabels.CriImageRef] = "cri/app:1",
            [SnapshotLabels.Digest] = D('a'), [SnapshotLabels.CriLayerDigest] = D('b'),
            [SnapshotLabels.Layers] = D('a'), [SnapshotLabels.CriImageLayers] = $"{D('b')},{D('c')}",
        });
        Assert.Equal("ours/app:1", both.Reference);
        Assert.Equal(D('a'), both.Digest);
        Assert.Equal([D('a')], both.Layers);

        var cri = LayerSource.FromLabels(new Dictionary<string, string>
        {
            ["containerd.io/snapshot/cri.image-ref"] = "cri/app:1",
            ["containerd.io/snapshot/cri.layer-digest"] = D('b'),
            ["containerd.io/snapshot/cri.image-layers"] = $"{D('b')}, {D('c')}",
        });
        Assert.Equal("cri/app:1", cri.Reference);
        Assert.Equal(D('b'), cri.Digest);
        Assert.Equal([D('b'), D('c')], cri.Layers);
        Assert.Null(cri.TocDigest);
        Assert.Null(cri.PrefetchSize);
        Assert.Empty(cri.Urls);
    }

    [Fact]
    public void BlankValuesCountAsAbsentAndValuesAreTrimmed()
    {
        var s = LayerSource.FromLabels(new Dictionary<string, string>
        {
            [SnapshotLabels.Reference] = "  ", [SnapshotLabels.CriImageRef] = " cri/app:1 ",
            [SnapshotLabels.Digest] = "",
            [SnapshotLabels.TocDigest] = $" {D('t')}\n",
            [SnapshotLabels.Prefetch] = "-5",
        });
        Assert.Equal("cri/app:1", s.Reference);
        Assert.Null(s.Digest);
        Assert.Equal(D('t'), s.TocDigest);
        Assert.Null(s.PrefetchSize); // not a size
        Assert.Empty(s.Layers);
        Assert.Empty(s.LayerUrls);
    }

    [Fact]
    public void SkipVerifyIsSetByThePresenceOfItsLabel()
    {
        Assert.True(LayerSource.FromLabels(new Dictionary<string, string> { ["containerd.io/snapshot/remote/stargz.skipverify"] = "" }).SkipVerify);
        Assert.False(LayerSource.FromLabels(new Dictionary<string, string>()).SkipVerify);
    }

    [Fact]
    public void UrlsOfEachLayerFollowTheLayersList()
    {
        var s = LayerSource.FromLabels(new Dictionary<string, string>
        {
            [SnapshotLabels.Layers] = $"{D('a')},,{D('b')}",
            ["containerd.io/snapshot/remote/urls"] = "https://x.invalid/a",
            ["containerd.io/snapshot/remote/urls.1"] = "https://x.invalid/b1, https://x.invalid/b2",
        });
        Assert.Equal([D('a'), D('b')], s.Layers);
        Assert.Equal(["https://x.invalid/a"], s.Urls);
        Assert.Empty(s.LayerUrls[0]);
        Assert.Equal(["https://x.invalid/b1", "https://x.invalid/b2"], s.LayerUrls[1]);
    }

    [Fact]
    public void WrittenLabelsAreReadBackAndFitContainerdsLimit()
    {
        var layers = new (string, IReadOnlyList<string>?)[60];
        for (var i = 0; i < layers.Length; i++) layers[i] = ("sha256:" + i.ToString("x64"), i == 0 ? ["https://x.invalid/0"] : null);
        var labels = new Dictionary<string, string>();
        LayerSource.WriteLabels(labels, "r/app:1", layers, 0, 10 << 20);
        foreach (var (k, v) in labels) Assert.True(k.Length + v.Length <= SnapshotLabels.MaxBytes, k);
        var s = LayerSource.FromLabels(labels);
        Assert.Equal("r/app:1", s.Reference);
        Assert.Equal(layers[0].Item1, s.Digest);
        Assert.Equal(10 << 20, s.PrefetchSize);
        Assert.Equal(["https://x.invalid/0"], s.Urls);
        Assert.Equal(["https://x.invalid/0"], s.LayerUrls[0]);
        Assert.InRange(s.Layers.Length, 40, 59); // cut to fit, at a whole digest
        for (var i = 0; i < s.Layers.Length; i++) Assert.Equal(layers[i].Item1, s.Layers[i]);
    }
}
