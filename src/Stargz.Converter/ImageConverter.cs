using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Security.Cryptography;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Converter;

/// <summary>
/// Converts an image in a registry to eStargz (or zstd:chunked) and pushes it under another reference, as
/// <c>ctr-remote image convert --oci --estargz</c> does through containerd, but registry to registry:
/// each layer blob is streamed from the registry into the builder (decompressed on the way), the new blob is
/// spooled to a temp file and pushed, the config's diff_ids are rewritten (the reordered tar is a new diffID),
/// and an OCI manifest (or index, for all platforms) is pushed and tagged. Layers that already carry a TOC digest
/// annotation are copied unchanged. Memory stays bounded: layers go through temp files under the work directory.
/// </summary>
public sealed class ImageConverter
{
    public const string OciLayerTar = "application/vnd.oci.image.layer.v1.tar";
    public const string OciLayerGzip = "application/vnd.oci.image.layer.v1.tar+gzip";
    public const string OciLayerZstd = "application/vnd.oci.image.layer.v1.tar+zstd";
    public const string OciForeignGzip = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    public const string OciForeignTar = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    public const string OciForeignZstd = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    public const string DockerLayerGzip = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    public const string DockerLayerTar = "application/vnd.docker.image.rootfs.diff.tar";
    public const string DockerForeignGzip = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

