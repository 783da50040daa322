using System.Globalization;
using Stargz.Converter;
using Stargz.Registry;

namespace Stargz.Cli;

/// <summary>
/// <c>stargz image convert [--zstd] [--chunk-size N] [--level L] [--prioritize PATH]... [--platform P | --all-platforms]
/// [--plain-http] [--user U:P] [--work-dir DIR] SRC DST</c>: <see cref="ImageConverter"/> from the command line.
/// Prints one line per layer and the pushed digest; exit code 0 on success, 1 on a failed conversion, 2 on bad usage,
/// 130 when <c>ct</c> was cancelled (Ctrl-C).
/// </summary>
internal static class ConvertCommand
{
    public const string Usage = """
        usage: stargz image convert [options] SRC DST

        Converts the image SRC in a registry to eStargz (or zstd:chunked) and pushes it as DST (OCI media types,
        layers annotated with their TOC digest). Layers that are already eStargz are copied as they are.

        options:
          --zstd, --zstdchunked      write zstd:chunked layers instead of eStargz (gzip)
          --estargz, --oci           accepted for ctr-remote compatibility (the defaults)
          --chunk-size N             largest chunk of a file in bytes (default 4194304)
          --level L                  compression level (gzip 0-9, default 9; zstd 1-22, default 3)
          --prioritize PATH          put PATH first in the layers that hold it (repeatable); a prefetch landmark follows
          --platform OS/ARCH[/VAR]   platform picked from an index (default: this machine)
          --all-platforms            convert every platform of an index and push an index
          --plain-http               talk plain HTTP to the SRC and DST registries
          --user USER:PASSWORD       credentials for the SRC and DST registries (default: ~/.docker/config.json)
          --work-dir DIR             where temporary layer files go (default: the system temp dir)
          --parallel N               layers converted at once (default 2)
        """;

