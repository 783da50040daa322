using System.Text;
using System.Text.RegularExpressions;
using Stargz.Containerd;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Containerd.Tests;

public class RpullLabelsTests
{
    private static string D(char c) => "sha256:" + new string(c, 64);

    [Fact]
    public void ChainIdsFollowTheOciDefinition()
    {
        // Expected values from `printf 'sha256:aaaa sha256:bbbb' | sha256sum` and so on.
        var ids = RpullLabels.ChainIds(["sha256:aaaa", "sha256:bbbb", "sha256:cccc"]);
        Assert.Equal("sha256:aaaa", ids[0]);
        Assert.Equal("sha256:2c4d8760379f05d0ad1ed610712309f0114e7345e6e6a351494cff030ffdf197", ids[1]);
        Assert.Equal("sha256:10f847b3ece58353f298bec20c58125235b631360ad43ac162131980750211ff", ids[2]);
        Assert.Empty(RpullLabels.ChainIds([]));
    }

    [Fact]
    public void LayerLabelsCarryTheReferenceTheLayerTheFollowingLayersAndItsAnnotations()
    {
        var layers = new[]
        {
            new Descriptor { Digest = D('a'), MediaType = "application/vnd.oci.image.layer.v1.tar+gzip" },
            new Descriptor
            {
                Digest = D('b'), MediaType = "application/vnd.oci.image.layer.v1.tar+gzip",
                Annotations = new Dictionary<string, string>
                {
                    ["containerd.io/snapshot/stargz/toc.digest"] = D('t'),
                    ["io.containers.estargz.uncompressed-size"] = "12345",
                    ["org.opencontainers.image.title"] = "not passed on",
                },
                Urls = ["https://example.invalid/b"],
            },
            new Descriptor { Digest = D('c'), MediaType = "application/vnd.oci.image.layer.v1.tar+gzip", Urls = ["https://example.invalid/c"] },
        };
        var l = RpullLabels.ForLayer("127.0.0.1:5000/app:esgz", layers, 1, "sha256:chain");
        Assert.Equal("127.0.0.1:5000/app:esgz", l["containerd.io/snapshot/remote/stargz.reference"]);
        Assert.Equal(D('b'), l["containerd.io/snapshot/remote/stargz.digest"]);
        Assert.Equal($"{D('b')},{D('c')}", l["containerd.io/snapshot/remote/stargz.layers"]); // this one and the following
        Assert.Equal("10485760", l["containerd.io/snapshot/remote/stargz.prefetch"]);
        Assert.Equal(D('t'), l["containerd.io/snapshot/stargz/toc.digest"]);
        Assert.Equal("12345", l["io.containers.estargz.uncompressed-size"]);
        Assert.Equal("sha256:chain", l["containerd.io/snapshot.ref"]);
        Assert.Equal("https://example.invalid/b", l["containerd.io/snapshot/remote/urls"]);
        // urls.N counts from this layer: 0 is layer b, 1 is layer c.
        Assert.Equal("https://example.invalid/b", l["containerd.io/snapshot/remote/urls.0"]);
        Assert.Equal("https://example.invalid/c", l["containerd.io/snapshot/remote/urls.1"]);
        Assert.False(l.ContainsKey("org.opencontainers.image.title"));
        Assert.False(l.ContainsKey("containerd.io/snapshot/remote/urls.2"));

        var first = RpullLabels.ForLayer("r", layers, 0, "sha256:x");
        Assert.Equal($"{D('a')},{D('b')},{D('c')}", first["containerd.io/snapshot/remote/stargz.layers"]);
        Assert.False(first.ContainsKey("containerd.io/snapshot/remote/urls"));
        Assert.False(first.ContainsKey("containerd.io/snapshot/stargz/toc.digest"));
    }

