using System.Globalization;
using Microsoft.Extensions.Logging;
using Stargz.Containerd;
using Stargz.Converter;
using Stargz.Registry;

namespace Stargz.Cli;

/// <summary>
/// <c>stargz image optimize [options] SRC DST [-- CMD [ARG...]]</c>: pulls SRC into containerd, runs its workload
/// once while recording the files it opens (<see cref="WorkloadRecorder"/>), then converts SRC to DST with those files
/// first in each layer and <c>.prefetch.landmark</c> after them (<see cref="ImageConverter"/>; a layer none of whose
/// files was opened gets <c>.no.prefetch.landmark</c>). The equivalent of the reference's <c>ctr-remote image optimize</c>.
/// </summary>
internal static class OptimizeCommand
{
    public const string Usage = """
          stargz image optimize [--plain-http] [--address SOCK] [--namespace NS] [--snapshotter overlayfs] [--zstd]
                                [--period S] [--runc-root DIR] [--work-dir DIR] [--log-level warn] SRC DST [-- CMD [ARG...]]
              runs CMD (default: the image's Entrypoint and Cmd) once in a container of SRC through containerd and
              runc, records the files it opens (fanotify), stops at its exit or after --period seconds (default 10),
              then converts SRC to DST with those files first in their layers (eStargz, or zstd:chunked with --zstd)

        """;

    private sealed class HelpRequested : Exception;

    internal sealed record Args(ImageReference Source, ImageReference Target, IReadOnlyList<string> Command, string Address, string Namespace,
        string Snapshotter, bool PlainHttp, bool Zstd, TimeSpan Period, string? RuncRoot, string? WorkDir, LogLevel LogLevel);

    private static readonly ArgParser Options = new ArgParser()
        .Switch("--help", "-h").Switch("--plain-http").Switch("--zstd", "--zstdchunked").Switch("--estargz", "--oci")
        .Value("--address", "-a").Value("--namespace", "-n").Value("--snapshotter").Value("--period").Value("--runc-root")
        .Value("--work-dir").Value("--log-level");

    /// <summary>Everything after the first <c>--</c> is the workload's command, taken as is.</summary>
    internal static Args Parse(string[] argv)
    {
        var dash = Array.IndexOf(argv, "--");
        var (own, command) = dash < 0 ? (argv, Array.Empty<string>()) : (argv[..dash], argv[(dash + 1)..]);
        var f = Options.Parse(own);
        if (f.Has("--help")) throw new HelpRequested();
        var pos = f.Positional;
        if (pos.Count != 2) throw new UsageException($"image optimize wants SRC and DST, got {pos.Count} argument(s)");
        if (dash >= 0 && command.Length == 0) throw new UsageException("nothing after --: give a command or leave out --");
        double period = 10;
        if (f.Last("--period") is { } ps && (!double.TryParse(ps, NumberStyles.Float, CultureInfo.InvariantCulture, out period) || period <= 0 || period > 86400))
            throw new UsageException($"--period wants seconds (more than 0, at most 86400), not \"{ps}\"");
        var level = (f.Last("--log-level") ?? "warn") switch
        {
            "debug" => LogLevel.Debug, "info" => LogLevel.Information, "warn" or "warning" => LogLevel.Warning, "error" => LogLevel.Error,
            var v => throw new UsageException($"--log-level {v}: want debug, info, warn or error"),
        };
        ImageReference src, dst;
        try
        {
            src = ImageReference.Parse(pos[0]);
            dst = ImageReference.Parse(pos[1]);
        }
        catch (InvalidReferenceException e) { throw new UsageException(e.Message); }
        var address = f.Last("--address") ?? "/run/containerd/containerd.sock";
        var ns = f.Last("--namespace") ?? (Environment.GetEnvironmentVariable("CONTAINERD_NAMESPACE") is { Length: > 0 } env ? env : "default");
        var snapshotter = f.Last("--snapshotter") ?? "overlayfs";
        if (address.Length == 0 || ns.Length == 0 || snapshotter.Length == 0) throw new UsageException("--address, --namespace and --snapshotter must not be empty");
        return new Args(src, dst, command, address, ns, snapshotter, f.Has("--plain-http"), f.Has("--zstd"), TimeSpan.FromSeconds(period),
            f.Last("--runc-root"), f.Last("--work-dir"), level);
    }

