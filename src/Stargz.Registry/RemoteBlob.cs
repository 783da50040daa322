using System.Buffers;
using System.Net;
using System.Net.Http.Headers;
using Microsoft.Extensions.Logging;

namespace Stargz.Registry;

internal readonly record struct FlightKey(string Repository, string Digest, long Offset, int Length);

internal sealed class Flight
{
    public required Task<Memory<byte>> Task;
    public int Refs;
    public bool Done;
    // The fetched bytes: a pooled array, or mapped memory for a big range (see MappedMemory).
    public byte[]? Array;
    public MappedMemory? Mapped;

    /// <summary>Under the flights' lock, once the last reader copied out (or the fetch failed).</summary>
    public void Free()
    {
        if (Array != null) ArrayPool<byte>.Shared.Return(Array);
        ((IDisposable?)Mapped)?.Dispose();
        Array = null;
        Mapped = null;
    }
}

/// <summary>One byte range of a blob and where its bytes go.</summary>
public readonly record struct BlobRange(long Offset, Memory<byte> Destination)
{
    public long End => Offset + Destination.Length;
}

/// <summary>
/// A blob in a registry, read by ranges. Thread-safe. Reads go to the endpoint (mirror or origin) that
/// answered HEAD, through a storage redirect while it keeps working; identical concurrent reads share
/// one request.
/// </summary>
public sealed class RemoteBlob
{
    private readonly RegistryTransport _transport;
    private readonly Dictionary<FlightKey, Flight> _flights;
    private readonly ImageReference _repo;
    private readonly IReadOnlyList<Endpoint> _endpoints;
    private readonly string _scope;
    private readonly string _subject;
    private volatile int _endpointIndex;
    private volatile string? _redirect;
    private long _requests;
    private long _bytes;

    /// <param name="flights">the client's in-flight shared reads: concurrent reads of one range through any of its blobs share one fetch.</param>
    internal RemoteBlob(RegistryTransport transport, Dictionary<FlightKey, Flight> flights, ImageReference repo, string digest, long size,
        IReadOnlyList<Endpoint> endpoints, int endpointIndex, string scope, string? redirect)
    {
        _transport = transport; _flights = flights; _repo = repo; Digest = digest; Size = size; _endpoints = endpoints;
        _endpointIndex = endpointIndex; _scope = scope; _redirect = redirect;
        _subject = $"{repo.Name}@{digest}";
    }

    public string Digest { get; }
    public long Size { get; }
    public ImageReference Repository => _repo;
    /// <summary>Host of the endpoint currently serving this blob.</summary>
    public string Host => _endpoints[_endpointIndex].Host;
    /// <summary>The storage URL the registry redirected to, while it is being used.</summary>
    public string? RedirectUrl => _redirect;
    /// <summary>HTTP requests this blob made (retries, redirects and fallbacks included).</summary>
    public long RequestCount => Interlocked.Read(ref _requests);
    /// <summary>Body bytes this blob received.</summary>
    public long BytesFetched => Interlocked.Read(ref _bytes);

    // ---------------------------------------------------------------- single range + single-flight

    /// <summary>Fills <paramref name="destination"/> with the blob's bytes at <paramref name="offset"/>, or throws.</summary>
    public ValueTask ReadAtAsync(long offset, Memory<byte> destination, CancellationToken ct = default)
    {
        CheckBounds(offset, destination.Length);
        if (destination.Length == 0) return ValueTask.CompletedTask;
        return new ValueTask(ReadSharedAsync(offset, destination, ct));
    }

