using System.Net;
using Tomlyn;
using Tomlyn.Model;

namespace Stargz.Registry;

/// <summary>One place to send requests for a registry: a mirror or the origin itself.</summary>
public sealed record EndpointConfig
{
    /// <summary>host[:port] of this endpoint.</summary>
    public required string Host { get; init; }
    /// <summary>Plain HTTP instead of HTTPS (reference: <c>insecure = true</c>). Null: plain only for localhost/loopback.</summary>
    public bool? PlainHttp { get; init; }
    /// <summary>HTTPS without certificate verification (hosts.toml <c>skip_verify</c>).</summary>
    public bool SkipVerify { get; init; }
    /// <summary>PEM file(s) with extra CA certificates trusted for this endpoint.</summary>
    public IReadOnlyList<string> CaFiles { get; init; } = [];
    /// <summary>Client certificate (PEM) and its key (PEM; null when the cert file holds both).</summary>
    public string? ClientCertFile { get; init; }
    public string? ClientKeyFile { get; init; }
    /// <summary>Hard limit for one HTTP request/response; null = the blob fetching timeout.</summary>
    public TimeSpan? RequestTimeout { get; init; }
    /// <summary>Path prefix instead of /v2 (hosts.toml <c>override_path</c> with a path in the host URL).</summary>
    public string? PathPrefix { get; init; }

    internal bool UsesPlainHttp => PlainHttp ?? IsLoopbackHost(Host);

    internal static bool IsLoopbackHost(string host)
    {
        var h = host;
        if (h.StartsWith('['))
        {
            var close = h.IndexOf(']');
            h = close > 0 ? h[1..close] : h;
        }
        else
        {
            var c = h.LastIndexOf(':');
            if (c > 0 && h.IndexOf(':') == c) h = h[..c];
        }
        if (h == "localhost") return true;
        return IPAddress.TryParse(h, out var ip) && IPAddress.IsLoopback(ip);
    }
}

/// <summary>Settings for one registry host: mirrors tried in order, then the origin.</summary>
public sealed record HostConfig
{
    public IReadOnlyList<EndpointConfig> Mirrors { get; init; } = [];
    /// <summary>Settings for the origin itself (TLS, plain HTTP, timeout). Host is filled in when used.</summary>
    public EndpointConfig? Origin { get; init; }
    /// <summary>When false, only mirrors are used (hosts.toml with a <c>server</c> that is not the host).</summary>
    public bool UseOrigin { get; init; } = true;
}

/// <summary>Blob fetching options; names follow the reference's <c>[blob]</c> section.</summary>
public sealed record BlobOptions
{
    /// <summary>
    /// <c>fetching_timeout_sec</c>: hard limit for one request that is not watched for stalls (pushes); pulls are bounded
    /// by <see cref="StallTimeout"/> and <see cref="OutageTimeout"/> instead, so a slow but moving transfer is never cut.
    /// </summary>
    public TimeSpan FetchingTimeout { get; init; } = TimeSpan.FromSeconds(300);
    /// <summary>
    /// <c>stall_timeout_sec</c>: a pull request that receives nothing (neither its response headers nor body bytes) for
    /// this long is abandoned (its connection closed) and retried on a fresh connection, or on the next mirror.
    /// Zero turns the watchdog off.
    /// </summary>
    public TimeSpan StallTimeout { get; init; } = TimeSpan.FromSeconds(DefaultStallTimeoutSec);
    public const int DefaultStallTimeoutSec = 3;
    /// <summary>
    /// <c>outage_timeout_sec</c>: refused, reset and stalled pull requests are retried with backoff (beyond
    /// <see cref="MaxRetries"/>) until the host has sent nothing for this long, then the operation fails. Zero: only
    /// <see cref="MaxRetries"/> counts, as for other failures.
    /// </summary>
    public TimeSpan OutageTimeout { get; init; } = TimeSpan.FromSeconds(DefaultOutageTimeoutSec);
    public const int DefaultOutageTimeoutSec = 7;
    /// <summary><c>max_retries</c>: retries after the first attempt.</summary>
    public int MaxRetries { get; init; } = 5;
    /// <summary><c>min_wait_msec</c>/<c>max_wait_msec</c>: backoff bounds.</summary>
    public TimeSpan MinWait { get; init; } = TimeSpan.FromMilliseconds(30);
    public TimeSpan MaxWait { get; init; } = TimeSpan.FromMilliseconds(300_000);
    /// <summary><c>force_single_range_mode</c>: never send multi-range requests.</summary>
    public bool ForceSingleRangeMode { get; init; }
    /// <summary>Most ranges put into one multi-range request (keeps the header small).</summary>
    public int MaxRangesPerRequest { get; init; } = 256;
    /// <summary>Largest manifest or index accepted.</summary>
    public int MaxManifestBytes { get; init; } = 4 << 20;
}

