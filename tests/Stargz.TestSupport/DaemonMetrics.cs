using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace Stargz.TestSupport;

/// <summary>What tests and benchmarks read back from the real parts: our daemon's gauges, a registry's manifests.</summary>
public static class DaemonMetrics
{
    /// <summary>Reads one unlabelled gauge from the daemon's Prometheus endpoint on 127.0.0.1:<paramref name="port"/>.</summary>
    public static async Task<double> ReadAsync(int port, string name)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(10) };
        var text = await http.GetStringAsync($"http://127.0.0.1:{port}/metrics");
        var m = Regex.Match(text, "^" + Regex.Escape(name) + @" ([0-9.eE+-]+)$", RegexOptions.Multiline);
        if (!m.Success) throw new InvalidOperationException($"metric {name} not found in:\n{text}");
        return double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
    }

    /// <summary>The layers (digest, size) of <c>host/repo:tag</c> as the registry serves its manifest (OCI or Docker).</summary>
    public static async Task<List<(string Digest, long Size)>> ManifestLayersAsync(string host, string repo, string tag)
    {
        using var http = new HttpClient { Timeout = TimeSpan.FromSeconds(30) };
        using var req = new HttpRequestMessage(HttpMethod.Get, $"http://{host}/v2/{repo}/manifests/{tag}");
        req.Headers.Accept.ParseAdd("application/vnd.oci.image.manifest.v1+json");
        req.Headers.Accept.ParseAdd("application/vnd.docker.distribution.manifest.v2+json");
        using var resp = await http.SendAsync(req);
        resp.EnsureSuccessStatusCode();
        using var doc = JsonDocument.Parse(await resp.Content.ReadAsStringAsync());
        var list = new List<(string, long)>();
        foreach (var l in doc.RootElement.GetProperty("layers").EnumerateArray())
            list.Add((l.GetProperty("digest").GetString()!, l.GetProperty("size").GetInt64()));
        return list;
    }
}