    // Source-generated (native AOT): manifests and configs are written as JsonObject trees, descriptors read typed.
    private static readonly ConverterJsonContext Json = new(new JsonSerializerOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping });

    private readonly RegistryClient _client;
    private readonly ILogger _log;

    public ImageConverter(RegistryClient client, ILogger? logger = null)
    {
        _client = client ?? throw new ArgumentNullException(nameof(client));
        _log = logger ?? NullLogger.Instance;
    }

    /// <summary>Converts <paramref name="source"/> and pushes the result as <paramref name="target"/> (its tag, or by digest).</summary>
    public async Task<ConvertResult> ConvertAsync(ImageReference source, ImageReference target, ConvertOptions? options = null,
        CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(target);
        options ??= new ConvertOptions();
        if (options.MaxParallelLayers < 1) throw new ArgumentOutOfRangeException(nameof(options), "MaxParallelLayers must be at least 1");
        if (options.ChunkSize is <= 0) throw new ArgumentOutOfRangeException(nameof(options), "chunk size must be positive");
        var root = options.WorkDirectory ?? Path.GetTempPath();
        Directory.CreateDirectory(root);
        var work = Path.Combine(root, $"stargz-convert-{Guid.NewGuid():N}");
        Directory.CreateDirectory(work);
        try
        {
            var run = new Run(this, source, target, options, work);
            return await run.ExecuteAsync(ct).ConfigureAwait(false);
        }
        finally
        {
            try { Directory.Delete(work, recursive: true); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                _log.LogWarning("could not remove work directory {Dir}: {Error}", work, e.Message);
            }
        }
    }

    /// <summary>Layer media types the converter rebuilds (tar, tar+gzip, tar+zstd; Docker and OCI).</summary>
    public static bool IsConvertibleLayer(string mediaType) => mediaType is OciLayerTar or OciLayerGzip or OciLayerZstd or DockerLayerGzip or DockerLayerTar
        // containerd accepts these legacy spellings too.
        or "application/vnd.docker.image.rootfs.diff.tar.zstd";

    private static bool IsForeignLayer(string mediaType) => mediaType is DockerForeignGzip or OciForeignGzip or OciForeignTar or OciForeignZstd;

    /// <summary>The OCI spelling of a layer media type (the reference's --oci).</summary>
    private static string ToOci(string mediaType) => mediaType switch
    {
        DockerLayerGzip => OciLayerGzip,
        DockerLayerTar => OciLayerTar,
        DockerForeignGzip => OciForeignGzip,
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => OciLayerZstd,
        _ => mediaType,
    };

    /// <summary>One ConvertAsync call: shared state for its manifests and layers.</summary>
    private sealed class Run(ImageConverter owner, ImageReference source, ImageReference target, ConvertOptions o, string work)
    {
        private readonly ConcurrentDictionary<string, Lazy<Task<LayerOutcome>>> _layers = new(StringComparer.Ordinal);
        private readonly SemaphoreSlim _gate = new(o.MaxParallelLayers, o.MaxParallelLayers);
        private readonly RegistryClient _client = owner._client;
        private readonly ILogger _log = owner._log;
        private readonly string _src = source.ToString();
        // Cancelled by the caller or by the first failing layer: the other layers stop instead of finishing for nothing.
        private CancellationTokenSource _abort = new();
        // "/bin/sh" and "./bin/sh" name the tar entry "bin/sh".
        private readonly IReadOnlyList<string> _prioritized = o.Prioritized.Select(NormalisePath).ToList();

        private sealed record LayerOutcome(Descriptor Target, string? DiffId, LayerAction Action, IReadOnlyList<string> Missed);

        public async Task<ConvertResult> ExecuteAsync(CancellationToken ct)
        {
            using var abort = CancellationTokenSource.CreateLinkedTokenSource(ct);
            _abort.Dispose();
            _abort = abort;
            var (bytes, mediaType, _) = await Wrap(() => _client.FetchManifestAsync(source, source.ManifestReference, ct), null).ConfigureAwait(false);
            var top = ParseObject(bytes.Span, $"manifest of {_src}");
            mediaType = DetectMediaType(mediaType, top);
            if (MediaTypes.IsIndex(mediaType))
            {
                var entries = top["manifests"] as JsonArray ?? throw Fail($"index {_src} has no manifests");
                if (!o.AllPlatforms)
                {
                    var want = o.Platform ?? Platform.Current;
                    foreach (var e in entries)
                    {
                        if (e is not JsonObject d) continue;
                        var mt = d["mediaType"]?.GetValue<string>() ?? "";
                        if (mt.Length != 0 && !MediaTypes.IsManifest(mt)) continue;
                        var p = PlatformOf(d);
                        if (p is not null && !want.Matches(p)) continue;
                        var digest = d["digest"]?.GetValue<string>() ?? throw Fail($"index {_src} has an entry without digest");
                        var m = await ConvertManifestAsync(digest, p, tagged: true, ct).ConfigureAwait(false);
                        return new ConvertResult(target, m.Digest, MediaTypes.OciManifest, m.Size, [m]);
                    }
                    throw Fail($"index {_src} has no image manifest for platform {want}");
                }
                return await ConvertIndexAsync(top, entries, ct).ConfigureAwait(false);
            }
            if (!MediaTypes.IsManifest(mediaType))
                throw Fail($"{_src} is a {mediaType}, not an image manifest or index");
            var single = await ConvertManifestAsync(source.Digest ?? RegistrySha(bytes.Span), null, tagged: true, ct, preFetched: (bytes, top)).ConfigureAwait(false);
            return new ConvertResult(target, single.Digest, MediaTypes.OciManifest, single.Size, [single]);
        }

        private async Task<ConvertResult> ConvertIndexAsync(JsonObject index, JsonArray entries, CancellationToken ct)
        {
            var tasks = new List<Task<ConvertedManifest>>();
            var kept = new List<JsonObject>();
            foreach (var e in entries)
            {
                if (e is not JsonObject d) continue;
                var mt = d["mediaType"]?.GetValue<string>() ?? "";
                var p = PlatformOf(d);
                if ((mt.Length != 0 && !MediaTypes.IsManifest(mt)) || p is { OS: "unknown" })
                {
                    // Nested indexes and attestation manifests (platform unknown/unknown) are not images to run.
                    _log.LogWarning("skipping {MediaType} {Digest} of {Source}: not an image manifest for a platform", mt, d["digest"], _src);
                    continue;
                }
                var digest = d["digest"]?.GetValue<string>() ?? throw Fail($"index {_src} has an entry without digest");
                kept.Add(d);
                tasks.Add(ConvertManifestAsync(digest, p, tagged: false, ct));
            }
            if (tasks.Count == 0) throw Fail($"index {_src} has no image manifests to convert");
            var done = await WhenAllAsync(tasks).ConfigureAwait(false);
            var list = new JsonArray();
            for (var i = 0; i < done.Length; i++)
            {
                var entry = new JsonObject
                {
                    ["mediaType"] = MediaTypes.OciManifest,
                    ["digest"] = done[i].Digest,
                    ["size"] = done[i].Size,
                };
                if (kept[i]["platform"] is JsonNode plat) entry["platform"] = plat.DeepClone();
                if (kept[i]["annotations"] is JsonNode ann) entry["annotations"] = ann.DeepClone();
                list.Add((JsonNode)entry);
            }
            var outIndex = new JsonObject { ["schemaVersion"] = 2, ["mediaType"] = MediaTypes.OciIndex, ["manifests"] = list };
            if (index["annotations"] is JsonNode a) outIndex["annotations"] = a.DeepClone();
            var bytes = JsonSerializer.SerializeToUtf8Bytes(outIndex, Json.JsonObject);
            var digest2 = await Wrap(() => _client.PushManifestAsync(target, bytes, MediaTypes.OciIndex, target.Tag ?? target.Digest, ct), null).ConfigureAwait(false);
            _log.LogInformation("pushed index {Target} ({Digest}) with {Count} manifests", target, digest2, done.Length);
            return new ConvertResult(target, digest2, MediaTypes.OciIndex, bytes.Length, done);
        }

        private async Task<ConvertedManifest> ConvertManifestAsync(string digest, Platform? platform, bool tagged, CancellationToken ct,
            (ReadOnlyMemory<byte> Bytes, JsonObject Json)? preFetched = null)
        {
            JsonObject m;
            if (preFetched is { } pf) m = pf.Json;
            else
            {
                var (bytes, mt, _) = await Wrap(() => _client.FetchManifestAsync(source, digest, ct), null).ConfigureAwait(false);
                m = ParseObject(bytes.Span, $"manifest {digest} of {_src}");
                mt = DetectMediaType(mt, m);
                if (!MediaTypes.IsManifest(mt)) throw Fail($"{_src}@{digest} is a {mt}, not an image manifest");
            }
            var configDesc = Desc(m["config"] as JsonObject, $"config of manifest {digest}");
            var layerNodes = m["layers"] as JsonArray ?? throw Fail($"manifest {digest} of {_src} has no layers");
            var layers = layerNodes.Select((n, i) => Desc(n as JsonObject, $"layer {i} of manifest {digest}")).ToList();

            var configBytes = await Wrap(() => _client.FetchBlobBytesAsync(source, configDesc.Digest, ct: ct), null).ConfigureAwait(false);
            var config = ParseObject(configBytes, $"config {configDesc.Digest} of {_src}");
            var rootfs = config["rootfs"] as JsonObject ?? throw Fail($"config {configDesc.Digest} of {_src} has no rootfs");
            var diffIds = (rootfs["diff_ids"] as JsonArray)?.Select(n => n?.GetValue<string>() ?? "").ToList()
                ?? throw Fail($"config {configDesc.Digest} of {_src} has no rootfs.diff_ids");
            if (diffIds.Count != layers.Count)
                throw Fail($"config {configDesc.Digest} of {_src} lists {diffIds.Count} diff_ids for {layers.Count} layers");

            var outcomes = await WhenAllAsync(layers.Select((l, i) => LayerAsync(l, diffIds[i])).ToList()).ConfigureAwait(false);

            if (o.Prioritized.Count > 0 && outcomes.Any(x => x.Action == LayerAction.Converted))
            {
                foreach (var p in o.Prioritized)
                    if (outcomes.Where(x => x.Action == LayerAction.Converted).All(x => x.Missed.Contains(NormalisePath(p))))
                        throw Fail($"prioritized file \"{p}\" is in none of the converted layers of {_src}");
            }

            var converted = new List<ConvertedLayer>(layers.Count);
            var newDiffIds = new JsonArray();
            for (var i = 0; i < layers.Count; i++)
            {
                var diff = outcomes[i].DiffId ?? diffIds[i];
                newDiffIds.Add((JsonNode)JsonValue.Create(diff));
                converted.Add(new ConvertedLayer(layers[i], outcomes[i].Target, diff, outcomes[i].Action));
            }
            rootfs["diff_ids"] = newDiffIds;
            var newConfig = JsonSerializer.SerializeToUtf8Bytes(config, Json.JsonObject);
            var cfgPush = await Wrap(() => _client.PushBlobAsync(target, newConfig, o.Push, ct), null).ConfigureAwait(false);
            var cfgOut = new Descriptor { MediaType = MediaTypes.OciConfig, Digest = cfgPush.Digest, Size = newConfig.Length };

            var outLayers = new JsonArray();
            foreach (var c in converted) outLayers.Add((JsonNode)DescJson(c.Target));
            var manifest = new JsonObject
            {
                ["schemaVersion"] = 2,
                ["mediaType"] = MediaTypes.OciManifest,
                ["config"] = DescJson(cfgOut),
                ["layers"] = outLayers,
            };
            if (m["annotations"] is JsonNode ann) manifest["annotations"] = ann.DeepClone();
            var mbytes = JsonSerializer.SerializeToUtf8Bytes(manifest, Json.JsonObject);
            var mdigest = RegistrySha(mbytes);
            var pushedAs = tagged ? target.Tag ?? target.Digest ?? mdigest : mdigest;
            await Wrap(() => _client.PushManifestAsync(target, mbytes, MediaTypes.OciManifest, pushedAs, ct), null).ConfigureAwait(false);
            _log.LogInformation("pushed manifest {Target} ({Digest}) from {Source}@{SourceDigest}", target, mdigest, _src, digest);
            return new ConvertedManifest(digest, mdigest, mbytes.Length, platform, cfgOut, converted);
        }

        private Task<LayerOutcome> LayerAsync(Descriptor layer, string diffId)
        {
            // Two manifests (platforms) or two positions may share a layer: convert it once.
            var key = layer.Digest;
            var lazy = _layers.GetOrAdd(key, _ => new Lazy<Task<LayerOutcome>>(() => GuardedAsync(layer, diffId)));
            return lazy.Value;
        }

        private async Task<LayerOutcome> GuardedAsync(Descriptor layer, string diffId)
        {
            try
            {
                var outcome = await ConvertLayerAsync(layer, diffId, _abort.Token).ConfigureAwait(false);
                o.Progress?.Report(new ConvertedLayer(layer, outcome.Target, outcome.DiffId ?? diffId, outcome.Action));
                Stage(layer, LayerConvertStage.Done, layer.Size);
                return outcome;
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                await _abort.CancelAsync().ConfigureAwait(false);
                throw;
            }
        }

        /// <summary>All results; on failure the first real error, not the cancellations it caused in the others.</summary>
        private static async Task<T[]> WhenAllAsync<T>(IReadOnlyList<Task<T>> tasks)
        {
            try
            {
                return await Task.WhenAll(tasks).ConfigureAwait(false);
            }
            catch (Exception)
            {
                var real = tasks.Where(t => t.IsFaulted).SelectMany(t => t.Exception!.InnerExceptions)
                    .FirstOrDefault(e => e is not OperationCanceledException);
                if (real is not null) System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(real);
                throw;
            }
        }

        private void Stage(Descriptor layer, LayerConvertStage stage, long bytes = 0) =>
            o.LayerProgress?.Report(new LayerConvertProgress(layer.Digest, layer.Size, stage, bytes));

        private Action<long>? BytesOf(Descriptor layer, LayerConvertStage stage) =>
            o.LayerProgress == null ? null : b => Stage(layer, stage, b);

        private async Task<LayerOutcome> ConvertLayerAsync(Descriptor layer, string diffId, CancellationToken ct)
        {
            await Task.Yield();
            Stage(layer, LayerConvertStage.Queued);
            if (IsForeignLayer(layer.MediaType))
                return new LayerOutcome(With(layer, ToOci(layer.MediaType), null), null, LayerAction.KeptForeign, []);
            if (layer.Annotation(LayerLabels.TocDigestAnnotation) is not null)
            {
                await _gate.WaitAsync(ct).ConfigureAwait(false);
                try
                {
                    Stage(layer, LayerConvertStage.Copying);
                    await CopyBlobAsync(layer, ct).ConfigureAwait(false);
                }
                catch (Exception e) when (e is not OperationCanceledException && e is not ImageConvertException)
                {
                    throw new ImageConvertException($"layer {layer.Digest} of {_src}: copying it failed: {e.Message}", _src, layer.Digest, e);
                }
                finally { _gate.Release(); }
                _log.LogInformation("layer {Digest} of {Source} is already eStargz: copied as is", layer.Digest, _src);
                return new LayerOutcome(With(layer, ToOci(layer.MediaType), null), diffId, LayerAction.CopiedAsIs, []);
            }
            if (!IsConvertibleLayer(layer.MediaType))
                throw new ImageConvertException($"layer {layer.Digest} of {_src} has media type \"{layer.MediaType}\", which is not a tar, tar+gzip or tar+zstd layer",
                    _src, layer.Digest);

            await _gate.WaitAsync(ct).ConfigureAwait(false);
            var outPath = Path.Combine(work, $"{layer.Digest.Replace(':', '-')}.{Guid.NewGuid():N}.out");
            try
            {
                var started = DateTime.UtcNow;
                Stage(layer, LayerConvertStage.Converting);
                var (result, blobDigest, size) = await BuildAsync(layer, outPath, ct).ConfigureAwait(false);
                Stage(layer, LayerConvertStage.Pushing, layer.Size);
                await using (var fs = new FileStream(outPath, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16, FileOptions.Asynchronous))
                    await _client.PushBlobAsync(target, fs, blobDigest, size, o.Push, ct).ConfigureAwait(false);
                var ann = new Dictionary<string, string>(StringComparer.Ordinal);
                if (layer.Annotations is not null) foreach (var kv in layer.Annotations) ann[kv.Key] = kv.Value;
                ann[LayerLabels.TocDigestAnnotation] = result.TocDigest;
                ann[LayerLabels.UncompressedSizeAnnotation] = result.UncompressedSize.ToString(System.Globalization.CultureInfo.InvariantCulture);
                if (result.ZstdManifestChecksum is { } zc) ann[LayerLabels.ZstdManifestChecksumAnnotation] = zc;
                if (result.ZstdManifestPosition is { } zp) ann[LayerLabels.ZstdManifestPositionAnnotation] = zp;
                var desc = new Descriptor
                {
                    MediaType = o.Format == LayerFormat.ZstdChunked ? OciLayerZstd : OciLayerGzip,
                    Digest = blobDigest,
                    Size = size,
                    Annotations = ann,
                };
                _log.LogInformation("layer {Source} -> {Target} ({Size} bytes, TOC {Toc}) in {Seconds:0.0} s", layer.Digest, blobDigest, size,
                    result.TocDigest, (DateTime.UtcNow - started).TotalSeconds);
                return new LayerOutcome(desc, result.DiffId, LayerAction.Converted, result.MissedPrioritized);
            }
            catch (Exception e) when (e is not OperationCanceledException && e is not ImageConvertException)
            {
                throw new ImageConvertException($"layer {layer.Digest} of {_src}: {e.Message}", _src, layer.Digest, e);
            }
            finally
            {
                _gate.Release();
                TryDelete(outPath);
            }
        }

        /// <summary>
        /// Streams the layer from the registry through a pipe into the builder (which decompresses it and spools the tar
        /// under the work dir) and writes the new blob to <paramref name="outPath"/>, hashing it on the way. The builder
        /// only sees the end of its input once the download's digest has been verified.
        /// </summary>
        private async Task<(BuildResult Result, string Digest, long Size)> BuildAsync(Descriptor layer, string outPath, CancellationToken ct)
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
            var pipe = new Pipe(new PipeOptions(pauseWriterThreshold: 4 << 20, resumeWriterThreshold: 2 << 20));
            var download = Task.Run(async () =>
            {
                try
                {
                    await using var w = pipe.Writer.AsStream(leaveOpen: true);
                    var bytes = BytesOf(layer, LayerConvertStage.Converting);
                    await _client.DownloadBlobAsync(source, layer.Digest, bytes == null ? w : new ProgressWriteStream(w, bytes), cts.Token).ConfigureAwait(false);
                    await pipe.Writer.CompleteAsync().ConfigureAwait(false);
                }
                catch (Exception e)
                {
                    await pipe.Writer.CompleteAsync(e).ConfigureAwait(false);
                    throw;
                }
            }, CancellationToken.None);

            var bo = new BuildOptions
            {
                ChunkSize = o.ChunkSize ?? new BuildOptions().ChunkSize,
                CompressionLevel = o.CompressionLevel,
                Prioritized = _prioritized,
                AllowPrioritizedNotFound = true,
                Compression = o.Format == LayerFormat.ZstdChunked ? BlobCompression.Zstd : BlobCompression.Gzip,
                Parallelism = o.BuilderParallelism ?? Environment.ProcessorCount,
                TempDirectory = work,
            };
            BuildResult result;
            string digest;
            long size;
            try
            {
                await using var compressed = pipe.Reader.AsStream(leaveOpen: true);
                await using var input = await OpenTarAsync(compressed, cts.Token).ConfigureAwait(false);
                await using var file = new FileStream(outPath, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16, FileOptions.Asynchronous);
                await using var hashing = new HashingWriteStream(file);
                result = await EstargzBuilder.BuildAsync(input, hashing, bo, cts.Token).ConfigureAwait(false);
                await hashing.FlushAsync(cts.Token).ConfigureAwait(false);
                (digest, size) = hashing.Finish();
                // The builder may stop before the end (trailing bytes): drain so the download completes and is verified.
                var sink = new byte[1 << 16];
                while (await compressed.ReadAsync(sink, cts.Token).ConfigureAwait(false) > 0) { }
            }
            catch (Exception)
            {
                // Stop the download; when it failed for a reason of its own (digest mismatch, registry error), that explains
                // the failed build best, otherwise the build's error stands.
                await cts.CancelAsync().ConfigureAwait(false);
                await pipe.Reader.CompleteAsync().ConfigureAwait(false);
                Exception? downloadError = null;
                try { await download.ConfigureAwait(false); }
                catch (Exception e) { downloadError = e; }
                if (downloadError is not null and not OperationCanceledException)
                    System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(downloadError);
                throw;
            }
            await download.ConfigureAwait(false);
            await pipe.Reader.CompleteAsync().ConfigureAwait(false);
            return (result, digest, size);
        }

        private async Task CopyBlobAsync(Descriptor layer, CancellationToken ct)
        {
            if (await _client.BlobExistsAsync(target, layer.Digest, ct).ConfigureAwait(false)) return;
            if (string.Equals(source.Host, target.Host, StringComparison.OrdinalIgnoreCase) && source.Repository != target.Repository
                && await _client.MountBlobAsync(target, layer.Digest, source.Repository, ct).ConfigureAwait(false))
                return;
            var tmp = Path.Combine(work, $"{layer.Digest.Replace(':', '-')}.{Guid.NewGuid():N}.copy");
            try
            {
                await using var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, 1 << 16, FileOptions.Asynchronous);
                var bytes = BytesOf(layer, LayerConvertStage.Copying);
                var size = await _client.DownloadBlobAsync(source, layer.Digest, bytes == null ? fs : new ProgressWriteStream(fs, bytes), ct).ConfigureAwait(false);
                fs.Position = 0;
                await _client.PushBlobAsync(target, fs, layer.Digest, size, o.Push, ct).ConfigureAwait(false);
            }
            finally { TryDelete(tmp); }
        }

        private void TryDelete(string path)
        {
            try { File.Delete(path); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { _log.LogDebug("could not delete {Path}: {Error}", path, e.Message); }
        }

        private async Task<T> Wrap<T>(Func<Task<T>> op, string? layer)
        {
            try { return await op().ConfigureAwait(false); }
            catch (RegistryException e)
            {
                throw new ImageConvertException($"{_src} -> {target}: {e.Message}", _src, layer, e);
            }
        }

        private ImageConvertException Fail(string message) => new(message, _src);

        private JsonObject ParseObject(ReadOnlySpan<byte> json, string what)
        {
            try
            {
                return JsonNode.Parse(json) as JsonObject ?? throw Fail($"{what} is not a JSON object");
            }
            catch (JsonException e)
            {
                throw new ImageConvertException($"{what} is not valid JSON: {e.Message}", _src, null, e);
            }
        }

        private Descriptor Desc(JsonObject? d, string what)
        {
            if (d is null) throw Fail($"{what} of {_src} is missing");
            try
            {
                return d.Deserialize(Json.Descriptor) is { Digest.Length: > 0 } desc ? desc : throw Fail($"{what} of {_src} has no digest");
            }
            catch (JsonException e)
            {
                throw new ImageConvertException($"{what} of {_src} is not a valid descriptor: {e.Message}", _src, null, e);
            }
        }
    }

    private static string NormalisePath(string p)
    {
        var s = p.Trim();
        while (s.StartsWith("./", StringComparison.Ordinal)) s = s[2..];
        return s.TrimStart('/');
    }

    /// <summary>
    /// The layer's uncompressed tar (gzip, zstd or plain, told by magic), followed by two zero blocks: some tools
    /// (umoci's whiteout-only layers) end a tar without its end-of-archive marker, which Go's archive/tar and so
    /// containerd accept; a second marker after a complete tar is never read.
    /// </summary>
    private static async Task<Stream> OpenTarAsync(Stream compressed, CancellationToken ct)
    {
        var head = new byte[4];
        var n = 0;
        while (n < head.Length)
        {
            var r = await compressed.ReadAsync(head.AsMemory(n), ct).ConfigureAwait(false);
            if (r == 0) break;
            n += r;
        }
        Stream all = new ConcatReadStream([new MemoryStream(head, 0, n, writable: false), compressed]);
        if (n >= 3 && head[0] == 0x1f && head[1] == 0x8b && head[2] == 8)
            all = new System.IO.Compression.GZipStream(all, System.IO.Compression.CompressionMode.Decompress);
        else if (n == 4 && head[0] == 0x28 && head[1] == 0xb5 && head[2] == 0x2f && head[3] == 0xfd)
            all = new ZstdSharp.DecompressionStream(all);
        return new ConcatReadStream([all, new MemoryStream(new byte[1024], writable: false)]);
    }

    private static Platform? PlatformOf(JsonObject entry)
    {
        if (entry["platform"] is not JsonObject p) return null;
        var os = p["os"]?.GetValue<string>();
        var arch = p["architecture"]?.GetValue<string>();
        if (string.IsNullOrEmpty(os) || string.IsNullOrEmpty(arch)) return null;
        var v = p["variant"]?.GetValue<string>();
        return new Platform(os, arch, string.IsNullOrEmpty(v) ? null : v);
    }

    private static string DetectMediaType(string header, JsonObject m)
    {
        if (MediaTypes.IsIndex(header) || MediaTypes.IsManifest(header)) return header;
        if (m["mediaType"]?.GetValue<string>() is { Length: > 0 } mt) return mt;
        return m["manifests"] is not null ? MediaTypes.OciIndex : MediaTypes.OciManifest;
    }

    private static Descriptor With(Descriptor d, string mediaType, IReadOnlyDictionary<string, string>? annotations) => new()
    {
        MediaType = mediaType,
        Digest = d.Digest,
        Size = d.Size,
        Urls = d.Urls,
        Annotations = annotations ?? d.Annotations,
    };

    private static JsonObject DescJson(Descriptor d)
    {
        var o = new JsonObject { ["mediaType"] = d.MediaType, ["digest"] = d.Digest, ["size"] = d.Size };
        if (d.Urls is { Count: > 0 } urls) o["urls"] = new JsonArray(urls.Select(u => (JsonNode?)JsonValue.Create(u)).ToArray());
        if (d.Annotations is { Count: > 0 } ann)
        {
            var a = new JsonObject();
            foreach (var kv in ann.OrderBy(k => k.Key, StringComparer.Ordinal)) a[kv.Key] = kv.Value;
            o["annotations"] = a;
        }
        return o;
    }

    internal static string RegistrySha(ReadOnlySpan<byte> data) => Digest.Sha256Of(data).ToString();
}

