using System.Collections.Concurrent;
using System.Diagnostics;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Registry;

/// <summary>
/// Runs docker credential helpers as docker does: <c>docker-credential-NAME get</c> from the search path, the server
/// address on stdin, <c>{"Username": ..., "Secret": ...}</c> on stdout (Username <c>&lt;token&gt;</c> means Secret is an
/// identity token). Each answer is kept for a while (helpers may be slow, and Basic auth looks credentials up for every
/// request), one run per helper and server at a time, bounded by a timeout; a helper that is missing, fails or hangs
/// gives no credentials and a warning naming it (never a secret).
/// </summary>
public sealed class CredentialHelpers
{
    private const string NotFound = "credentials not found";
    private const int TextFileBusy = 26; // ETXTBSY

    private readonly string _searchPath;
    private readonly TimeSpan _timeout;
    private readonly long _cacheMs;
    private readonly ILogger _log;
    private readonly ConcurrentDictionary<(string Helper, string Server), (Task<RegistryCredential?> Task, long At)> _answers = new();
    private long _runs;

    /// <param name="searchPath">directories to find helpers in (default: $PATH).</param>
    /// <param name="timeout">how long one run may take (default 10 s).</param>
    /// <param name="cacheFor">how long an answer is reused (default 60 s).</param>
    public CredentialHelpers(string? searchPath = null, TimeSpan? timeout = null, TimeSpan? cacheFor = null, ILogger? logger = null)
    {
        _searchPath = searchPath ?? Environment.GetEnvironmentVariable("PATH") ?? "/usr/local/bin:/usr/bin:/bin";
        _timeout = timeout ?? TimeSpan.FromSeconds(10);
        _cacheMs = (long)(cacheFor ?? TimeSpan.FromSeconds(60)).TotalMilliseconds;
        _log = logger ?? NullLogger.Instance;
    }

    /// <summary>Helper processes started so far.</summary>
    public long Runs => Interlocked.Read(ref _runs);

    /// <summary>The credentials <paramref name="helper"/> has for <paramref name="server"/>, or null.</summary>
    public async ValueTask<RegistryCredential?> GetAsync(string helper, string server, CancellationToken ct)
    {
        var key = (helper, server);
        while (true)
        {
            var now = Environment.TickCount64;
            if (_answers.TryGetValue(key, out var cur) && (!cur.Task.IsCompleted || now - cur.At < _cacheMs))
                return await cur.Task.WaitAsync(ct).ConfigureAwait(false);
            // Unstarted until it is in the map: only the caller whose entry went in runs the helper.
            var start = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            var run = start.Task.ContinueWith(_ => RunAsync(helper, server), CancellationToken.None,
                TaskContinuationOptions.None, TaskScheduler.Default).Unwrap();
            var mine = (run, now);
            bool added = cur.Task is null ? _answers.TryAdd(key, mine) : _answers.TryUpdate(key, mine, cur);
            if (!added) continue;
            start.SetResult();
            return await run.WaitAsync(ct).ConfigureAwait(false);
        }
    }

    private async Task<RegistryCredential?> RunAsync(string helper, string server)
    {
        var name = "docker-credential-" + helper;
        var path = Find(name);
        if (path is null)
        {
            _log.LogWarning("docker credential helper {Helper} is not on the search path; no credentials for {Server} from it", name, server);
            return null;
        }
        Interlocked.Increment(ref _runs);
        var psi = new ProcessStartInfo(path)
        {
            RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false,
        };
        psi.ArgumentList.Add("get");
        using var timeout = new CancellationTokenSource(_timeout);
        Process? p = null;
        for (var attempt = 1; p is null; attempt++)
        {
            try { p = Process.Start(psi) ?? throw new InvalidOperationException("no process"); }
            catch (System.ComponentModel.Win32Exception e) when (e.NativeErrorCode == TextFileBusy && attempt < 5)
            {
                // The helper is being written (a package upgrade; or any process forked at that moment still holds
                // the writer's descriptor until it execs): wait a little and try again.
                await Task.Delay(50 * attempt, CancellationToken.None).ConfigureAwait(false);
            }
            catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException)
            {
                _log.LogWarning("docker credential helper {Helper} cannot be started: {Error}", path, e.Message);
                return null;
            }
        }
        try
        {
            try
            {
                await p.StandardInput.WriteAsync(server).ConfigureAwait(false);
                p.StandardInput.Close();
            }
            catch (IOException)
            {
                // EPIPE: the helper answered without reading its input (docker accepts that too); its output counts.
            }
            var stdout = p.StandardOutput.ReadToEndAsync(timeout.Token);
            var stderr = p.StandardError.ReadToEndAsync(timeout.Token);
            await p.WaitForExitAsync(timeout.Token).ConfigureAwait(false);
            var output = await stdout.ConfigureAwait(false);
            var error = await stderr.ConfigureAwait(false);
            if (p.ExitCode != 0)
            {
                // "credentials not found in native keychain": the helper simply has nothing for this server.
                if (!output.Contains(NotFound, StringComparison.OrdinalIgnoreCase) && !error.Contains(NotFound, StringComparison.OrdinalIgnoreCase))
                    _log.LogWarning("docker credential helper {Helper} failed for {Server} (exit {ExitCode}): {Error}",
                        path, server, p.ExitCode, FirstLine(error.Length > 0 ? error : output));
                return null;
            }
            return Parse(output, path, server);
        }
        catch (OperationCanceledException)
        {
            try { p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            _log.LogWarning("docker credential helper {Helper} did not answer for {Server} within {Timeout} s; killed", path, server, _timeout.TotalSeconds);
            return null;
        }
        catch (IOException e)
        {
            _log.LogWarning("docker credential helper {Helper} for {Server}: {Error}", path, server, e.Message);
            return null;
        }
        finally
        {
            try { p.Dispose(); } catch (IOException) { /* its stdin pipe, broken by a helper that did not read it */ }
        }
    }

    private RegistryCredential? Parse(string output, string path, string server)
    {
        try
        {
            using var doc = JsonDocument.Parse(output);
            var root = doc.RootElement;
            string? user = Str(root, "Username"), secret = Str(root, "Secret");
            if (string.IsNullOrEmpty(secret)) return null;
            return user == "<token>" ? new RegistryCredential(null, null, secret) : new RegistryCredential(user, secret);
        }
        catch (JsonException)
        {
            // The output holds the secret: say only that it was not JSON.
            _log.LogWarning("docker credential helper {Helper} answered for {Server} with something that is not JSON", path, server);
            return null;
        }
    }

    private static string? Str(JsonElement e, string name)
        => e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static string FirstLine(string s)
    {
        s = s.Trim();
        var nl = s.IndexOf('\n');
        if (nl >= 0) s = s[..nl];
        return s.Length > 200 ? s[..200] : s;
    }

    private string? Find(string name)
    {
        foreach (var dir in _searchPath.Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            var candidate = Path.Combine(dir, name);
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }
}
