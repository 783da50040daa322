using Microsoft.Extensions.Logging;
using Stargz.Containerd;
using Stargz.Registry;

namespace Stargz.Cli;

/// <summary>
/// <c>stargz image rpull [--address SOCK] [--namespace NS] [--snapshotter NAME] [--plain-http] [--user U:P]
/// [--hosts-dir DIR] [--platform P] [--label K=V]... [--skip-content-verify] [--log-level L] REF</c>: the equivalent of the reference's <c>ctr-remote image rpull</c>.
/// Exit codes: 0 pulled, 1 failed (message on stderr), 2 usage.
/// </summary>
internal static class RpullCommand
{
    public const string Usage = """
          stargz image rpull [--address SOCK] [--namespace NS] [--snapshotter NAME] [--plain-http] [--user U:P]
                             [--hosts-dir DIR] [--platform P] [--label K=V]... [--skip-content-verify] [--log-level L] REF
              pull REF into containerd, layers prepared on the snapshotter with the stargz labels so eStargz layers
              are mounted lazily (others are downloaded and applied); then `ctr run --snapshotter stargz REF` works.
              --skip-content-verify: layers without a TOC digest may be mounted unverified (the daemon must also
              have allow_no_verification = true)
              defaults: --address /run/containerd/containerd.sock, --namespace $CONTAINERD_NAMESPACE or default,
              --snapshotter stargz, --log-level warn (logfmt on stderr); --hosts-dir: containerd's certs.d layout
        """;

    internal sealed record Args(string Address, string Namespace, string Snapshotter, bool PlainHttp, string? User, Platform Platform,
        LogLevel LogLevel, IReadOnlyDictionary<string, string> Labels, string Reference)
    {
        public string? HostsDir { get; init; }
        public bool SkipContentVerify { get; init; }
    }

    private static readonly ArgParser Options = new ArgParser()
        .Value("--address", "-a").Value("--namespace", "-n").Value("--snapshotter").Switch("--plain-http")
        .Switch("--skip-content-verify").Value("--user", "-u").Value("--hosts-dir").Value("--platform")
        .Value("--label").Value("--log-level");