/// <summary>Write-through stream that hashes (sha256) and counts what passes.</summary>
internal sealed class HashingWriteStream(Stream inner) : Stream
{
    private readonly IncrementalHash _hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
    private long _written;

    public (string Digest, long Size) Finish() => (Digest.FromSha256(_hash).ToString(), _written);

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        _hash.AppendData(buffer.Span);
        _written += buffer.Length;
        await inner.WriteAsync(buffer, cancellationToken).ConfigureAwait(false);
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override void Write(byte[] buffer, int offset, int count)
    {
        _hash.AppendData(buffer, offset, count);
        _written += count;
        inner.Write(buffer, offset, count);
    }

    public override void Flush() => inner.Flush();
    public override Task FlushAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);
    public override bool CanRead => false;
    public override bool CanSeek => false;
    public override bool CanWrite => true;
    public override long Length => _written;
    public override long Position { get => _written; set => throw new NotSupportedException(); }
    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing) _hash.Dispose();
        base.Dispose(disposing);
    }
}

/// <summary>Reads its streams one after the other (and disposes them).</summary>
internal sealed class ConcatReadStream(Stream[] parts) : Stream
{
    private int _i;
    private long _pos;

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (buffer.Length == 0) return 0;
        while (_i < parts.Length)
        {
            var n = await parts[_i].ReadAsync(buffer, cancellationToken).ConfigureAwait(false);
            if (n > 0) { _pos += n; return n; }
            _i++;
        }
        return 0;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
        => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(byte[] buffer, int offset, int count)
    {
        if (count == 0) return 0;
        while (_i < parts.Length)
        {
            var n = parts[_i].Read(buffer, offset, count);
            if (n > 0) { _pos += n; return n; }
            _i++;
        }
        return 0;
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => _pos; set => throw new NotSupportedException(); }
    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing) foreach (var p in parts) p.Dispose();
        base.Dispose(disposing);
    }

    public override async ValueTask DisposeAsync()
    {
        foreach (var p in parts) await p.DisposeAsync().ConfigureAwait(false);
        await base.DisposeAsync().ConfigureAwait(false);
    }
}

[JsonSerializable(typeof(JsonObject))]
[JsonSerializable(typeof(Descriptor))]
internal sealed partial class ConverterJsonContext : JsonSerializerContext;
