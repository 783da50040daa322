namespace Stargz.Daemon;

/// <summary>Command-line flags, named as the reference containerd-stargz-grpc's.</summary>
public sealed class DaemonOptions
{
    public const string DefaultAddress = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock";
    public const string DefaultRoot = "/var/lib/containerd-stargz-grpc";

    public string Address { get; set; } = DefaultAddress;
    public string Root { get; set; } = DefaultRoot;
    public string ConfigPath { get; set; } = ConfigLoader.DefaultPath;
    public bool ConfigGiven { get; set; }
    public string LogLevel { get; set; } = "info";
    public string? SocketGroup { get; set; }
    public bool ShowHelp { get; set; }

    public const string Usage = """
        usage: stargz-snapshotter [flags]
               stargz-snapshotter supervise [flags]   (restarts the daemon, keeping its FUSE connections; --help)
          --address PATH      unix socket to serve containerd's snapshots API on
                              (default /run/containerd-stargz-grpc/containerd-stargz-grpc.sock)
          --root DIR          metadata and snapshot dirs (default /var/lib/containerd-stargz-grpc)
          --config FILE       TOML config (default /etc/containerd-stargz-grpc/config.toml; may be absent)
          --log-level LEVEL   trace, debug, info, warn, error, fatal, panic (default info)
          --socket-group GRP  make the socket 0660 owned by group GRP (default: 0600)
          -h, --help          this text
        """;

    /// <summary>Parses `--flag value`, `--flag=value` and `-flag value` (Go's flag package accepts one dash too).</summary>
    public static DaemonOptions Parse(IReadOnlyList<string> args)
    {
        var o = new DaemonOptions();
        for (int i = 0; i < args.Count; i++)
        {
            var a = args[i];
            if (a is "-h" or "--help" or "-help") { o.ShowHelp = true; continue; }
            if (!a.StartsWith('-')) throw new ArgumentException($"unexpected argument \"{a}\"");
            var name = a.TrimStart('-');
            string? value = null;
            var eq = name.IndexOf('=');
            if (eq >= 0) { value = name[(eq + 1)..]; name = name[..eq]; }
            string Next()
            {
                if (value != null) return value;
                if (i + 1 >= args.Count) throw new ArgumentException($"flag --{name} needs a value");
                return args[++i];
            }
            switch (name)
            {
                case "address": o.Address = NonEmpty(name, Next()); break;
                case "root": o.Root = NonEmpty(name, Next()); break;
                case "config": o.ConfigPath = NonEmpty(name, Next()); o.ConfigGiven = true; break;
                case "log-level": o.LogLevel = Next(); break;
                case "socket-group": o.SocketGroup = NonEmpty(name, Next()); break;
                default: throw new ArgumentException($"unknown flag \"{a}\"");
            }
        }
        if (o.Address.Length > 107) throw new ArgumentException($"--address {o.Address} is longer than a unix socket path may be (107 bytes)");
        _ = ParseLogLevel(o.LogLevel);
        o.Address = Path.GetFullPath(o.Address);
        o.Root = Path.GetFullPath(o.Root);
        return o;
    }

    private static string NonEmpty(string name, string v) =>
        v.Length > 0 ? v : throw new ArgumentException($"flag --{name} must not be empty");

    public static Microsoft.Extensions.Logging.LogLevel ParseLogLevel(string s) => s.ToLowerInvariant() switch
    {
        "trace" => Microsoft.Extensions.Logging.LogLevel.Trace,
        "debug" => Microsoft.Extensions.Logging.LogLevel.Debug,
        "info" or "information" => Microsoft.Extensions.Logging.LogLevel.Information,
        "warn" or "warning" => Microsoft.Extensions.Logging.LogLevel.Warning,
        "error" => Microsoft.Extensions.Logging.LogLevel.Error,
        "fatal" or "panic" or "critical" => Microsoft.Extensions.Logging.LogLevel.Critical,
        _ => throw new ArgumentException($"--log-level \"{s}\" is not one of trace, debug, info, warn, error, fatal, panic"),
    };
}