    internal static Args Parse(IReadOnlyList<string> args)
    {
        var f = Options.Parse(args);
        var user = f.Last("--user");
        if (user is not null && !user.Contains(':')) throw new UsageException("--user wants USER:PASSWORD");
        var hostsDir = f.Last("--hosts-dir");
        if (hostsDir is not null && !Directory.Exists(hostsDir)) throw new UsageException($"--hosts-dir {hostsDir}: no such directory");
        var platform = Platform.Current;
        if (f.Last("--platform") is { } p)
        {
            try { platform = Platform.Parse(p); }
            catch (FormatException ex) { throw new UsageException(ex.Message); }
        }
        var labels = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var kv in f.All("--label"))
        {
            var at = kv.IndexOf('=');
            if (at <= 0) throw new UsageException($"--label {kv}: want KEY=VALUE");
            labels[kv[..at]] = kv[(at + 1)..];
        }
        var level = f.Last("--log-level") switch
        {
            null => LogLevel.Warning,
            "trace" => LogLevel.Trace, "debug" => LogLevel.Debug, "info" => LogLevel.Information,
            "warn" or "warning" => LogLevel.Warning, "error" => LogLevel.Error,
            var v => throw new UsageException($"--log-level {v}: want debug, info, warn or error"),
        };
        var pos = f.Positional;
        if (pos.Count != 1) throw new UsageException(pos.Count == 0 ? "image rpull needs an image reference" : "image rpull takes one image reference");
        string address = f.Last("--address") ?? "/run/containerd/containerd.sock";
        string ns = f.Last("--namespace") ?? (Environment.GetEnvironmentVariable("CONTAINERD_NAMESPACE") is { Length: > 0 } e ? e : "default");
        string snapshotter = f.Last("--snapshotter") ?? "stargz";
        if (address.Length == 0 || ns.Length == 0 || snapshotter.Length == 0) throw new UsageException("--address, --namespace and --snapshotter must not be empty");
        return new Args(address, ns, snapshotter, f.Has("--plain-http"), user, platform, level, labels, pos[0])
        {
            HostsDir = hostsDir,
            SkipContentVerify = f.Has("--skip-content-verify"),
        };
    }

    public static async Task<int> RunAsync(string[] argv, TextWriter stdout, TextWriter stderr, CancellationToken ct)
    {
        Args a;
        ImageReference reference;
        try
        {
            a = Parse(argv);
        }
        catch (UsageException e)
        {
            await stderr.WriteLineAsync($"stargz: {e.Message}").ConfigureAwait(false);
            await stderr.WriteAsync("usage:\n" + Usage).ConfigureAwait(false);
            return 2;
        }
        try
        {
            reference = ImageReference.Parse(a.Reference);
        }
        catch (InvalidReferenceException e)
        {
            await stderr.WriteLineAsync($"stargz: invalid image reference \"{a.Reference}\": {e.Message}").ConfigureAwait(false);
            return 2;
        }

        // Said up front: otherwise the first gRPC call fails with a connection error that does not name the path.
        if (!File.Exists(a.Address))
        {
            await stderr.WriteLineAsync($"stargz: containerd socket {a.Address} does not exist (is containerd running? use --address)").ConfigureAwait(false);
            return 1;
        }

        var log = new StderrLogger("rpull", a.LogLevel, stderr);
        var hosts = new RegistryHostsConfig();
        if (a.HostsDir is not null) hosts.LoadHostsDirectory(a.HostsDir);
        // As ctr: --plain-http is for the plain origin; a host the hosts dir configures keeps its own endpoints.
        if (a.PlainHttp && !hosts.Hosts.ContainsKey(reference.Host))
            hosts.Set(reference.Host, new HostConfig { Origin = new EndpointConfig { Host = reference.Host, PlainHttp = true } });
        // A command, not a daemon: fewer retries, at most 5 s apart (the daemon's defaults wait up to 300 s), so a
        // registry that refuses fails the pull in seconds; one that hangs fails a request after 2 min.
        hosts.Blob = hosts.Blob with { MaxRetries = 3, MaxWait = TimeSpan.FromSeconds(5), FetchingTimeout = TimeSpan.FromMinutes(2) };
        ICredentialProvider creds = new DockerConfigCredentialProvider();
        if (a.User is { } user)
        {
            var c = user.IndexOf(':');
            creds = new StaticCredentialProvider().Add(reference.Host, user[..c], user[(c + 1)..]);
        }

        using var registry = new RegistryClient(hosts, creds, new StderrLogger("registry", a.LogLevel, stderr));
        using var containerd = new ContainerdClient(a.Address, a.Namespace);
        // On a terminal, a bar per layer; otherwise (and in the tests) the lines ctr-remote prints.
        var bars = LayerProgressView.UseBars(stdout);
        var puller = new ImagePuller(registry, containerd, log, bars ? null : stdout);
        var options = new RpullOptions { Snapshotter = a.Snapshotter, Platform = a.Platform, ImageLabels = a.Labels, SkipContentVerify = a.SkipContentVerify };
        try
        {
            var r = bars
                ? await LayerProgressView.RunAsync(update => puller.PullAsync(reference,
                    options with { LayerProgress = new InlineProgress<LayerPullProgress>(p => update(p.Digest, LayerProgressView.Describe(p))) }, ct)).ConfigureAwait(false)
                : await puller.PullAsync(reference, options, ct).ConfigureAwait(false);
            await stdout.WriteLineAsync($"done: {r.ImageName} {r.Target.Digest} ({r.Layers.Count(l => l.Outcome == LayerOutcome.Remote)} remote, " +
                $"{r.Layers.Count(l => l.Outcome == LayerOutcome.Applied)} applied, {r.Layers.Count(l => l.Outcome == LayerOutcome.Existing)} existing layers)")
                .ConfigureAwait(false);
            return 0;
        }
        // After Ctrl-C, whatever call was in flight fails its own way (a gRPC call as a "Cancelled" containerd error, an
        // HTTP request as a cancelled task): the pull was cancelled.
        catch (Exception e) when (ct.IsCancellationRequested
            && e is OperationCanceledException or ContainerdException or RegistryException or HttpRequestException or TimeoutException)
        {
            await stderr.WriteLineAsync("stargz: rpull cancelled").ConfigureAwait(false);
            return 130;
        }
        catch (Exception e) when (FailureMessage(e, reference) is { } message)
        {
            await stderr.WriteLineAsync($"stargz: {message}").ConfigureAwait(false);
        }
        return 1;
    }

    /// <summary>The one line a failed pull prints, saying what failed; null for an exception that is a bug.</summary>
    private static string? FailureMessage(Exception e, ImageReference reference) => e switch
    {
        NotFoundException => $"image {reference} not found: {e.Message}",
        UnauthorizedException => $"not authorized to pull {reference}: {e.Message}",
        RegistryException => $"registry: {e.Message}",
        ContainerdException => $"containerd: {e.Message}",
        InvalidDataException => e.Message,
        HttpRequestException => $"registry {reference.Host}: {e.Message}",
        TimeoutException => $"timed out: {e.Message}",
        _ => null,
    };
}