/// <summary>
/// Per-host configuration for every registry the client talks to, from the reference's
/// <c>[resolver.host."HOST"]</c> TOML, from containerd <c>hosts.toml</c> files, or built in code.
/// </summary>
public sealed class RegistryHostsConfig
{
    private readonly Dictionary<string, HostConfig> _hosts = new(StringComparer.OrdinalIgnoreCase);

    public BlobOptions Blob { get; set; } = new();

    public IReadOnlyDictionary<string, HostConfig> Hosts => _hosts;

    public RegistryHostsConfig Set(string host, HostConfig config)
    {
        _hosts[NormaliseHost(host)] = config;
        return this;
    }

    public HostConfig Get(string host) => _hosts.TryGetValue(NormaliseHost(host), out var c) ? c : new HostConfig();

    /// <summary>Endpoints to try for <paramref name="host"/>, in order: mirrors, then the origin.</summary>
    public IReadOnlyList<EndpointConfig> EndpointsFor(string host)
    {
        var api = host == ImageReference.DockerHubHost ? ImageReference.DockerHubApiHost : host;
        var c = Get(host);
        var list = new List<EndpointConfig>(c.Mirrors.Count + 1);
        foreach (var m in c.Mirrors) list.Add(m);
        if (c.UseOrigin || list.Count == 0)
            list.Add(c.Origin is null ? new EndpointConfig { Host = api } : c.Origin with { Host = api });
        return list;
    }

    private static string NormaliseHost(string h) => h is "index.docker.io" or ImageReference.DockerHubApiHost ? ImageReference.DockerHubHost : h;

    /// <summary>
    /// Reads the reference daemon's config.toml subset: <c>[blob]</c> and
    /// <c>[resolver.host."H"] mirrors = [{host, insecure, request_timeout_sec}]</c>. Other keys are ignored.
    /// </summary>
    public static RegistryHostsConfig FromDaemonToml(string toml)
    {
        var model = TomlModel.Parse(toml);
        var cfg = new RegistryHostsConfig();
        if (model.TryGetValue("blob", out var b) && b is TomlTable blob)
        {
            var o = cfg.Blob;
            if (Num(blob, "fetching_timeout_sec") is long ft && ft > 0) o = o with { FetchingTimeout = TimeSpan.FromSeconds(ft) };
            if (Num(blob, "max_retries") is long mr && mr >= 0) o = o with { MaxRetries = (int)mr };
            if (Num(blob, "min_wait_msec") is long mi && mi > 0) o = o with { MinWait = TimeSpan.FromMilliseconds(mi) };
            if (Num(blob, "max_wait_msec") is long ma && ma > 0) o = o with { MaxWait = TimeSpan.FromMilliseconds(ma) };
            if (blob.TryGetValue("force_single_range_mode", out var fs) && fs is bool fsb) o = o with { ForceSingleRangeMode = fsb };
            cfg.Blob = o;
        }
        if (model.TryGetValue("resolver", out var r) && r is TomlTable resolver
            && resolver.TryGetValue("host", out var h) && h is TomlTable hosts)
        {
            foreach (var (name, v) in hosts)
            {
                if (v is not TomlTable ht) continue;
                var mirrors = new List<EndpointConfig>();
                if (ht.TryGetValue("mirrors", out var ms) && ms is TomlTableArray arr)
                {
                    foreach (var m in arr)
                    {
                        var mh = m.TryGetValue("host", out var mhv) ? mhv as string : null;
                        if (string.IsNullOrEmpty(mh)) throw new FormatException($"[resolver.host.\"{name}\"] mirror without host");
                        var insecure = m.TryGetValue("insecure", out var iv) && iv is bool ib && ib;
                        var to = Num(m, "request_timeout_sec");
                        mirrors.Add(new EndpointConfig
                        {
                            Host = mh,
                            PlainHttp = insecure ? true : null,
                            RequestTimeout = to is > 0 ? TimeSpan.FromSeconds(to.Value) : null,
                        });
                    }
                }
                cfg.Set(name, new HostConfig { Mirrors = mirrors });
            }
        }
        return cfg;
    }

