using System.Buffers;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Threading.Channels;

namespace Stargz.Bench.Pull;

/// <summary>A loopback TCP forwarder to one port that counts the bytes sent back to its clients (TCP, not HTTP like
/// TestSupport's CountingProxy, so that it adds no HTTP parsing to the pulls it measures). With a delay or a bandwidth
/// it emulates a WAN path instead of passing bytes straight on: see <see cref="Link"/>.</summary>
public sealed class ByteCountingForwarder : IAsyncDisposable
{
    // Read size on a shaped path: also the pacing granularity (32 KiB take 1.3 ms at 200 Mbit/s).
    private const int ShapedChunk = 32 * 1024;
    // Chunks one direction of one connection may hold in its delay line before its reader stops reading (then TCP's
    // own flow control holds the sender back); only binds with a delay and no bandwidth limit.
    private const int MaxChunksInFlight = 512;

    private readonly TcpListener _listener;
    private readonly int _target;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accepting;
    private readonly Link? _down, _up;
    private readonly long _handshakeTicks;
    private long _toClients;
    private long _lastToClients = Stopwatch.GetTimestamp();

    private ByteCountingForwarder(int target, TimeSpan oneWayDelay, long bitsPerSecond)
    {
        _target = target;
        if (oneWayDelay > TimeSpan.Zero || bitsPerSecond > 0)
        {
            _down = new Link(oneWayDelay, bitsPerSecond);
            _up = new Link(oneWayDelay, bitsPerSecond);
            // A real connect costs a round trip (SYN, SYN-ACK) before the client's first byte leaves; here the kernel
            // completes the loopback handshake at once, so the client's first bytes are held back by that round trip.
            _handshakeTicks = 2 * Link.ToTicks(oneWayDelay);
        }
        _listener = new TcpListener(IPAddress.Loopback, 0);
        _listener.Start();
        _accepting = AcceptAsync();
    }

    /// <summary>A plain forwarder (loopback speed).</summary>
    public static ByteCountingForwarder Start(int targetPort) => new(targetPort, TimeSpan.Zero, 0);

    /// <summary>A forwarder that delays every byte by <paramref name="oneWayDelay"/> in each direction and paces each
    /// direction to <paramref name="bitsPerSecond"/> (0: unlimited), as one link shared by all its connections.</summary>
    public static ByteCountingForwarder Start(int targetPort, TimeSpan oneWayDelay, long bitsPerSecond) =>
        new(targetPort, oneWayDelay, bitsPerSecond);

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;
    public long BytesToClients => Interlocked.Read(ref _toClients);
    /// <summary>When a byte last reached a client (a Stopwatch timestamp).</summary>
    public long LastToClientsTimestamp => Interlocked.Read(ref _lastToClients);
    public void Reset() => Interlocked.Exchange(ref _toClients, 0);

    /// <summary>
    /// When set (`--trace-requests`), each HTTP request line a client sends (with its Range header) and the status line
    /// of each response are passed here with the connection's number, as they go through (loopback path only).
    /// </summary>
    public Action<int, string>? Trace { get; set; }
    private int _connections;

    private async Task AcceptAsync()
    {
        try
        {
            while (true)
            {
                var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                _ = ForwardAsync(client, Stopwatch.GetTimestamp());
            }
        }
        catch (OperationCanceledException) { }
    }

    private async Task ForwardAsync(TcpClient client, long acceptedAt)
    {
        using var c = client;
        using var upstream = new TcpClient();
        try
        {
            c.NoDelay = true;
            upstream.NoDelay = true;
            await upstream.ConnectAsync(IPAddress.Loopback, _target, _stop.Token);
            var cs = c.GetStream();
            var us = upstream.GetStream();
            if (_down is null || _up is null)
            {
                var id = Interlocked.Increment(ref _connections);
                await Task.WhenAll(PumpAsync(cs, us, count: false, c.Client, upstream.Client, id), PumpAsync(us, cs, count: true, upstream.Client, c.Client, id));
                return;
            }
            using var conn = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
            var shapedId = Interlocked.Increment(ref _connections);
            await Task.WhenAll(
                ShapedPumpAsync(cs, us, _up, acceptedAt + _handshakeTicks, count: false, c.Client, upstream.Client, conn, shapedId),
                ShapedPumpAsync(us, cs, _down, 0, count: true, upstream.Client, c.Client, conn, shapedId));
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException) { }
    }