    [Fact]
    public void TheLayerReadsBackWhatRpullWrites()
    {
        var layers = new[]
        {
            new Descriptor { Digest = D('a') },
            new Descriptor
            {
                Digest = D('b'), Annotations = new Dictionary<string, string> { ["containerd.io/snapshot/stargz/toc.digest"] = D('t') },
                Urls = ["https://example.invalid/b1", "https://example.invalid/b2"],
            },
            new Descriptor { Digest = D('c'), Urls = ["https://example.invalid/c"] },
        };
        var source = LayerSource.FromLabels(RpullLabels.ForLayer("127.0.0.1:5000/app:esgz", layers, 1, "sha256:chain", prefetchSize: 777));
        Assert.Equal("127.0.0.1:5000/app:esgz", source.Reference);
        Assert.Equal(D('b'), source.Digest);
        Assert.Equal(D('t'), source.TocDigest);
        Assert.Equal(777, source.PrefetchSize);
        Assert.False(source.SkipVerify);
        Assert.Equal(["https://example.invalid/b1", "https://example.invalid/b2"], source.Urls);
        Assert.Equal([D('b'), D('c')], source.Layers);
        Assert.Equal(2, source.LayerUrls.Length);
        Assert.Equal(["https://example.invalid/b1", "https://example.invalid/b2"], source.LayerUrls[0]);
        Assert.Equal(["https://example.invalid/c"], source.LayerUrls[1]);
    }

    [Fact]
    public void TheLayersLabelIsCutToContainerdsLabelLimit()
    {
        // 100 layers of 71-byte digests do not fit in 4096 bytes with the key: the list stops at a whole digest.
        var layers = Enumerable.Range(0, 100).Select(i => new Descriptor { Digest = "sha256:" + i.ToString("x64") }).ToArray();
        var l = RpullLabels.ForLayer("r", layers, 0, "sha256:x");
        var v = l[SnapshotLabels.Layers];
        Assert.True(SnapshotLabels.Layers.Length + v.Length <= 4096, $"{v.Length} bytes");
        var listed = v.Split(',');
        Assert.True(listed.Length is > 40 and < 100, $"{listed.Length} digests");
        Assert.Equal(layers.Take(listed.Length).Select(d => d.Digest), listed);
        // One more digest would not have fitted.
        Assert.True(SnapshotLabels.Layers.Length + v.Length + 1 + layers[listed.Length].Digest.Length + 1 > 4096);
    }

    [Fact]
    public void ExtractKeysAreContainerdsFormatAndUnique()
    {
        var keys = Enumerable.Range(0, 50).Select(_ => RpullLabels.ExtractKey("sha256:abc")).ToList();
        foreach (var k in keys) Assert.Matches(new Regex(@"^extract-\d+-[A-Za-z0-9_-]{4} sha256:abc$"), k);
        Assert.Equal(keys.Count, keys.Distinct().Count());
    }

    [Fact]
    public void ManifestGcLabelsNameConfigAndLayersAsContainerdDoes()
    {
        var l = RpullLabels.ManifestGcLabels(new Descriptor { Digest = D('c') }, [new Descriptor { Digest = D('1') }, new Descriptor { Digest = D('2') }]);
        Assert.Equal(3, l.Count);
        Assert.Equal(D('c'), l["containerd.io/gc.ref.content.config"]);
        Assert.Equal(D('1'), l["containerd.io/gc.ref.content.l.0"]);
        Assert.Equal(D('2'), l["containerd.io/gc.ref.content.l.1"]);
    }

    [Fact]
    public void DiffIdsComeFromTheConfigAndBadConfigsAreRefused()
    {
        var cfg = Encoding.UTF8.GetBytes("""{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:1","sha256:2"]}}""");
        Assert.Equal(["sha256:1", "sha256:2"], ImagePuller.DiffIds(cfg, "sha256:cfg"));
        var e = Assert.Throws<InvalidDataException>(() => ImagePuller.DiffIds("""{"os":"linux"}"""u8, "sha256:cfg"));
        Assert.Contains("sha256:cfg has no rootfs.diff_ids", e.Message);
        Assert.Throws<InvalidDataException>(() => ImagePuller.DiffIds("not json"u8, "sha256:cfg"));
    }

    [Fact]
    public void IndexMediaTypeFallsBackToTheDocumentsOwnField()
    {
        Assert.Equal(MediaTypes.DockerManifestList, ImagePuller.IndexMediaType(MediaTypes.DockerManifestList, "{}"u8));
        Assert.Equal(MediaTypes.DockerManifestList,
            ImagePuller.IndexMediaType("application/json", Encoding.UTF8.GetBytes($$"""{"mediaType":"{{MediaTypes.DockerManifestList}}","manifests":[]}""")));
        Assert.Equal(MediaTypes.OciIndex, ImagePuller.IndexMediaType("", """{"schemaVersion":2,"manifests":[]}"""u8));
    }
}