    /// <summary>
    /// Like <see cref="ReadAtAsync"/>, but straight into <paramref name="destination"/> and not shared with concurrent
    /// reads of the same range (cancelled by <paramref name="ct"/>, retried as any read): for a caller that fetches each
    /// range once already (the layer's single-flight chunk claims), which so saves a buffer of the range's size and a copy.
    /// <paramref name="arrived"/>, if given, is called as the body comes with how many leading bytes of
    /// <paramref name="destination"/> hold the range's bytes by then (from 0 again when an attempt is retried; bytes
    /// written again are the same bytes), so the caller can use the front of a big range before its end arrives.
    /// </summary>
    public Task ReadAtUnsharedAsync(long offset, Memory<byte> destination, CancellationToken ct = default, Action<int>? arrived = null)
    {
        CheckBounds(offset, destination.Length);
        return destination.Length == 0 ? Task.CompletedTask : FetchSingleAsync(offset, destination, ct, arrived);
    }

    // Concurrent reads of the same range of the same blob in the same repository (= token scope), through
    // any RemoteBlob of this client, share one fetch into a pooled buffer; each caller copies out and the
    // last one out returns the buffer. The shared fetch is bounded by its own timeouts, not by one caller.
    private async Task ReadSharedAsync(long offset, Memory<byte> destination, CancellationToken ct)
    {
        var key = new FlightKey(_repo.Name, Digest, offset, destination.Length);
        var flights = _flights;
        Flight f;
        lock (flights)
        {
            if (flights.TryGetValue(key, out var existing))
            {
                f = existing;
                f.Refs++;
            }
            else
            {
                f = new Flight { Task = null!, Refs = 1 };
                flights[key] = f;
                f.Task = FetchIntoPooledAsync(key, f);
            }
        }
        try
        {
            var buf = await f.Task.WaitAsync(ct).ConfigureAwait(false);
            buf.Span.CopyTo(destination.Span);
        }
        finally
        {
            Release(f);
        }
    }

    private async Task<Memory<byte>> FetchIntoPooledAsync(FlightKey key, Flight f)
    {
        await Task.Yield(); // leave the lock before any I/O
        Memory<byte> buf;
        // A big range (a background batch of megabytes) in mapped memory, unmapped once read: pooled, such arrays
        // stayed resident, one per thread that had returned one.
        if (key.Length >= MappedMemory.UseFrom) buf = (f.Mapped = new MappedMemory(key.Length)).Memory;
        else buf = (f.Array = ArrayPool<byte>.Shared.Rent(key.Length)).AsMemory(0, key.Length);
        var ok = false;
        try
        {
            await FetchSingleAsync(key.Offset, buf, CancellationToken.None).ConfigureAwait(false);
            ok = true;
            return buf;
        }
        finally
        {
            lock (_flights)
            {
                _flights.Remove(key);
                f.Done = true;
                if (!ok || f.Refs == 0) f.Free();
            }
        }
    }

    private void Release(Flight f)
    {
        lock (_flights)
        {
            f.Refs--;
            // Done: the fetch has ended and the flight is no longer listed, so no reader can come; a failed one was freed.
            if (f.Refs == 0 && f.Done) f.Free();
        }
    }

    private void CheckBounds(long offset, int length)
    {
        if (offset < 0 || length < 0 || offset + length > Size)
            throw new ArgumentOutOfRangeException(nameof(offset), $"range {offset}+{length} is outside blob {_subject} of {Size} bytes");
    }

    /// <summary>One single-range GET with retries, redirect reuse and endpoint fallback.</summary>
    private Task FetchSingleAsync(long offset, Memory<byte> dest, CancellationToken ct, Action<int>? arrived = null)
    {
        return RunAsync(async (ep, a) =>
        {
            var rangeHeader = new RangeHeaderValue(offset, offset + dest.Length - 1);
            using var resp = await GetAsync(ep, rangeHeader, a).ConfigureAwait(false);
            await using var body = await resp.Content.ReadAsStreamAsync(a.Token).ConfigureAwait(false);
            if (resp.StatusCode == HttpStatusCode.OK)
            {
                // Server ignored Range: skip to the offset in the full body.
                await SkipAsync(body, offset, a).ConfigureAwait(false);
            }
            else
            {
                var cr = resp.Content.Headers.ContentRange;
                if (cr?.From != offset)
                    throw new RegistryException($"{ep.Host} answered range {cr} for {offset}-{offset + dest.Length - 1} of {_subject}",
                        resp.StatusCode, ep.Host, _subject);
            }
            await ReadExactlyAsync(body, dest, ep.Host, a, arrived).ConfigureAwait(false);
            return true;
        }, ct);
    }

