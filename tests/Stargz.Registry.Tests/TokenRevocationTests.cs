using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>
/// A Bearer token the registry stops accepting while it still has most of its expires_in to run: the token server
/// rotates its signing key and the real docker-registry is restarted trusting only the new key (what a key rotation or
/// a revocation does to a running client). The client must notice the 401, fetch one new token and finish the read.
/// </summary>
public class TokenRevocationTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Revoked_token_still_inside_expires_in_is_fetched_again_once_and_reads_succeed()
    {
        Requires.Command("docker-registry");
        using var dir = new TempDir("reg-token-revoke");
        var storage = dir.Sub("storage");
        PushedImage img;
        await using (var plain = await LocalRegistry.StartAsync(storageDir: storage))
            img = await PushedImage.PushAsync(plain.BaseUrl, "test/app");

        await using var tokens = await TokenServer.StartAsync(dir.Path);
        tokens.ExpiresIn = 3600;
        var authYaml = LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile);
        var registry = await LocalRegistry.StartAsync(authYaml: authYaml, storageDir: storage);
        try
        {
            using var client = new RegistryClient(SharedRegistry.FastRetries());
            var reference = ImageReference.Parse($"{registry.Host}/{img.Repository}:{img.Tag}");
            var blob = await client.OpenBlobAsync(reference, img.LayerDigests[0], Ct);
            var first = new byte[4096];
            await blob.ReadAtAsync(0, first, Ct);
            Assert.Equal(img.Layers[0].AsSpan(0, 4096).ToArray(), first);
            Assert.Equal(1, tokens.Requests);

            // A token of the old key, fetched by hand, to show the registry really refuses it after the rotation.
            using var http = new HttpClient();
            var oldToken = await FetchTokenAsync(http, tokens, img.Repository);
            await tokens.RotateKeyAsync();
            var port = registry.Port;
            await registry.DisposeAsync();
            registry = await LocalRegistry.StartAsync(authYaml: authYaml, storageDir: storage, port: port);
            using (var probe = new HttpRequestMessage(HttpMethod.Head, $"{registry.BaseUrl}/v2/{img.Repository}/blobs/{img.LayerDigests[0]}"))
            {
                probe.Headers.Authorization = new AuthenticationHeaderValue("Bearer", oldToken);
                using var refused = await http.SendAsync(probe, Ct);
                Assert.Equal(HttpStatusCode.Unauthorized, refused.StatusCode);
            }
            var tokensBefore = tokens.Requests;

            // Concurrent reads of different ranges all hit the 401 with the cached token; one new token serves them all.
            var reads = Enumerable.Range(0, 4).Select(i => Task.Run(async () =>
            {
                var off = 100_000 + i * 50_000;
                var b = new byte[20_000];
                await blob.ReadAtAsync(off, b, Ct);
                Assert.Equal(img.Layers[0].AsSpan(off, b.Length).ToArray(), b);
            }, Ct)).ToList();
            await Task.WhenAll(reads);
            Assert.Equal(1, tokens.Requests - tokensBefore);

            // And the new token is cached again: a further read costs no token request.
            await blob.ReadAtAsync(5, first, Ct);
            Assert.Equal(img.Layers[0].AsSpan(5, 4096).ToArray(), first);
            Assert.Equal(1, tokens.Requests - tokensBefore);
        }
        finally
        {
            await registry.DisposeAsync();
        }
    }

    private static async Task<string> FetchTokenAsync(HttpClient http, TokenServer tokens, string repository)
    {
        var url = $"{tokens.Realm}?service={TokenServer.Service}&scope={Uri.EscapeDataString($"repository:{repository}:pull")}";
        var json = await http.GetStringAsync(url, Ct);
        using var doc = JsonDocument.Parse(json);
        return doc.RootElement.GetProperty("token").GetString()!;
    }
}