    private void Counted(int n)
    {
        Interlocked.Add(ref _toClients, n);
        Interlocked.Exchange(ref _lastToClients, Stopwatch.GetTimestamp());
    }

    private async Task PumpAsync(Stream from, Stream to, bool count, Socket fromSocket, Socket toSocket, int id)
    {
        var buf = new byte[64 * 1024];
        try
        {
            int n;
            while ((n = await from.ReadAsync(buf, _stop.Token)) > 0)
            {
                if (Trace is { } trace) TraceHeads(trace, id, buf.AsSpan(0, n), request: !count);
                await to.WriteAsync(buf.AsMemory(0, n), _stop.Token);
                if (count) Counted(n);
            }
            toSocket.Shutdown(SocketShutdown.Send);
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException or ObjectDisposedException)
        {
            // One side went away: close both so the other pump ends too.
            fromSocket.Close();
            toSocket.Close();
        }
    }

    // Request lines (and their Range header) of what a client sent, or response status lines: headers are scanned only
    // where a read holds them whole, which is enough for a trace.
    private static void TraceHeads(Action<int, string> trace, int id, ReadOnlySpan<byte> data, bool request)
    {
        var text = System.Text.Encoding.Latin1.GetString(data);
        var at = 0;
        while ((at = text.IndexOf(request ? "GET " : "HTTP/1.1 ", at, StringComparison.Ordinal)) >= 0)
        {
            var eol = text.IndexOf('\r', at);
            var line = eol < 0 ? text[at..] : text[at..eol];
            if (request)
            {
                var end = text.IndexOf("\r\n\r\n", at, StringComparison.Ordinal);
                var head = end < 0 ? text[at..] : text[at..end];
                var r = head.IndexOf("\nRange: ", StringComparison.OrdinalIgnoreCase);
                if (r >= 0) line += " " + head[(r + 1)..].Split('\r')[0];
            }
            trace(id, (request ? "> " : "< ") + line);
            at += 4;
        }
    }

    /// <summary>A read chunk (pooled buffer) and when it reaches the other end; Length 0 is the end of the stream.</summary>
    private readonly record struct Chunk(byte[]? Buffer, int Length, long Due);

    /// <summary>One direction of one connection through a <see cref="Link"/>: the reader stamps each chunk with its
    /// delivery time and queues it; the writer sends each when due, in order. <paramref name="notBefore"/>: no byte is
    /// sent before this timestamp (plus the delay).</summary>
    private async Task ShapedPumpAsync(Stream from, Stream to, Link link, long notBefore, bool count, Socket fromSocket, Socket toSocket,
        CancellationTokenSource conn, int id)
    {
        var line = Channel.CreateBounded<Chunk>(new BoundedChannelOptions(MaxChunksInFlight) { SingleReader = true, SingleWriter = true });
        var ct = conn.Token;
        var writer = WriteDueAsync(line.Reader, to, count, fromSocket, toSocket, conn, id);
        try
        {
            while (true)
            {
                var buf = ArrayPool<byte>.Shared.Rent(ShapedChunk);
                int n;
                try { n = await from.ReadAsync(buf.AsMemory(0, ShapedChunk), ct); }
                catch { ArrayPool<byte>.Shared.Return(buf); throw; }
                var due = link.Schedule(Stopwatch.GetTimestamp(), notBefore, n, out var readAgainAt);
                if (n == 0)
                {
                    ArrayPool<byte>.Shared.Return(buf);
                    await line.Writer.WriteAsync(new Chunk(null, 0, due), ct);
                    break;
                }
                await line.Writer.WriteAsync(new Chunk(buf, n, due), ct);
                // The link's queue (its router's buffer) is full: stop reading, so TCP holds the sender back.
                await DelayUntilAsync(readAgainAt, ct);
            }
            line.Writer.TryComplete();
            await writer;
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException or ObjectDisposedException or ChannelClosedException)
        {
            line.Writer.TryComplete();
            // One side went away: close both and stop the other direction too.
            try { conn.Cancel(); } catch (ObjectDisposedException) { }
            fromSocket.Close();
            toSocket.Close();
            await writer;
        }
        finally
        {
            while (line.Reader.TryRead(out var left))
                if (left.Buffer is not null) ArrayPool<byte>.Shared.Return(left.Buffer);
        }
    }

