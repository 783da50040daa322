using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Stargz.Registry.Tests.Infra;
using Stargz.TestSupport;

namespace Stargz.Registry.Tests;

/// <summary>The push side (blob HEAD, monolithic and chunked uploads, cross-repo mounts, manifest PUT) against a real docker-registry.</summary>
public class PushTests(SharedRegistry shared) : IClassFixture<SharedRegistry>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static byte[] Random(int size, int seed)
    {
        var b = new byte[size];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static string Sha(byte[] b) => "sha256:" + Convert.ToHexStringLower(SHA256.HashData(b));

    /// <summary>A stream that cannot seek and returns short reads, as a pipe or a network body would.</summary>
    private sealed class TrickleStream(byte[] data) : Stream
    {
        private int _pos;
        public override int Read(byte[] buffer, int offset, int count)
        {
            var n = Math.Min(Math.Min(count, 100_000), data.Length - _pos);
            Array.Copy(data, _pos, buffer, offset, n);
            _pos += n;
            return n;
        }
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => _pos; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    private static async Task<byte[]> Download(RegistryClient c, ImageReference r, string digest)
    {
        using var ms = new MemoryStream();
        await c.DownloadBlobAsync(r, digest, ms, Ct);
        return ms.ToArray();
    }

    [Fact]
    public async Task Monolithic_push_from_a_seekable_stream_then_exists_and_reads_back()
    {
        var (reg, _) = await shared.GetAsync();
        using var client = new RegistryClient();
        var r = ImageReference.Parse($"{reg.Host}/push/mono:latest");
        var data = Random(5_000_000, 11);
        var digest = Sha(data);
        Assert.False(await client.BlobExistsAsync(r, digest, Ct));

        using var fs = new MemoryStream(data);
        var res = await client.PushBlobAsync(r, fs, digest, data.Length, ct: Ct);
        Assert.Equal(BlobPushOutcome.UploadedMonolithic, res.Outcome);
        Assert.Equal(digest, res.Digest);
        Assert.Equal(data.Length, res.Size);
        Assert.Equal(data.Length, await client.StatBlobAsync(r, digest, Ct));
        Assert.Equal(data, await Download(client, r, digest));

        // Pushing again sends nothing.
        fs.Position = 0;
        var again = await client.PushBlobAsync(r, fs, digest, data.Length, ct: Ct);
        Assert.Equal(BlobPushOutcome.Existed, again.Outcome);
    }

    [Fact]
    public async Task Chunked_push_of_an_unseekable_stream_computes_the_digest()
    {
        var (reg, _) = await shared.GetAsync();
        using var client = new RegistryClient();
        var r = ImageReference.Parse($"{reg.Host}/push/chunked:latest");
        var data = Random(2 * 1_048_576 + 12_345, 12);
        var requestsBefore = client.RequestCount;
        var res = await client.PushBlobAsync(r, new TrickleStream(data), options: new BlobPushOptions { ChunkSize = 1 << 20 }, ct: Ct);
        Assert.Equal(BlobPushOutcome.UploadedChunked, res.Outcome);
        Assert.Equal(Sha(data), res.Digest);
        Assert.Equal(data.Length, res.Size);
        // POST + three PATCHes + PUT.
        Assert.Equal(5, client.RequestCount - requestsBefore);
        Assert.Equal(data, await Download(client, r, res.Digest));

        // Forced chunked with a known digest, an exact multiple of the chunk size.
        var two = Random(2 << 20, 13);
        var res2 = await client.PushBlobAsync(r, new MemoryStream(two), Sha(two), two.Length,
            new BlobPushOptions { ChunkSize = 1 << 20, ForceChunked = true }, Ct);
        Assert.Equal(BlobPushOutcome.UploadedChunked, res2.Outcome);
        Assert.Equal(two, await Download(client, r, Sha(two)));
    }

    [Fact]
    public async Task Wrong_digest_is_refused_and_nothing_is_stored()
    {
        var (reg, _) = await shared.GetAsync();
        using var client = new RegistryClient();
        var r = ImageReference.Parse($"{reg.Host}/push/wrong:latest");
        var data = Random(300_000, 14);
        var claimed = Sha(Random(10, 15));

        var mono = await Assert.ThrowsAsync<DigestMismatchException>(() => client.PushBlobAsync(r, new MemoryStream(data), claimed, data.Length, ct: Ct));
        Assert.Contains(claimed, mono.Message);
        var chunked = await Assert.ThrowsAsync<DigestMismatchException>(() => client.PushBlobAsync(r, new TrickleStream(data), claimed,
            options: new BlobPushOptions { ChunkSize = 64 << 10 }, ct: Ct));
        Assert.Contains(Sha(data), chunked.Message);
        Assert.False(await client.BlobExistsAsync(r, claimed, Ct));
        Assert.False(await client.BlobExistsAsync(r, Sha(data), Ct));

        // A size that does not match the stream is refused before the commit too.
        await Assert.ThrowsAsync<DigestMismatchException>(() => client.PushBlobAsync(r, new TrickleStream(data), null, data.Length + 1,
            new BlobPushOptions { ChunkSize = 64 << 10 }, Ct));
        Assert.False(await client.BlobExistsAsync(r, Sha(data), Ct));
    }

    [Fact]
    public async Task Cross_repository_mount_links_an_existing_blob()
    {
        var (reg, _) = await shared.GetAsync();
        using var client = new RegistryClient();
        var a = ImageReference.Parse($"{reg.Host}/push/mount-a:latest");
        var b = ImageReference.Parse($"{reg.Host}/push/mount-b:latest");
        var data = Random(200_000, 16);
        var d = (await client.PushBlobAsync(a, data, ct: Ct)).Digest;
        Assert.False(await client.BlobExistsAsync(b, d, Ct));
        Assert.True(await client.MountBlobAsync(b, d, a.Repository, Ct));
        Assert.True(await client.BlobExistsAsync(b, d, Ct));
        Assert.Equal(data, await Download(client, b, d));
        // A blob the source repository does not have is not mounted.
        Assert.False(await client.MountBlobAsync(b, Sha(Random(10, 17)), a.Repository, Ct));
    }

    [Fact]
    public async Task Manifest_push_with_tag_resolves_back_with_its_media_type()
    {
        var (reg, _) = await shared.GetAsync();
        using var client = new RegistryClient();
        var r = ImageReference.Parse($"{reg.Host}/push/manifest:v2");
        var layer = Random(100_000, 18);
        var layerRes = await client.PushBlobAsync(r, layer, ct: Ct);
        var config = Encoding.UTF8.GetBytes("""{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}""");
        var cfgRes = await client.PushBlobAsync(r, config, ct: Ct);
        var manifest = JsonSerializer.SerializeToUtf8Bytes(new
        {
            schemaVersion = 2,
            mediaType = MediaTypes.OciManifest,
            config = new { mediaType = MediaTypes.OciConfig, digest = cfgRes.Digest, size = cfgRes.Size },
            layers = new[] { new { mediaType = "application/vnd.oci.image.layer.v1.tar+gzip", digest = layerRes.Digest, size = layerRes.Size } },
        });
        var digest = await client.PushManifestAsync(r, manifest, MediaTypes.OciManifest, ct: Ct);
        Assert.Equal(Sha(manifest), digest);

        var resolved = await client.ResolveAsync(r, null, Ct);
        Assert.Equal(digest, resolved.Digest);
        Assert.Equal(MediaTypes.OciManifest, resolved.MediaType);
        Assert.Equal(cfgRes.Digest, resolved.Config.Digest);
        Assert.Equal(layerRes.Digest, resolved.Layers.Single().Digest);
        Assert.Equal(manifest, resolved.Raw.ToArray());

        // The registry refuses a manifest whose blobs it does not have; the error names the subject.
        var broken = JsonSerializer.SerializeToUtf8Bytes(new
        {
            schemaVersion = 2,
            mediaType = MediaTypes.OciManifest,
            config = new { mediaType = MediaTypes.OciConfig, digest = cfgRes.Digest, size = cfgRes.Size },
            layers = new[] { new { mediaType = "application/vnd.oci.image.layer.v1.tar+gzip", digest = Sha(Random(5, 19)), size = 5 } },
        });
        var e = await Assert.ThrowsAnyAsync<RegistryException>(() => client.PushManifestAsync(r, broken, MediaTypes.OciManifest, "broken", Ct));
        Assert.Contains("push/manifest:broken", e.Message);
    }

    [Fact]
    public async Task Failed_upload_requests_are_retried_from_the_start_of_the_stream_or_with_the_same_chunk()
    {
        var (reg, _) = await shared.GetAsync();
        var puts = 0;
        var patches = 0;
        await using var proxy = await RegistryProxy.StartAsync(reg.BaseUrl, async (ctx, p) =>
        {
            // Keep the upload session URLs pointing at the proxy.
            ctx.Response.OnStarting(() =>
            {
                if (ctx.Response.Headers.Location.ToString() is { Length: > 0 } loc) ctx.Response.Headers.Location = loc.Replace(reg.Host, p.Host);
                return Task.CompletedTask;
            });
            var upload = ctx.Request.Path.Value!.Contains("/blobs/uploads/", StringComparison.Ordinal);
            var fail = upload && ((ctx.Request.Method == "PUT" && ctx.Request.ContentLength > 0 && Interlocked.Increment(ref puts) == 1)
                                  || (ctx.Request.Method == "PATCH" && Interlocked.Increment(ref patches) == 2));
            if (!fail) return false;
            await ctx.Request.Body.CopyToAsync(Stream.Null, ctx.RequestAborted); // the whole body went out, then the registry failed
            ctx.Response.StatusCode = 503;
            return true;
        });
        using var client = new RegistryClient(SharedRegistry.FastRetries());
        var r = ImageReference.Parse($"{proxy.Host}/push/retry:latest");

        var mono = Random(3_000_000, 23);
        var res = await client.PushBlobAsync(r, new MemoryStream(mono), Sha(mono), mono.Length, ct: Ct);
        Assert.Equal(BlobPushOutcome.UploadedMonolithic, res.Outcome);
        Assert.Equal(2, puts);
        Assert.Equal(mono, await Download(client, r, Sha(mono)));

        var chunked = Random((5 << 19) + 7, 24);
        var res2 = await client.PushBlobAsync(r, new TrickleStream(chunked), options: new BlobPushOptions { ChunkSize = 1 << 20 }, ct: Ct);
        Assert.Equal(BlobPushOutcome.UploadedChunked, res2.Outcome);
        Assert.Equal(4, patches); // three chunks, the second sent twice
        Assert.Equal(chunked, await Download(client, r, Sha(chunked)));
    }

    [Fact]
    public async Task Cancellation_stops_a_chunked_upload()
    {
        var (reg, _) = await shared.GetAsync();
        using var client = new RegistryClient();
        var r = ImageReference.Parse($"{reg.Host}/push/cancel:latest");
        var data = Random(4 << 20, 20);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        var s = new CancelAfterStream(new TrickleStream(data), 1 << 20, cts);
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => client.PushBlobAsync(r, s, options: new BlobPushOptions { ChunkSize = 256 << 10 }, ct: cts.Token));
        Assert.False(await client.BlobExistsAsync(r, Sha(data), Ct));
    }

    private sealed class CancelAfterStream(Stream inner, long after, CancellationTokenSource cts) : Stream
    {
        private long _n;
        public override int Read(byte[] buffer, int offset, int count)
        {
            var n = inner.Read(buffer, offset, count);
            _n += n;
            if (_n >= after) cts.Cancel();
            return n;
        }
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => _n; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }

    [Fact]
    public async Task Push_through_token_auth_asks_for_pull_push_and_the_mount_source_scope()
    {
        var dir = new TempDir("reg-token-push");
        await using var tokens = await TokenServer.StartAsync(dir.Path);
        tokens.RequiredCredentials = ("pusher", "s3cret");
        await using var p = await PreparedRegistry.StartAsync(dir,
            authYaml: LocalRegistry.TokenAuthYaml(tokens.Realm, TokenServer.Service, TokenServer.Issuer, tokens.RootCertFile));
        using var client = new RegistryClient(null, new StaticCredentialProvider().Add(p.Registry.Host, "pusher", "s3cret"));
        var r = ImageReference.Parse($"{p.Registry.Host}/team/pushed:v1");
        var data = Random(1_200_000, 21);
        var before = tokens.Requests;
        var res = await client.PushBlobAsync(r, new MemoryStream(data), Sha(data), data.Length, ct: Ct);
        Assert.Equal(BlobPushOutcome.UploadedMonolithic, res.Outcome);
        Assert.Contains("repository:team/pushed:pull,push", tokens.Scopes);
        Assert.Equal(1, tokens.Requests - before); // HEAD, POST and PUT share one token

        // Mount a layer of the prepared image into the new repository: one token for both repositories.
        Assert.True(await client.MountBlobAsync(r, p.Image.LayerDigests[1], p.Image.Repository, Ct));
        Assert.Contains($"repository:team/pushed:pull,push repository:{p.Image.Repository}:pull", tokens.Scopes);
        Assert.Equal(p.Image.Layers[1], await Download(client, r, p.Image.LayerDigests[1]));

        // Without credentials the push is refused with the host named.
        using var anon = new RegistryClient();
        var e = await Assert.ThrowsAsync<UnauthorizedException>(() => anon.PushBlobAsync(r, Random(10, 22), ct: Ct));
        Assert.Contains(p.Registry.Host, e.Message);
    }
}