    private async Task SkipAsync(Stream s, long n, Attempt a)
    {
        var ct = a.Token;
        var buf = ArrayPool<byte>.Shared.Rent(65536);
        try
        {
            while (n > 0)
            {
                var r = await s.ReadAsync(buf.AsMemory(0, (int)Math.Min(n, buf.Length)), ct).ConfigureAwait(false);
                if (r == 0) throw new TransientRegistryException($"body of {_subject} ended early", null, Host, _subject);
                a.Progress();
                CountBytes(r);
                n -= r;
            }
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
    }

    private async ValueTask ReadExactlyAsync(Stream s, Memory<byte> dest, string host, Attempt a, Action<int>? arrived = null)
    {
        var ct = a.Token;
        var got = 0;
        while (got < dest.Length)
        {
            var r = await s.ReadAsync(dest[got..], ct).ConfigureAwait(false);
            if (r == 0)
                throw new TransientRegistryException($"body of {_subject} from {host} ended after {got} of {dest.Length} bytes", null, host, _subject);
            a.Progress();
            got += r;
            CountBytes(r);
            arrived?.Invoke(got);
        }
    }

    private void CountBytes(long n)
    {
        Interlocked.Add(ref _bytes, n);
        _transport.CountBytes(n);
    }

    /// <summary>
    /// GET of the blob with a Range header: through the remembered redirect if any (no registry auth sent
    /// there), else through the registry, following and remembering a redirect. Returns a 200/206 response.
    /// A failing redirect URL is forgotten so the next attempt asks the registry for a fresh one.
    /// </summary>
    private async Task<HttpResponseMessage> GetAsync(Endpoint ep, RangeHeaderValue range, Attempt a)
    {
        var ct = a.Token;
        var redirect = _redirect;
        if (redirect is not null)
        {
            HttpResponseMessage? r = null;
            try
            {
                r = await SendPlainAsync(ep, redirect, range, ct).ConfigureAwait(false);
                a.Progress();
                if (r.StatusCode is HttpStatusCode.OK or HttpStatusCode.PartialContent) return r;
                _transport.Logger.LogInformation("redirect URL for {Subject} answered {Status}; asking {Host} again", _subject, (int)r.StatusCode, ep.Host);
            }
            catch (Exception e) when (e is HttpRequestException or IOException)
            {
                _transport.Logger.LogInformation("redirect URL for {Subject} failed ({Error}); asking {Host} again", _subject, e.Message, ep.Host);
            }
            catch (OperationCanceledException)
            {
                // Stalled (or cancelled): the next try asks the registry for a fresh URL rather than this one again.
                r?.Dispose();
                Interlocked.CompareExchange(ref _redirect, null, redirect);
                throw;
            }
            r?.Dispose();
            Interlocked.CompareExchange(ref _redirect, null, redirect);
        }
        var url = ep.Url(_repo.Repository, "blobs", Digest);
        var resp = await _transport.SendAsync(ep, () =>
        {
            var m = new HttpRequestMessage(HttpMethod.Get, url);
            m.Headers.Range = range;
            return m;
        }, _scope, _subject, ct, _repo).ConfigureAwait(false);
        a.Progress();
        Interlocked.Increment(ref _requests);
        if (RegistryTransport.IsRedirect(resp.StatusCode) && resp.Headers.Location is { } loc)
        {
            var target = new Uri(new Uri(url), loc).AbsoluteUri;
            resp.Dispose();
            _redirect = target;
            resp = await SendPlainAsync(ep, target, range, ct).ConfigureAwait(false);
            a.Progress();
            if (resp.StatusCode is not (HttpStatusCode.OK or HttpStatusCode.PartialContent))
            {
                Interlocked.CompareExchange(ref _redirect, null, target);
                using (resp)
                {
                    RegistryTransport.ThrowForStatus(resp, new Uri(target).Authority, _subject);
                    throw new TransientRegistryException($"redirect target for {_subject} answered {(int)resp.StatusCode}", resp.StatusCode, ep.Host, _subject);
                }
            }
            return resp;
        }
        if (resp.StatusCode is HttpStatusCode.OK or HttpStatusCode.PartialContent) return resp;
        using (resp)
        {
            if (resp.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
                throw new RegistryException($"{ep.Host} cannot serve range {range} of {_subject} ({Size} bytes)", resp.StatusCode, ep.Host, _subject);
            RegistryTransport.ThrowForStatus(resp, ep.Host, _subject);
            throw new RegistryException($"{ep.Host} answered {(int)resp.StatusCode} for {_subject}", resp.StatusCode, ep.Host, _subject);
        }
    }

    private async Task<HttpResponseMessage> SendPlainAsync(Endpoint ep, string url, RangeHeaderValue range, CancellationToken ct)
    {
        using var req = new HttpRequestMessage(HttpMethod.Get, url);
        req.Headers.Range = range;
        _transport.CountRequest();
        Interlocked.Increment(ref _requests);
        return await ep.Client.SendAsync(req, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
    }

    /// <summary>Runs a fetch on the current endpoint with retries; on failure falls back to later endpoints and stays there.</summary>
    private async Task RunAsync(Func<Endpoint, Attempt, Task<bool>> op, CancellationToken ct)
    {
        await _transport.OnEndpointsAsync(_endpoints, _endpointIndex, _subject, async (ep, a) =>
        {
            var idx = IndexOf(ep);
            if (idx != _endpointIndex)
            {
                // A later endpoint serves this blob from now on; its redirect (if any) is its own.
                _endpointIndex = idx;
                _redirect = null;
            }
            return await op(ep, a).ConfigureAwait(false);
        }, ct).ConfigureAwait(false);
    }

    private int IndexOf(Endpoint ep)
    {
        for (var i = 0; i < _endpoints.Count; i++) if (ReferenceEquals(_endpoints[i], ep)) return i;
        return 0;
    }

    // ---------------------------------------------------------------- liveness

    /// <summary>
    /// Cheap liveness check: a one-byte read through the current path. If that fails the redirect is
    /// dropped and the registry asked again (refreshing the redirect URL and connection).
    /// </summary>
    public async Task CheckAsync(CancellationToken ct = default)
    {
        var one = new byte[1];
        try
        {
            await FetchSingleAsync(0, one, ct).ConfigureAwait(false);
        }
        catch (RegistryException) when (_redirect is not null && !ct.IsCancellationRequested)
        {
            _redirect = null;
            await FetchSingleAsync(0, one, ct).ConfigureAwait(false);
        }
    }

    // ---------------------------------------------------------------- multi-range

    private const int SingleRangeParallelism = 4;

    private struct Group
    {
        public long Start, End;   // [Start, End)
        public int First, Count;  // into the sorted index array
        public bool Done;
    }

    /// <summary>
    /// Fills every range. Overlapping/adjacent ranges are merged; the rest go in one
    /// <c>multipart/byteranges</c> request (per <see cref="BlobOptions.MaxRangesPerRequest"/>) where the host
    /// supports it, else one request per merged range. A host that answers a multi-range request with a
    /// whole body or a broken multipart is remembered and gets single ranges afterwards.
    /// </summary>
    public async Task ReadRangesAsync(IReadOnlyList<BlobRange> ranges, CancellationToken ct = default)
    {
        var n = ranges.Count;
        if (n == 0) return;
        for (var i = 0; i < n; i++) CheckBounds(ranges[i].Offset, ranges[i].Destination.Length);
        if (n == 1)
        {
            await ReadAtAsync(ranges[0].Offset, ranges[0].Destination, ct).ConfigureAwait(false);
            return;
        }
        var order = ArrayPool<int>.Shared.Rent(n);
        var keys = ArrayPool<long>.Shared.Rent(n);
        var groups = ArrayPool<Group>.Shared.Rent(n);
        try
        {
            for (var i = 0; i < n; i++) { order[i] = i; keys[i] = ranges[i].Offset; }
            Array.Sort(keys, order, 0, n);
            var g = 0;
            for (var i = 0; i < n; i++)
            {
                var r = ranges[order[i]];
                if (r.Destination.Length == 0) continue;
                if (g > 0 && r.Offset <= groups[g - 1].End)
                {
                    ref var last = ref groups[g - 1];
                    if (r.End > last.End) last.End = r.End;
                    last.Count = i - last.First + 1;
                }
                else
                {
                    groups[g++] = new Group { Start = r.Offset, End = r.End, First = i, Count = 1 };
                }
            }
            var single = g == 1 || _transport.IsSingleRangeHost(CurrentRangeHost());
            if (!single)
            {
                var per = Math.Max(1, _transport.Blob.MaxRangesPerRequest);
                for (var b = 0; b < g; b += per)
                {
                    var count = Math.Min(per, g - b);
                    if (count == 1 || _transport.IsSingleRangeHost(CurrentRangeHost())) break;
                    await FetchMultiAsync(ranges, order, new ArraySegment<Group>(groups, b, count), ct).ConfigureAwait(false);
                }
            }
            // Whatever is not done yet (single-range host, fallback, leftovers) goes one merged range at a time.
            // A few at a time: enough to hide latency without flooding a host that only does single ranges.
            var window = new List<Task>(SingleRangeParallelism);
            for (var i = 0; i < g; i++)
            {
                if (groups[i].Done) continue;
                window.Add(FetchGroupSingleAsync(ranges, order, groups[i], ct));
                if (window.Count == SingleRangeParallelism)
                {
                    await Task.WhenAll(window).ConfigureAwait(false);
                    window.Clear();
                }
            }
            await Task.WhenAll(window).ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<int>.Shared.Return(order);
            ArrayPool<long>.Shared.Return(keys);
            ArrayPool<Group>.Shared.Return(groups);
        }
    }

    private string CurrentRangeHost()
    {
        var r = _redirect;
        return r is not null && Uri.TryCreate(r, UriKind.Absolute, out var u) ? u.Authority : Host;
    }

    private async Task FetchGroupSingleAsync(IReadOnlyList<BlobRange> ranges, int[] order, Group grp, CancellationToken ct)
    {
        if (grp.Count == 1)
        {
            var r = ranges[order[grp.First]];
            await ReadAtAsync(r.Offset, r.Destination, ct).ConfigureAwait(false);
            return;
        }
        var len = checked((int)(grp.End - grp.Start));
        var buf = ArrayPool<byte>.Shared.Rent(len);
        try
        {
            await ReadAtAsync(grp.Start, buf.AsMemory(0, len), ct).ConfigureAwait(false);
            for (var k = 0; k < grp.Count; k++)
            {
                var r = ranges[order[grp.First + k]];
                buf.AsSpan((int)(r.Offset - grp.Start), r.Destination.Length).CopyTo(r.Destination.Span);
            }
        }
        finally { ArrayPool<byte>.Shared.Return(buf); }
    }

    private async Task FetchMultiAsync(IReadOnlyList<BlobRange> ranges, int[] order, ArraySegment<Group> batch, CancellationToken ct)
    {
        var header = new RangeHeaderValue();
        for (var i = 0; i < batch.Count; i++) header.Ranges.Add(new RangeItemHeaderValue(batch[i].Start, batch[i].End - 1));
        await RunAsync(async (ep, a) =>
        {
            var tct = a.Token;
            using var resp = await GetAsync(ep, header, a).ConfigureAwait(false);
            var rangeHost = resp.RequestMessage?.RequestUri?.Authority ?? ep.Host;
            if (resp.StatusCode == HttpStatusCode.OK)
            {
                // Whole body for a multi-range request: this host does not do ranges the way we need.
                _transport.MarkSingleRangeHost(rangeHost);
                return false;
            }
            await using var body = await resp.Content.ReadAsStreamAsync(tct).ConfigureAwait(false);
            var ctype = resp.Content.Headers.ContentType;
            if (ctype?.MediaType is not null && ctype.MediaType.Equals("multipart/byteranges", StringComparison.OrdinalIgnoreCase))
            {
                string? boundary = null;
                foreach (var p in ctype.Parameters)
                    if (p.Name.Equals("boundary", StringComparison.OrdinalIgnoreCase)) boundary = p.Value?.Trim('"');
                if (string.IsNullOrEmpty(boundary))
                {
                    _transport.MarkSingleRangeHost(rangeHost);
                    return false;
                }
                using var reader = new MultipartReader(body, boundary, a);
                while (true)
                {
                    var part = await reader.NextPartAsync(tct).ConfigureAwait(false);
                    if (part is null) break;
                    var (from, to) = part.Value;
                    await CopyPartAsync(reader, ranges, order, batch, from, to, ep.Host, tct).ConfigureAwait(false);
                }
            }
            else
            {
                // A single 206 part: the server merged our ranges (or served only one).
                var cr = resp.Content.Headers.ContentRange;
                if (cr?.From is not long from || cr.To is not long to)
                {
                    _transport.MarkSingleRangeHost(rangeHost);
                    return false;
                }
                using var reader = new MultipartReader(body, null, a);
                await CopyPartAsync(reader, ranges, order, batch, from, to, ep.Host, tct).ConfigureAwait(false);
            }
            return true;
        }, ct).ConfigureAwait(false);
    }

    /// <summary>Streams one part [from, to] into every destination it overlaps; marks groups it covers whole.</summary>
    private async Task CopyPartAsync(MultipartReader reader, IReadOnlyList<BlobRange> ranges, int[] order, ArraySegment<Group> batch,
        long from, long to, string host, CancellationToken ct)
    {
        var pos = from;
        var end = to + 1;
        // First group that may overlap: groups are sorted and disjoint.
        var gi = 0;
        while (gi < batch.Count && batch[gi].End <= from) gi++;
        while (pos < end)
        {
            var chunk = await reader.ReadBodyAsync((int)Math.Min(end - pos, int.MaxValue), ct).ConfigureAwait(false);
            if (chunk.Length == 0)
                throw new TransientRegistryException($"multipart body of {_subject} from {host} ended at {pos} inside part {from}-{to}", null, host, _subject);
            CountBytes(chunk.Length);
            var cEnd = pos + chunk.Length;
            for (var k = gi; k < batch.Count && batch[k].Start < cEnd; k++)
            {
                var grp = batch[k];
                if (grp.End <= pos) continue;
                for (var j = 0; j < grp.Count; j++)
                {
                    var r = ranges[order[grp.First + j]];
                    var s = Math.Max(pos, r.Offset);
                    var e = Math.Min(cEnd, r.End);
                    if (s >= e) continue;
                    chunk.Span.Slice((int)(s - pos), (int)(e - s)).CopyTo(r.Destination.Span.Slice((int)(s - r.Offset)));
                }
            }
            pos = cEnd;
        }
        var arr = batch.Array!;
        for (var k = gi; k < batch.Count && batch[k].Start <= to; k++)
            if (batch[k].Start >= from && batch[k].End <= end) arr[batch.Offset + k].Done = true;
    }
}