    private async Task WriteDueAsync(ChannelReader<Chunk> line, Stream to, bool count, Socket fromSocket, Socket toSocket,
        CancellationTokenSource conn, int id)
    {
        var ct = conn.Token;
        try
        {
            while (await line.WaitToReadAsync(ct))
            {
                while (line.TryRead(out var chunk))
                {
                    try
                    {
                        await DelayUntilAsync(chunk.Due, ct);
                        if (chunk.Buffer is null)
                        {
                            toSocket.Shutdown(SocketShutdown.Send);
                            return;
                        }
                        // Traced as the other side receives it, after the link's delay.
                        if (Trace is { } trace) TraceHeads(trace, id, chunk.Buffer.AsSpan(0, chunk.Length), request: !count);
                        await to.WriteAsync(chunk.Buffer.AsMemory(0, chunk.Length), ct);
                        if (count) Counted(chunk.Length);
                    }
                    finally
                    {
                        if (chunk.Buffer is not null) ArrayPool<byte>.Shared.Return(chunk.Buffer);
                    }
                }
            }
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException or ObjectDisposedException)
        {
            // The receiving side went away: stop the reader (and the other direction) too.
            try { conn.Cancel(); } catch (ObjectDisposedException) { }
            fromSocket.Close();
            toSocket.Close();
        }
    }

    /// <summary>Waits until a Stopwatch timestamp, rounded up to the timer's millisecond (never early; a late wake-up
    /// does not add up, as every due time is absolute).</summary>
    private static Task DelayUntilAsync(long timestamp, CancellationToken ct)
    {
        var left = timestamp - Stopwatch.GetTimestamp();
        if (left <= 0) return Task.CompletedTask;
        var ms = (int)Math.Ceiling(left * 1000.0 / Stopwatch.Frequency);
        return Task.Delay(ms, ct);
    }

    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        _listener.Stop();
        await _accepting;
        _stop.Dispose();
    }

    /// <summary>One direction of the emulated path, shared by all connections: a FIFO serialiser at the bandwidth,
    /// then a fixed propagation delay, as a WAN link behind a router with a queue of one round trip's worth of bytes.
    /// No loss, no reordering, no TCP slow start: a clean, fixed-latency, rate-limited pipe.</summary>
    public sealed class Link
    {
        private readonly long _delay;
        private readonly double _ticksPerByte;
        private readonly long _queue;
        private readonly Lock _lock = new();
        private long _busyUntil;

        public Link(TimeSpan oneWayDelay, long bitsPerSecond)
        {
            _delay = ToTicks(oneWayDelay);
            _ticksPerByte = bitsPerSecond > 0 ? Stopwatch.Frequency * 8.0 / bitsPerSecond : 0;
            // The queue a reader may fill ahead of the serialiser: one round trip at the bandwidth, at least 5 ms.
            _queue = Math.Max(2 * _delay, ToTicks(TimeSpan.FromMilliseconds(5)));
        }

        public static long ToTicks(TimeSpan t) => (long)(t.TotalSeconds * Stopwatch.Frequency);

        /// <summary>Puts <paramref name="bytes"/> read at <paramref name="now"/> on the link; returns when they reach
        /// the other end. <paramref name="readAgainAt"/>: when the queue has room again for the next read.</summary>
        public long Schedule(long now, long notBefore, int bytes, out long readAgainAt)
        {
            lock (_lock)
            {
                var start = Math.Max(now, _busyUntil);
                var end = start + (long)(bytes * _ticksPerByte);
                _busyUntil = end;
                readAgainAt = _ticksPerByte == 0 ? 0 : end - _queue;
                return Math.Max(end, notBefore) + _delay;
            }
        }
    }
}
