using Google.Protobuf;
using Grpc.Core;
using ContentApi = Containerd.Services.Content.V1;

namespace Stargz.Containerd;

/// <summary>
/// One content write into containerd (content.v1 Write, a bidirectional stream where each request gets one reply):
/// STAT with the ref and expected digest, WRITEs at increasing offsets, COMMIT with the labels. The stream has no
/// overall deadline (a layer can be large); instead every message must be answered within
/// <see cref="ContainerdTimeouts.WriteMessage"/>.
/// </summary>
public sealed class ContentIngest : IAsyncDisposable
{
    /// <summary>Data per WRITE message: well under containerd's 16 MiB receive limit.</summary>
    internal const int MessageBytes = 1 << 20;

    private readonly ContainerdClient _client;
    private readonly AsyncDuplexStreamingCall<ContentApi.WriteContentRequest, ContentApi.WriteContentResponse> _call;
    private readonly CancellationTokenSource _cts;
    private readonly string _expected;
    private readonly long _total;
    private bool _committed;
    private bool _wroteAny;

    public string Ref { get; }
    public long Offset { get; private set; }

    private ContentIngest(ContainerdClient client, AsyncDuplexStreamingCall<ContentApi.WriteContentRequest, ContentApi.WriteContentResponse> call,
        CancellationTokenSource cts, string ingestRef, string expected, long total)
    {
        _client = client; _call = call; _cts = cts; Ref = ingestRef; _expected = expected; _total = total;
    }

    internal static async Task<ContentIngest?> OpenAsync(ContainerdClient client, string ingestRef, string expected, long total, CancellationToken ct)
    {
        var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var call = client.Content.Write(new CallOptions(client.Headers(), null, cts.Token));
        var ingest = new ContentIngest(client, call, cts, ingestRef, expected, total);
        try
        {
            // STAT opens the writer. containerd answers AlreadyExists when it has the digest.
            var r = await ingest.SendAsync(new ContentApi.WriteContentRequest
            {
                Action = ContentApi.WriteAction.Stat, Ref = ingestRef, Expected = expected, Total = total,
            }, "start").ConfigureAwait(false);
            if (r is null)
            {
                await ingest.DisposeAsync().ConfigureAwait(false);
                return null;
            }
            ingest.Offset = r.Offset;
            return ingest;
        }
        catch
        {
            await ingest.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>Appends <paramref name="data"/>. The first write is at offset 0 whatever an earlier, broken ingest
    /// under the same ref left: containerd truncates then.</summary>
    public async Task WriteAsync(ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        ObjectDisposedException.ThrowIf(_committed, this);
        while (!data.IsEmpty)
        {
            ct.ThrowIfCancellationRequested();
            var n = Math.Min(MessageBytes, data.Length);
            var at = _wroteAny ? Offset : 0;
            var r = await SendAsync(new ContentApi.WriteContentRequest
            {
                Action = ContentApi.WriteAction.Write, Offset = at, Data = ByteString.CopyFrom(data.Span[..n]),
            }, "write").ConfigureAwait(false)
                ?? throw new ContainerdException($"content write {Ref}: containerd got {_expected} from elsewhere while we wrote it", StatusCode.AlreadyExists);
            _wroteAny = true;
            // containerd answers with its offset after the write: anything else means bytes went missing.
            if (r.Offset != at + n)
                throw new ContainerdException($"content write {Ref}: containerd is at offset {r.Offset}, expected {at + n}", StatusCode.DataLoss);
            Offset = r.Offset;
            data = data[n..];
        }
    }

    /// <summary>Commits with <paramref name="labels"/>; containerd checks size and digest. False when the content
    /// appeared meanwhile (another pull committed it first), which is as good.</summary>
    public async Task<bool> CommitAsync(IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        var req = new ContentApi.WriteContentRequest
        {
            Action = ContentApi.WriteAction.Commit, Offset = Offset, Total = _total, Expected = _expected,
        };
        foreach (var (k, v) in labels) req.Labels[k] = v;
        var r = await SendAsync(req, "commit").ConfigureAwait(false);
        _committed = true;
        return r is not null;
    }

    /// <summary>Sends one request and reads its reply; null on AlreadyExists.</summary>
    private async Task<ContentApi.WriteContentResponse?> SendAsync(ContentApi.WriteContentRequest req, string step)
    {
        _cts.CancelAfter(_client.Timeouts.WriteMessage);
        try
        {
            await _call.RequestStream.WriteAsync(req).ConfigureAwait(false);
            if (!await _call.ResponseStream.MoveNext(_cts.Token).ConfigureAwait(false))
                throw new ContainerdException($"content write {Ref} ({step}): containerd closed the stream", StatusCode.Internal);
            return _call.ResponseStream.Current;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.AlreadyExists)
        {
            return null;
        }
        catch (RpcException e)
        {
            if (e.StatusCode == StatusCode.Cancelled && _cts.IsCancellationRequested)
                throw new ContainerdException($"content write {Ref} ({step}): no answer within {_client.Timeouts.WriteMessage}", StatusCode.DeadlineExceeded, e);
            throw _client.Wrap($"content write {Ref} ({step})", e);
        }
        finally
        {
            _cts.CancelAfter(Timeout.InfiniteTimeSpan);
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (!_committed)
        {
            try { await _call.RequestStream.CompleteAsync().ConfigureAwait(false); }
            catch (Exception e) when (e is RpcException or InvalidOperationException or IOException or OperationCanceledException) { }
        }
        _call.Dispose();
        _cts.Dispose();
    }

    /// <summary>A write-only stream over the ingest, for code that downloads into a <see cref="Stream"/>.</summary>
    public Stream AsStream() => new IngestStream(this);

    private sealed class IngestStream(ContentIngest ingest) : Stream
    {
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => ingest.Offset; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) =>
            ingest.WriteAsync(buffer.AsMemory(offset, count), CancellationToken.None).GetAwaiter().GetResult();
        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            ingest.WriteAsync(buffer.AsMemory(offset, count), cancellationToken);
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) =>
            new(ingest.WriteAsync(buffer, cancellationToken));
    }
}
