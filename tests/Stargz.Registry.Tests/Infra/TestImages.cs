using System.Text;
using System.Text.Json;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests.Infra;

/// <summary>An image pushed for a test: a multi-platform index over two single-platform manifests.</summary>
public sealed record PushedImage(string Repository, string Tag, string IndexDigest, string AmdManifest, string ArmManifest,
    string ConfigDigest, byte[][] Layers, string[] LayerDigests)
{
    public const string TocAnnotation = "containerd.io/snapshot/stargz/toc.digest";

    /// <summary>Pushes random layers, configs, two manifests and an index through the registry HTTP API.</summary>
    public static async Task<PushedImage> PushAsync(string baseUrl, string repository, string tag = "v1", int seed = 1,
        int[]? layerSizes = null, HttpClient? http = null)
    {
        var own = http is null;
        http ??= new HttpClient();
        try
        {
            var rnd = new Random(seed);
            layerSizes ??= [1_500_000, 300_000];
            var layers = new byte[layerSizes.Length][];
            var digests = new string[layerSizes.Length];
            for (var i = 0; i < layers.Length; i++)
            {
                layers[i] = new byte[layerSizes[i]];
                rnd.NextBytes(layers[i]);
                digests[i] = await LocalRegistry.PushBlobAsync(http, baseUrl, repository, layers[i]);
            }
            async Task<(string digest, string config)> Manifest(string arch, string? variant)
            {
                var cfg = Encoding.UTF8.GetBytes(JsonSerializer.Serialize(new { architecture = arch, os = "linux", rootfs = new { type = "layers", diff_ids = digests } }));
                var cfgDigest = await LocalRegistry.PushBlobAsync(http, baseUrl, repository, cfg);
                var layerDescs = new List<object>();
                for (var i = 0; i < layers.Length; i++)
                    layerDescs.Add(new Dictionary<string, object>
                    {
                        ["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip", ["digest"] = digests[i], ["size"] = layers[i].Length,
                        ["annotations"] = new Dictionary<string, string> { [TocAnnotation] = $"sha256:{i:x64}" },
                    });
                var m = JsonSerializer.SerializeToUtf8Bytes(new Dictionary<string, object>
                {
                    ["schemaVersion"] = 2, ["mediaType"] = MediaTypes.OciManifest,
                    ["config"] = new { mediaType = MediaTypes.OciConfig, digest = cfgDigest, size = cfg.Length },
                    ["layers"] = layerDescs,
                    ["annotations"] = new Dictionary<string, string> { ["org.example.arch"] = arch },
                });
                var d = await LocalRegistry.PushManifestAsync(http, baseUrl, repository, $"{tag}-{arch}", m, MediaTypes.OciManifest);
                return (d, cfgDigest);
            }
            var (amd, amdCfg) = await Manifest("amd64", null);
            var (arm, _) = await Manifest("arm64", "v8");
            async Task<long> SizeOf(string d)
            {
                using var r = new HttpRequestMessage(HttpMethod.Head, $"{baseUrl}/v2/{repository}/manifests/{d}");
                r.Headers.Accept.ParseAdd(MediaTypes.OciManifest);
                using var resp = await http.SendAsync(r);
                return resp.Content.Headers.ContentLength ?? throw new InvalidOperationException("no size");
            }
            var index = JsonSerializer.SerializeToUtf8Bytes(new
            {
                schemaVersion = 2, mediaType = MediaTypes.OciIndex,
                manifests = new object[]
                {
                    new { mediaType = MediaTypes.OciManifest, digest = arm, size = await SizeOf(arm), platform = new { os = "linux", architecture = "arm64", variant = "v8" } },
                    new { mediaType = MediaTypes.OciManifest, digest = amd, size = await SizeOf(amd), platform = new { os = "linux", architecture = "amd64" } },
                },
            });
            var idx = await LocalRegistry.PushManifestAsync(http, baseUrl, repository, tag, index, MediaTypes.OciIndex);
            return new PushedImage(repository, tag, idx, amd, arm, amdCfg, layers, digests);
        }
        finally
        {
            if (own) http.Dispose();
        }
    }
}