    /// <summary>Parses <paramref name="args"/> (after <c>image convert</c>), converts, prints a summary.</summary>
    public static async Task<int> RunAsync(string[] args, TextWriter stdout, TextWriter stderr, CancellationToken ct)
    {
        ArgumentNullException.ThrowIfNull(args);
        ArgumentNullException.ThrowIfNull(stdout);
        ArgumentNullException.ThrowIfNull(stderr);
        Parsed p;
        try
        {
            p = Parse(args);
        }
        catch (UsageException e)
        {
            await stderr.WriteLineAsync($"stargz image convert: {e.Message}").ConfigureAwait(false);
            await stderr.WriteLineAsync(Usage).ConfigureAwait(false);
            return 2;
        }
        if (p.Help)
        {
            await stdout.WriteLineAsync(Usage).ConfigureAwait(false);
            return 0;
        }

        var hosts = new RegistryHostsConfig();
        if (p.PlainHttp)
            foreach (var h in new[] { p.Source.Host, p.Target.Host }.Distinct(StringComparer.OrdinalIgnoreCase))
                hosts.Set(h, new HostConfig { Origin = new EndpointConfig { Host = h, PlainHttp = true } });
        ICredentialProvider creds = new DockerConfigCredentialProvider();
        if (p.User is { } user)
        {
            var c = user.IndexOf(':');
            var stat = new StaticCredentialProvider();
            foreach (var h in new[] { p.Source.Host, p.Target.Host }.Distinct(StringComparer.OrdinalIgnoreCase))
                stat.Add(h, user[..c], user[(c + 1)..]);
            creds = stat;
        }
        using var client = new RegistryClient(hosts, creds);
        var converter = new ImageConverter(client);
        // On a terminal, a bar per layer; otherwise one line per distinct layer as soon as it is done.
        var bars = LayerProgressView.UseBars(stdout);
        try
        {
            var started = DateTime.UtcNow;
            var result = bars
                ? await LayerProgressView.RunAsync(update => converter.ConvertAsync(p.Source, p.Target,
                    p.Options with { LayerProgress = new InlineProgress<LayerConvertProgress>(l => update(l.Digest, LayerProgressView.Describe(l))) }, ct))
                    .ConfigureAwait(false)
                : await converter.ConvertAsync(p.Source, p.Target, p.Options with { Progress = new LineProgress(stdout) }, ct).ConfigureAwait(false);
            foreach (var m in result.Manifests)
                if (m.Platform is not null)
                    await stdout.WriteLineAsync($"manifest {m.Digest} [{m.Platform}] from {m.SourceDigest}").ConfigureAwait(false);
            await stdout.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"{result.Target}: {result.Digest} ({result.MediaType}, {(DateTime.UtcNow - started).TotalSeconds:0.0} s)")).ConfigureAwait(false);
            return 0;
        }
        catch (ImageConvertException e)
        {
            await stderr.WriteLineAsync($"stargz image convert: {e.Message}").ConfigureAwait(false);
            return 1;
        }
        catch (RegistryException e)
        {
            await stderr.WriteLineAsync($"stargz image convert: {e.Message}").ConfigureAwait(false);
            return 1;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            await stderr.WriteLineAsync($"stargz image convert: {e.Message}").ConfigureAwait(false);
            return 1;
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            await stderr.WriteLineAsync("stargz image convert: cancelled").ConfigureAwait(false);
            return 130;
        }
    }

    internal sealed class LineProgress(TextWriter w) : IProgress<ConvertedLayer>
    {
        private readonly Lock _lock = new();

        public void Report(ConvertedLayer l)
        {
            var what = l.Action switch
            {
                LayerAction.Converted => "converted",
                LayerAction.CopiedAsIs => "copied (already eStargz)",
                _ => "kept (foreign)",
            };
            lock (_lock) w.WriteLine($"layer {l.Source.Digest} -> {l.Target.Digest} {what} toc={l.TocDigest ?? "-"} size={l.Target.Size}");
        }
    }

    private sealed record Parsed(ImageReference Source, ImageReference Target, ConvertOptions Options, bool PlainHttp, string? User, bool Help);

    private static readonly ArgParser Options = new ArgParser()
        .Switch("--help", "-h").Switch("--zstd", "--zstdchunked").Switch("--estargz", "--oci")
        .Value("--chunk-size", "--estargz-chunk-size").Value("--level", "--estargz-compression-level").Value("--prioritize")
        .Value("--platform").Switch("--all-platforms").Switch("--plain-http").Value("--user").Value("--work-dir").Value("--parallel");

    private static Parsed Parse(string[] args)
    {
        var f = Options.Parse(args);
        bool help = f.Has("--help"), zstd = f.Has("--zstd"), all = f.Has("--all-platforms");
        int? chunk = f.Int("--chunk-size", min: 1), level = f.Int("--level", min: 0);
        var parallel = f.Int("--parallel", min: 1) ?? 2;
        Platform? platform = null;
        if (f.Last("--platform") is { } p)
        {
            try { platform = Platform.Parse(p); }
            catch (FormatException e) { throw new UsageException(e.Message); }
        }
        var user = f.Last("--user");
        if (user is not null && !user.Contains(':')) throw new UsageException("--user wants USER:PASSWORD");
        var positional = f.Positional;
        if (help) return new Parsed(ImageReference.Parse("x"), ImageReference.Parse("x"), new ConvertOptions(), false, null, true);
        if (positional.Count != 2) throw new UsageException($"want SRC and DST, got {positional.Count} argument(s)");
        if (all && platform is not null) throw new UsageException("--platform and --all-platforms exclude each other");
        if (level is { } lv && (zstd ? lv is < 1 or > 22 : lv > 9))
            throw new UsageException(zstd ? "zstd level must be 1-22" : "gzip level must be 0-9");
        ImageReference src, dst;
        try
        {
            src = ImageReference.Parse(positional[0]);
            dst = ImageReference.Parse(positional[1]);
        }
        catch (InvalidReferenceException e) { throw new UsageException(e.Message); }
        var options = new ConvertOptions
        {
            Format = zstd ? LayerFormat.ZstdChunked : LayerFormat.Estargz,
            ChunkSize = chunk,
            CompressionLevel = level,
            Prioritized = f.All("--prioritize"),
            Platform = platform,
            AllPlatforms = all,
            WorkDirectory = f.Last("--work-dir"),
            MaxParallelLayers = parallel,
        };
        return new Parsed(src, dst, options, f.Has("--plain-http"), user, false);
    }
}
