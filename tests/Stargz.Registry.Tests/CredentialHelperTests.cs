using System.Diagnostics;
using Microsoft.Extensions.Logging;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>docker credential helpers named by config.json (credsStore, credHelpers), run as real programs.</summary>
public class CredentialHelperTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    /// <summary>Keeps what the helpers runner logs, for assertion messages.</summary>
    internal sealed class LogLines : ILogger
    {
        private readonly List<string> _lines = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (_lines) _lines.Add(formatter(state, exception));
        }
        public override string ToString() { lock (_lines) return string.Join("\n", _lines); }
    }

    private static async Task<DockerConfigCredentialProvider> ProviderAsync(TempDir dir, string json, CredentialHelpers helpers)
    {
        var cfg = Path.Combine(dir.Path, "config.json");
        await File.WriteAllTextAsync(cfg, json, Ct);
        return new DockerConfigCredentialProvider(cfg, TimeSpan.Zero, helpers);
    }

    [Fact]
    public async Task CredsStore_serves_every_host_a_token_user_is_an_identity_token_and_not_found_falls_back_to_auths()
    {
        using var dir = new TempDir("cred-store");
        var bin = dir.Sub("bin");
        CredentialHelperScript.Write(bin, "store", """
            read server
            case "$server" in
              tok.example) echo '{"ServerURL":"tok.example","Username":"<token>","Secret":"refresh-123"}' ;;
              https://index.docker.io/v1/) echo '{"ServerURL":"hub","Username":"hubuser","Secret":"hubpw"}' ;;
              *) echo "credentials not found in native keychain"; exit 1 ;;
            esac
            """);
        CredentialHelperScript.Write(bin, "special", """echo '{"Username":"sp","Secret":"sp-pw"}'""");
        var b64 = Convert.ToBase64String("fileuser:filepw"u8.ToArray());
        var log = new LogLines();
        var helpers = new CredentialHelpers(searchPath: bin, logger: log);
        var p = await ProviderAsync(dir, $$"""
            {"credsStore": "store", "credHelpers": {"https://special.example/v2/": "special"},
             "auths": {"plain.example": {"auth": "{{b64}}"}, "tok.example": {} } }
            """, helpers);

        var tok = await p.GetAsync("tok.example", Ct);
        Assert.True(tok != null, $"no credentials from the helper; it logged:\n{log}");
        Assert.Equal(("refresh-123", (string?)null), (tok.IdentityToken, tok.Username));
        Assert.Equal(("hubuser", "hubpw"), ((await p.GetAsync("registry-1.docker.io", Ct))!.Username, (await p.GetAsync("docker.io", Ct))!.Secret));
        Assert.Equal("sp", (await p.GetAsync("special.example", Ct))!.Username); // credHelpers wins over credsStore
        Assert.Equal("fileuser", (await p.GetAsync("plain.example", Ct))!.Username); // the store has nothing: auths
        Assert.Null(await p.GetAsync("nowhere.example", Ct));
        // Answers are reused: asking again runs nothing.
        var runs = helpers.Runs;
        Assert.Equal("refresh-123", (await p.GetAsync("tok.example", Ct))!.IdentityToken);
        Assert.Null(await p.GetAsync("nowhere.example", Ct));
        Assert.Equal(runs, helpers.Runs);
    }

    [Fact]
    public async Task A_helper_that_answers_without_reading_its_input_is_believed()
    {
        // Docker accepts it; writing the server address into its closed stdin then fails (EPIPE) now and then,
        // which once cost a CI run its credentials (about 1 lookup in 20 before the fix).
        using var dir = new TempDir("cred-noread");
        var bin = dir.Sub("bin");
        CredentialHelperScript.Write(bin, "noread", """exec 0<&-; echo '{"Username":"q","Secret":"s"}'""");
        var log = new LogLines();
        var helpers = new CredentialHelpers(searchPath: bin, cacheFor: TimeSpan.Zero, logger: log);
        var empty = 0;
        for (var i = 0; i < 100; i++)
            if (await helpers.GetAsync("noread", $"h{i}.example", Ct) is null) empty++;
        Assert.True(empty == 0, $"{empty} of 100 lookups came back empty; the runner logged:\n{log}");
    }

    [Fact]
    public async Task A_missing_failing_garbled_or_hanging_helper_gives_no_credentials_within_its_timeout()
    {
        using var dir = new TempDir("cred-bad");
        var bin = dir.Sub("bin");
        CredentialHelperScript.Write(bin, "fails", """echo "backend unreachable" >&2; exit 3""");
        CredentialHelperScript.Write(bin, "garbled", """echo 'not json, but maybe a secret'""");
        var pidFile = Path.Combine(dir.Path, "hang.pid");
        CredentialHelperScript.Write(bin, "hangs", $"echo $$ > '{pidFile}'; exec sleep 60");
        var helpers = new CredentialHelpers(searchPath: bin, timeout: TimeSpan.FromMilliseconds(500));
        var p = await ProviderAsync(dir, """
            {"credHelpers": {"a.example": "absent", "f.example": "fails", "g.example": "garbled", "h.example": "hangs"}}
            """, helpers);
        Assert.Null(await p.GetAsync("a.example", Ct));
        Assert.Null(await p.GetAsync("f.example", Ct));
        Assert.Null(await p.GetAsync("g.example", Ct));
        var sw = Stopwatch.StartNew();
        Assert.Null(await p.GetAsync("h.example", Ct));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(30), $"a hanging helper held the lookup for {sw.Elapsed}");
        // The hanging helper was killed, not left behind.
        var pid = int.Parse((await File.ReadAllTextAsync(pidFile, Ct)).Trim());
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (Directory.Exists($"/proc/{pid}") && !File.ReadAllText($"/proc/{pid}/stat").Contains(") Z ") && DateTime.UtcNow < deadline)
            await Task.Delay(50, Ct);
        Assert.True(!Directory.Exists($"/proc/{pid}") || File.ReadAllText($"/proc/{pid}/stat").Contains(") Z "), "the hanging helper is still running");
    }

    [Theory]
    [InlineData("""{"credsStore": "../../tmp/evil"}""", "credsStore")]
    [InlineData("""{"credHelpers": {"h": "a/b"}}""", "credHelpers[\"h\"]")]
    [InlineData("""{"credHelpers": {"h": 3}}""", "is not a string")]
    public async Task A_helper_name_that_is_not_a_plain_name_is_a_clear_error(string json, string expected)
    {
        using var dir = new TempDir("cred-name");
        var p = await ProviderAsync(dir, json, new CredentialHelpers(searchPath: dir.Path));
        var e = await Assert.ThrowsAsync<FormatException>(async () => await p.GetAsync("h", Ct));
        Assert.Contains(expected, e.Message);
    }
}
