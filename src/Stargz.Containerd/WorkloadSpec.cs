using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Stargz.Containerd;

/// <summary>The process an image runs: arguments, environment, working directory and user (as numbers).</summary>
public sealed record WorkloadProcess(IReadOnlyList<string> Args, IReadOnlyList<string> Env, string Cwd, uint Uid, uint Gid);

/// <summary>
/// What <c>stargz image optimize</c> runs, from the image config (as <c>ctr run</c> and the reference's optimize take
/// it): the command given replaces Entrypoint+Cmd; without one, Entrypoint then Cmd. Env from the config (PATH added
/// when missing), WorkingDir (default /), User as <c>uid[:gid]</c> or names looked up in the rootfs' /etc/passwd and
/// /etc/group. The OCI runtime spec is containerd's default (<c>ctr oci spec</c>) with these and the rootfs path set.
/// </summary>
public static class WorkloadSpec
{
    public const string DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    /// <summary>The process of <paramref name="configJson"/> (the image config), with <paramref name="command"/>
    /// (empty: the image's own) and users resolved against <paramref name="rootfs"/>.</summary>
    public static WorkloadProcess FromImageConfig(ReadOnlySpan<byte> configJson, IReadOnlyList<string> command, string rootfs)
    {
        using var doc = JsonDocument.Parse(configJson.ToArray());
        JsonElement cfg = default;
        bool hasCfg = doc.RootElement.ValueKind == JsonValueKind.Object && doc.RootElement.TryGetProperty("config", out cfg) && cfg.ValueKind == JsonValueKind.Object;
        List<string> Strings(string name)
        {
            var l = new List<string>();
            if (hasCfg && cfg.TryGetProperty(name, out var a) && a.ValueKind == JsonValueKind.Array)
                foreach (var s in a.EnumerateArray()) if (s.ValueKind == JsonValueKind.String) l.Add(s.GetString()!);
            return l;
        }
        string? Str(string name) => hasCfg && cfg.TryGetProperty(name, out var s) && s.ValueKind == JsonValueKind.String ? s.GetString() : null;

        var args = new List<string>();
        if (command.Count > 0) args.AddRange(command);
        else
        {
            args.AddRange(Strings("Entrypoint"));
            args.AddRange(Strings("Cmd"));
        }
        if (args.Count == 0) throw new InvalidDataException("the image has no Entrypoint or Cmd: give a command after --");
        var env = Strings("Env");
        if (!env.Exists(e => e.StartsWith("PATH=", StringComparison.Ordinal))) env.Insert(0, DefaultPath);
        var cwd = Str("WorkingDir") is { Length: > 0 } w ? w : "/";
        var (uid, gid) = ResolveUser(Str("User") ?? "", rootfs);
        return new WorkloadProcess(args, env, cwd, uid, gid);
    }

    /// <summary><c>user[:group]</c>, each a number or a name in the rootfs' /etc/passwd or /etc/group. A user without a
    /// group gets its passwd group (0 for a bare uid not in passwd).</summary>
    public static (uint Uid, uint Gid) ResolveUser(string user, string rootfs)
    {
        if (user.Length == 0) return (0, 0);
        var colon = user.IndexOf(':');
        var (u, g) = colon < 0 ? (user, null) : (user[..colon], user[(colon + 1)..]);
        uint uid, gid = 0;
        string[]? passwd = null;
        string[] Passwd() => passwd ??= ReadLines(Path.Combine(rootfs, "etc/passwd"));
        if (uint.TryParse(u, NumberStyles.None, CultureInfo.InvariantCulture, out uid))
        {
            foreach (var l in Passwd())
                if (l.Split(':') is { Length: >= 4 } f && f[2] == u && uint.TryParse(f[3], CultureInfo.InvariantCulture, out var pg)) { gid = pg; break; }
        }
        else
        {
            var found = false;
            foreach (var l in Passwd())
                if (l.Split(':') is { Length: >= 4 } f && f[0] == u
                    && uint.TryParse(f[2], CultureInfo.InvariantCulture, out uid) && uint.TryParse(f[3], CultureInfo.InvariantCulture, out gid)) { found = true; break; }
            if (!found) throw new InvalidDataException($"user \"{u}\" of the image config is not in its /etc/passwd");
        }
        if (g is { Length: > 0 })
        {
            if (!uint.TryParse(g, NumberStyles.None, CultureInfo.InvariantCulture, out gid))
            {
                var found = false;
                foreach (var l in ReadLines(Path.Combine(rootfs, "etc/group")))
                    if (l.Split(':') is { Length: >= 3 } f && f[0] == g && uint.TryParse(f[2], CultureInfo.InvariantCulture, out gid)) { found = true; break; }
                if (!found) throw new InvalidDataException($"group \"{g}\" of the image config is not in its /etc/group");
            }
        }
        return (uid, gid);
    }

    // A symlinked /etc/passwd could point out of the rootfs onto the host's: only a regular file is read.
    private static string[] ReadLines(string path)
    {
        var fi = new FileInfo(path);
        return fi.Exists && fi.LinkTarget is null ? File.ReadAllLines(path) : [];
    }

    /// <summary>containerd's default spec (<paramref name="baseSpec"/>, from <c>ctr oci spec</c>) running
    /// <paramref name="p"/> on <paramref name="rootfs"/>, cgroup <c>/NAMESPACE/ID</c> as <c>ctr run</c> names it.</summary>
    public static string BuildSpec(string baseSpec, WorkloadProcess p, string rootfs, string ns, string id)
    {
        var spec = JsonNode.Parse(baseSpec) as JsonObject ?? throw new InvalidDataException("base OCI spec is not a JSON object");
        var process = spec["process"] as JsonObject ?? new JsonObject();
        spec["process"] = process;
        process["terminal"] = false;
        process["args"] = Array(p.Args);
        process["env"] = Array(p.Env);
        process["cwd"] = p.Cwd;
        process["user"] = new JsonObject { ["uid"] = p.Uid, ["gid"] = p.Gid };
        spec["root"] = new JsonObject { ["path"] = rootfs, ["readonly"] = false };
        spec["hostname"] = id.Length > 12 ? id[..12] : id;
        if (spec["linux"] is JsonObject linux) linux["cgroupsPath"] = $"/{ns}/{id}";
        return spec.ToJsonString();
    }

    private static JsonArray Array(IReadOnlyList<string> items)
    {
        var a = new JsonArray();
        // The non-generic Add(JsonNode) with JsonValue.Create(string): no reflection (Add<T> is not AOT-safe).
        foreach (var s in items) a.Add((JsonNode?)JsonValue.Create(s));
        return a;
    }
}