    /// <summary>
    /// Loads containerd's <c>certs.d</c> layout: <c>DIR/HOST/hosts.toml</c> (server, [host."URL"] with
    /// capabilities, ca, client, skip_verify, override_path). Returns this for chaining.
    /// </summary>
    public RegistryHostsConfig LoadHostsDirectory(string dir)
    {
        if (!Directory.Exists(dir)) return this;
        foreach (var sub in Directory.GetDirectories(dir))
        {
            var file = Path.Combine(sub, "hosts.toml");
            if (!File.Exists(file)) continue;
            var host = Path.GetFileName(sub);
            // containerd escapes ':' as '_' in directory names only for ports on some platforms; accept both.
            if (host.StartsWith('_')) continue;
            Set(host, ParseHostsToml(host, File.ReadAllText(file), sub));
        }
        return this;
    }

    /// <summary>Parses one hosts.toml for <paramref name="host"/>; relative cert paths resolve against <paramref name="baseDir"/>.</summary>
    public static HostConfig ParseHostsToml(string host, string toml, string baseDir)
    {
        var model = TomlModel.Parse(toml);
        EndpointConfig? origin = null;
        var useOrigin = true;
        if (model.TryGetValue("server", out var sv) && sv is string server)
        {
            var ep = EndpointFromTable(server, model, baseDir);
            if (string.Equals(ep.Host, host, StringComparison.OrdinalIgnoreCase)
                || (host == ImageReference.DockerHubHost && ep.Host == ImageReference.DockerHubApiHost))
                origin = ep;
            else
            {
                // server points elsewhere: the "origin" is that server, the named host itself is not contacted.
                useOrigin = false;
                origin = ep;
            }
        }
        else if (HasEndpointKeys(model))
        {
            origin = EndpointFromTable("https://" + host, model, baseDir);
        }
        var mirrors = new List<EndpointConfig>();
        if (model.TryGetValue("host", out var hv) && hv is TomlTable hostTables)
        {
            foreach (var (url, v) in hostTables)
            {
                if (v is not TomlTable t) continue;
                if (t.TryGetValue("capabilities", out var caps) && caps is TomlArray ca)
                {
                    var pull = false;
                    foreach (var c in ca) if (c is "pull") pull = true;
                    if (!pull) continue;
                }
                mirrors.Add(EndpointFromTable(url, t, baseDir));
            }
        }
        if (!useOrigin && origin is not null) mirrors.Add(origin);
        return new HostConfig { Mirrors = mirrors, Origin = useOrigin ? origin : null, UseOrigin = useOrigin };
    }

    private static bool HasEndpointKeys(TomlTable t)
        => t.ContainsKey("ca") || t.ContainsKey("client") || t.ContainsKey("skip_verify");

    private static EndpointConfig EndpointFromTable(string url, TomlTable t, string baseDir)
    {
        var withScheme = url.Contains("://", StringComparison.Ordinal) ? url : "https://" + url;
        if (!Uri.TryCreate(withScheme, UriKind.Absolute, out var u))
            throw new FormatException($"hosts.toml: invalid host URL \"{url}\"");
        var cas = new List<string>();
        if (t.TryGetValue("ca", out var cav))
        {
            if (cav is string one) cas.Add(Abs(one, baseDir));
            else if (cav is TomlArray many) foreach (var x in many) if (x is string s) cas.Add(Abs(s, baseDir));
        }
        string? cert = null, key = null;
        if (t.TryGetValue("client", out var cl))
        {
            if (cl is string c1) cert = Abs(c1, baseDir);
            else if (cl is TomlArray ca2 && ca2.Count > 0)
            {
                var first = ca2[0];
                if (first is string c2) cert = Abs(c2, baseDir);
                else if (first is TomlArray pair && pair.Count > 0)
                {
                    cert = pair[0] is string pc ? Abs(pc, baseDir) : null;
                    key = pair.Count > 1 && pair[1] is string pk ? Abs(pk, baseDir) : null;
                }
            }
        }
        var path = u.AbsolutePath.TrimEnd('/');
        var overridePath = t.TryGetValue("override_path", out var op) && op is bool ob && ob;
        return new EndpointConfig
        {
            Host = u.IsDefaultPort ? u.Host : $"{u.Host}:{u.Port}",
            PlainHttp = u.Scheme == "http",
            SkipVerify = t.TryGetValue("skip_verify", out var sk) && sk is bool sb && sb,
            CaFiles = cas,
            ClientCertFile = cert,
            ClientKeyFile = key,
            PathPrefix = overridePath && path.Length > 0 ? path : (path.Length > 0 && path != "/v2" ? path + "/v2" : null),
        };
    }

    private static string Abs(string p, string baseDir) => Path.IsPathRooted(p) ? p : Path.Combine(baseDir, p);

    private static long? Num(TomlTable t, string key)
        => t.TryGetValue(key, out var v) ? v switch { long l => l, int i => i, double d => (long)d, _ => null } : null;
}