    public static async Task<int> RunAsync(string[] argv, TextWriter stdout, TextWriter stderr, CancellationToken ct)
    {
        Args a;
        try { a = Parse(argv); }
        catch (HelpRequested)
        {
            await stdout.WriteAsync("usage:\n" + Usage).ConfigureAwait(false);
            return 0;
        }
        catch (UsageException e)
        {
            await stderr.WriteLineAsync($"stargz image optimize: {e.Message}").ConfigureAwait(false);
            await stderr.WriteAsync("usage:\n" + Usage).ConfigureAwait(false);
            return 2;
        }
        if (!File.Exists(a.Address))
        {
            await stderr.WriteLineAsync($"stargz image optimize: containerd socket {a.Address} does not exist (is containerd running? use --address)").ConfigureAwait(false);
            return 1;
        }

        var hosts = new RegistryHostsConfig();
        if (a.PlainHttp)
            foreach (var h in new[] { a.Source.Host, a.Target.Host }.Distinct(StringComparer.OrdinalIgnoreCase))
                hosts.Set(h, new HostConfig { Origin = new EndpointConfig { Host = h, PlainHttp = true } });
        hosts.Blob = hosts.Blob with { MaxRetries = 3, MaxWait = TimeSpan.FromSeconds(5), FetchingTimeout = TimeSpan.FromMinutes(2) };
        using var registry = new RegistryClient(hosts, new DockerConfigCredentialProvider(), new StderrLogger("registry", a.LogLevel, stderr));
        using var containerd = new ContainerdClient(a.Address, a.Namespace);
        var log = new StderrLogger("optimize", a.LogLevel, stderr);
        try
        {
            // 1. SRC unpacked into containerd (containerd's own snapshotter by default: every file is there to run).
            var pulled = await new ImagePuller(registry, containerd, log, stdout)
                .PullAsync(a.Source, new RpullOptions { Snapshotter = a.Snapshotter }, ct).ConfigureAwait(false);
            var config = await registry.FetchBlobBytesAsync(a.Source, pulled.ConfigDigest, ct: ct).ConfigureAwait(false);

            // 2. The workload, recorded. Its own output goes to stderr: stdout is the report.
            var record = await new WorkloadRecorder(containerd, log).RecordAsync(new RecordOptions
            {
                Snapshotter = a.Snapshotter, TopChainId = pulled.TopChainId, LayerCount = pulled.Layers.Count, ImageConfig = config,
                Command = a.Command, Period = a.Period, RuncRoot = a.RuncRoot, WorkDirectory = a.WorkDir ?? Path.GetTempPath(), Output = stderr,
            }, ct).ConfigureAwait(false);
            await PrintRecordAsync(stdout, record, pulled).ConfigureAwait(false);

            // 3. SRC → DST with the recorded files first.
            var paths = new List<string>(record.Files.Count);
            foreach (var f in record.Files) paths.Add(f.Path);
            var started = DateTime.UtcNow;
            var result = await new ImageConverter(registry).ConvertAsync(a.Source, a.Target, new ConvertOptions
            {
                Format = a.Zstd ? LayerFormat.ZstdChunked : LayerFormat.Estargz,
                Prioritized = paths,
                WorkDirectory = a.WorkDir,
                Progress = new ConvertCommand.LineProgress(stdout),
            }, ct).ConfigureAwait(false);
            await stdout.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"{result.Target}: {result.Digest} ({result.MediaType}, {(DateTime.UtcNow - started).TotalSeconds:0.0} s)")).ConfigureAwait(false);
            return 0;
        }
        catch (Exception e) when (ct.IsCancellationRequested && e is OperationCanceledException or ContainerdException or RegistryException or HttpRequestException)
        {
            await stderr.WriteLineAsync("stargz image optimize: cancelled").ConfigureAwait(false);
            return 130;
        }
        catch (Exception e) when (e is ContainerdException or RegistryException or ImageConvertException or IOException or InvalidDataException
                                      or HttpRequestException or TimeoutException or UnauthorizedAccessException)
        {
            await stderr.WriteLineAsync($"stargz image optimize: {e.Message}").ConfigureAwait(false);
            return 1;
        }
    }

    /// <summary>One line per recorded file (first open first), one per layer, one in total.</summary>
    internal static async Task PrintRecordAsync(TextWriter w, WorkloadRecord r, RpullResult pulled)
    {
        var perLayer = new (int Files, long Bytes)[pulled.Layers.Count];
        long total = 0;
        foreach (var f in r.Files)
        {
            await w.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"recorded {f.Path} {f.Size} bytes layer {f.Layer}")).ConfigureAwait(false);
            if (f.Layer >= 0 && f.Layer < perLayer.Length) perLayer[f.Layer] = (perLayer[f.Layer].Files + 1, perLayer[f.Layer].Bytes + f.Size);
            total += f.Size;
        }
        for (int i = 0; i < perLayer.Length; i++)
            await w.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
                $"layer {i} {pulled.Layers[i].Digest}: {perLayer[i].Files} files, {perLayer[i].Bytes} bytes recorded")).ConfigureAwait(false);
        var how = r.TimedOut ? "stopped at the end of the period" : $"workload exited with {r.ExitCode}";
        await w.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
            $"recorded {r.Files.Count} files, {total} bytes ({how}{(r.Overflowed ? "; events were lost, the record is incomplete" : "")})")).ConfigureAwait(false);
    }
}
