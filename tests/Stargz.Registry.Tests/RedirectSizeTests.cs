using Microsoft.AspNetCore.Http;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>
/// The size of a blob whose HEAD the registry redirects to another origin (a CDN or bucket): the size is the
/// target's, never the Content-Length of the redirect answer, through 302 and 307, through two hops, and from a
/// target that refuses HEAD (S3 URLs presigned for GET do) by asking it for one byte.
/// </summary>
public class RedirectSizeTests(SharedRegistry shared) : IClassFixture<SharedRegistry>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static bool IsBlob(HttpContext c) => c.Request.Path.Value!.Contains("/blobs/sha256:");

    /// <summary>A front that redirects every blob request (HEAD and GET) to <paramref name="target"/>, with a misleading
    /// Content-Length on the redirect answer itself.</summary>
    private static Task<RegistryProxy> RedirectingFrontAsync(string upstream, int status, Func<HttpContext, string> target)
        => RegistryProxy.StartAsync(upstream, async (ctx, _) =>
        {
            if (!IsBlob(ctx)) return false;
            ctx.Response.StatusCode = status;
            ctx.Response.Headers.Location = target(ctx);
            const string body = "see the Location header";
            ctx.Response.ContentLength = body.Length;
            if (ctx.Request.Method != "HEAD") await ctx.Response.WriteAsync(body);
            return true;
        });

    [Theory]
    [InlineData(302)]
    [InlineData(307)]
    public async Task Head_redirected_to_another_origin_gives_the_blobs_size(int status)
    {
        var (reg, img) = await shared.GetAsync();
        await using var front = await RedirectingFrontAsync(reg.BaseUrl, status, ctx => reg.BaseUrl + ctx.Request.Path);
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var reference = ImageReference.Parse($"{front.Host}/{img.Repository}");

        var blob = await client.OpenBlobAsync(reference, img.LayerDigests[0], Ct);
        Assert.Equal(img.Layers[0].Length, blob.Size);
        Assert.StartsWith(reg.BaseUrl + "/v2/", blob.RedirectUrl);
        Assert.Contains(front.Seen, s => s.Method == "HEAD" && s.Path.EndsWith(img.LayerDigests[0], StringComparison.Ordinal));
        var buf = new byte[3000];
        await blob.ReadAtAsync(img.Layers[0].Length - 3000, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(img.Layers[0].Length - 3000).ToArray(), buf);

        // The push path's HEAD (StatBlobAsync) answers the same size through the redirect.
        Assert.Equal(img.Layers[1].Length, await client.StatBlobAsync(reference, img.LayerDigests[1], Ct));
        // A small blob read whole through the redirect (configs are fetched this way).
        Assert.Equal(img.Layers[1], await client.FetchBlobBytesAsync(reference, img.LayerDigests[1], ct: Ct));
    }

    [Fact]
    public async Task Two_redirect_hops_are_followed_for_the_size()
    {
        var (reg, img) = await shared.GetAsync();
        // front -> cdn (302) -> registry
        await using var cdn = await RedirectingFrontAsync(reg.BaseUrl, 302, ctx => reg.BaseUrl + ctx.Request.Path);
        await using var front = await RedirectingFrontAsync(reg.BaseUrl, 307, ctx => cdn.BaseUrl + ctx.Request.Path);
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var blob = await client.OpenBlobAsync(ImageReference.Parse($"{front.Host}/{img.Repository}"), img.LayerDigests[1], Ct);
        Assert.Equal(img.Layers[1].Length, blob.Size);
        Assert.Contains(cdn.Seen, s => s.Method == "HEAD");
        Assert.StartsWith(reg.BaseUrl, blob.RedirectUrl);
        var buf = new byte[1000];
        await blob.ReadAtAsync(1234, buf, Ct);
        Assert.Equal(img.Layers[1].AsSpan(1234, 1000).ToArray(), buf);
    }

    [Fact]
    public async Task Redirect_target_that_refuses_head_gives_the_size_from_a_one_byte_get()
    {
        var (reg, img) = await shared.GetAsync();
        using var upstream = new HttpClient();
        var heads = 0;
        var rangedGets = new List<string>();
        // A bucket whose URLs are signed for GET only: HEAD is 403, GET (ranges too) is served from the registry.
        await using var bucket = await TestHttpServer.StartAsync(async ctx =>
        {
            if (ctx.Request.Method == "HEAD")
            {
                Interlocked.Increment(ref heads);
                ctx.Response.StatusCode = 403;
                return;
            }
            lock (rangedGets) rangedGets.Add(ctx.Request.Headers.Range.ToString());
            using var req = new HttpRequestMessage(HttpMethod.Get, $"{reg.BaseUrl}/v2/{img.Repository}/blobs/{ctx.Request.Path.Value!.Split('/')[^1]}");
            if (ctx.Request.Headers.Range.Count > 0) req.Headers.TryAddWithoutValidation("Range", ctx.Request.Headers.Range.ToString());
            using var resp = await upstream.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, ctx.RequestAborted);
            ctx.Response.StatusCode = (int)resp.StatusCode;
            foreach (var h in resp.Content.Headers) ctx.Response.Headers[h.Key] = h.Value.ToArray();
            await resp.Content.CopyToAsync(ctx.Response.Body, ctx.RequestAborted);
        });
        await using var front = await RedirectingFrontAsync(reg.BaseUrl, 307, ctx => $"{bucket.BaseUrl}/bucket/{ctx.Request.Path.Value!.Split('/')[^1]}");
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var reference = ImageReference.Parse($"{front.Host}/{img.Repository}");

        var blob = await client.OpenBlobAsync(reference, img.LayerDigests[0], Ct);
        Assert.Equal(img.Layers[0].Length, blob.Size);
        Assert.Equal(1, heads);
        lock (rangedGets) Assert.Equal(["bytes=0-0"], rangedGets);
        var buf = new byte[2048];
        await blob.ReadAtAsync(700_000, buf, Ct);
        Assert.Equal(img.Layers[0].AsSpan(700_000, 2048).ToArray(), buf);
        Assert.Equal(img.Layers[1].Length, await client.StatBlobAsync(reference, img.LayerDigests[1], Ct));
    }
}
