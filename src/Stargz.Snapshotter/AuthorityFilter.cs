using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using Microsoft.AspNetCore.Connections;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace Stargz.Snapshotter;

/// <summary>
/// Lets Kestrel serve HTTP/2 requests whose <c>:authority</c> (or <c>host</c>) is not a host name. A gRPC client that
/// dials a unix socket by its path as the target (grpc-go's <c>passthrough:///PATH</c>, the old
/// <c>grpc.Dial(PATH, WithDialer(...))</c> pattern still found in tools) sends the path as <c>:authority</c>, and Kestrel
/// resets every such stream with PROTOCOL_ERROR in its pseudo-header validation, which no option turns off (its
/// <c>AllowHostHeaderOverride</c> is about HTTP/1.1 absolute-form targets). The reference (grpc-go's server) ignores the
/// authority, and a unix socket has no host to check it against.
/// <para>
/// Connection middleware between the socket and Kestrel's HTTP/2 parser. It decodes a connection's first request
/// header block: when that names a host (containerd sends <c>localhost</c>; an empty one is fine too), the
/// connection's bytes go on unchanged from then on. Otherwise every header block of that connection is decoded with
/// the client's dynamic table and handed on as plain literals (Kestrel's dynamic table stays empty), leaving out an
/// <c>:authority</c>/<c>host</c> that is not a host name; all other frames go on as they are. Whatever the filter
/// cannot parse goes on unchanged, so Kestrel answers it as it would have.
/// </para>
/// </summary>
internal static class AuthorityFilter
{
    /// <summary>Adds the filter to a listener; <paramref name="limits"/> are read per connection (they must match the
    /// SETTINGS Kestrel sends: header table size and max frame size).</summary>
    public static void Use(ListenOptions listen, Http2Limits limits)
    {
        ILogger? log = null;
        listen.Use(next => async ctx =>
        {
            var transport = ctx.Transport;
            var pipe = new Pipe(new PipeOptions(pauseWriterThreshold: 1 << 20, resumeWriterThreshold: 1 << 19, useSynchronizationContext: false));
            log ??= listen.ApplicationServices.GetService<ILoggerFactory>()?.CreateLogger(typeof(AuthorityFilter).FullName!);
            var filter = new ClientFrameFilter(transport.Input, pipe.Writer, limits.HeaderTableSize, limits.MaxFrameSize,
                authority => log?.LogDebug("HTTP/2 client sends :authority {Authority}, not a host name: its requests reach the server without it", authority));
            var pump = filter.RunAsync();
            ctx.Transport = new DuplexPipe(pipe.Reader, transport.Output);
            try
            {
                await next(ctx);
            }
            finally
            {
                ctx.Transport = transport;
                transport.Input.CancelPendingRead();
                pipe.Writer.CancelPendingFlush();
                await pump;
                await pipe.Reader.CompleteAsync();
            }
        });
    }

    private sealed class DuplexPipe(PipeReader input, PipeWriter output) : IDuplexPipe
    {
        public PipeReader Input { get; } = input;
        public PipeWriter Output { get; } = output;
    }

    /// <summary>True for what Kestrel takes as a host: empty, or a DNS name / IPv4 / [IPv6] with an optional :port.</summary>
    internal static bool IsHostName(ReadOnlySpan<byte> v)
    {
        if (v.IsEmpty) return true;
        int i = 0;
        if (v[0] == '[')
        {
            int close = v.IndexOf((byte)']');
            if (close < 2) return false;
            for (i = 1; i < close; i++)
                if (!(IsHex(v[i]) || v[i] == ':' || v[i] == '.')) return false;
            i = close + 1;
        }
        else
        {
            for (; i < v.Length && v[i] != ':'; i++)
                if (!(IsAlnum(v[i]) || v[i] == '-' || v[i] == '.' || v[i] == '_')) return false;
            if (i == 0) return false;
        }
        if (i == v.Length) return true;
        if (v[i] != ':' || i + 1 == v.Length || v.Length - i - 1 > 5) return false;
        for (i++; i < v.Length; i++)
            if (v[i] < '0' || v[i] > '9') return false;
        return true;

        static bool IsAlnum(byte c) => (uint)(c - 'a') <= 'z' - 'a' || (uint)(c - 'A') <= 'Z' - 'A' || (uint)(c - '0') <= 9;
        static bool IsHex(byte c) => (uint)(c - '0') <= 9 || (uint)(c - 'a') <= 5 || (uint)(c - 'A') <= 5;
    }
}

/// <summary>
/// Copies a client's HTTP/2 byte stream from <c>input</c> to <c>output</c>, rewriting header blocks as described on
/// <see cref="AuthorityFilter"/>. Separate from the middleware so tests can feed it bytes.
/// </summary>
internal sealed class ClientFrameFilter
{
    private const int FrameHeaderLength = 9;
    private const byte TypeHeaders = 0x1, TypeContinuation = 0x9;
    private const byte FlagEndStream = 0x1, FlagEndHeaders = 0x4, FlagPadded = 0x8, FlagPriority = 0x20;
    // Far above Kestrel's own limit on request headers (32 KiB by default): a block this big goes on unchanged for
    // Kestrel to refuse, instead of being buffered.
    private const int MaxBlock = 1 << 20;
    private static ReadOnlySpan<byte> Preface => "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"u8;
    private static ReadOnlySpan<byte> AuthorityName => ":authority"u8;
    private static ReadOnlySpan<byte> HostName => "host"u8;

    private enum Mode { Preface, Undecided, Rewrite, Passthrough }

    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly int _maxFrameSize;
    private readonly HPackDecoder _decoder;
    private readonly Action<string>? _onRewrite;
    private Mode _mode = Mode.Preface;

    // The header block being collected: its frames as received (passed on as they are when it needs no rewrite), its
    // fragments (what HPACK decodes), and what its first HEADERS frame said.
    private readonly ArrayBufferWriter<byte> _blockFrames = new(1024);
    private readonly ArrayBufferWriter<byte> _fragments = new(1024);
    private readonly ArrayBufferWriter<byte> _encoded = new(1024);
    private readonly List<HeaderField> _fields = [];
    private bool _inBlock;
    private uint _blockStream;
    private byte _blockFlags;
    private readonly byte[] _priority = new byte[5];

    public ClientFrameFilter(PipeReader input, PipeWriter output, int headerTableSize, int maxFrameSize, Action<string>? onRewrite = null)
    {
        _input = input;
        _output = output;
        _maxFrameSize = maxFrameSize;
        _decoder = new HPackDecoder(headerTableSize);
        _onRewrite = onRewrite;
    }

    /// <summary>True once the connection's header blocks are being rewritten.</summary>
    public bool Rewriting => _mode == Mode.Rewrite;

    public async Task RunAsync()
    {
        try
        {
            while (true)
            {
                var r = await _input.ReadAsync();
                if (r.IsCanceled) break;
                var buf = r.Buffer;
                var consumed = _mode == Mode.Passthrough ? CopyAll(buf) : Process(buf, r.IsCompleted);
                _input.AdvanceTo(consumed, buf.End);
                var f = await _output.FlushAsync();
                if (f.IsCompleted || f.IsCanceled || r.IsCompleted) break;
            }
            await _output.CompleteAsync();
        }
        catch (Exception e)
        {
            await _output.CompleteAsync(e);
        }
    }

    private SequencePosition CopyAll(ReadOnlySequence<byte> buf)
    {
        foreach (var seg in buf) _output.Write(seg.Span);
        return buf.End;
    }

    private SequencePosition Process(ReadOnlySequence<byte> buf, bool completed)
    {
        if (_mode == Mode.Preface)
        {
            if (buf.Length < Preface.Length)
                return completed ? CopyAll(buf) : buf.Start;
            Span<byte> p = stackalloc byte[Preface.Length];
            buf.Slice(0, p.Length).CopyTo(p);
            // Not HTTP/2 with prior knowledge: Kestrel's to answer.
            _mode = p.SequenceEqual(Preface) ? Mode.Undecided : Mode.Passthrough;
            if (_mode == Mode.Passthrough) return CopyAll(buf);
            _output.Write(p);
            buf = buf.Slice(p.Length);
        }
        Span<byte> h = stackalloc byte[FrameHeaderLength];
        while (_mode != Mode.Passthrough && buf.Length >= FrameHeaderLength)
        {
            buf.Slice(0, FrameHeaderLength).CopyTo(h);
            int length = h[0] << 16 | h[1] << 8 | h[2];
            if (length > _maxFrameSize)
            {
                GiveUp();
                break;
            }
            if (buf.Length < FrameHeaderLength + length) break;
            var frame = buf.Slice(0, FrameHeaderLength + length);
            OnFrame(frame, h[3], h[4], BinaryPrimitives.ReadUInt32BigEndian(h[5..]) & 0x7fffffff, length);
            buf = buf.Slice(frame.End);
        }
        if (_mode == Mode.Passthrough || completed) return CopyAll(buf);
        return buf.Start;
    }

    private void OnFrame(ReadOnlySequence<byte> frame, byte type, byte flags, uint stream, int length)
    {
        if (_inBlock)
        {
            // Only CONTINUATIONs of the same stream may follow until END_HEADERS (RFC 9113 6.10).
            if (type != TypeContinuation || stream != _blockStream || _fragments.WrittenCount + length > MaxBlock)
            {
                GiveUp();
                CopyAll(frame);
                return;
            }
            _blockFrames.Write(frame);
            _fragments.Write(frame.Slice(FrameHeaderLength));
            if ((flags & FlagEndHeaders) != 0) EndBlock();
            return;
        }
        if (type != TypeHeaders)
        {
            if (type == TypeContinuation) _mode = Mode.Passthrough; // out of place: Kestrel's to refuse
            CopyAll(frame);
            return;
        }
        var payload = frame.Slice(FrameHeaderLength);
        int offset = 0, pad = 0;
        if ((flags & FlagPadded) != 0)
        {
            if (length < 1) { GiveUp(); CopyAll(frame); return; }
            pad = payload.FirstSpan[0];
            offset = 1;
        }
        if ((flags & FlagPriority) != 0)
        {
            if (length < offset + 5) { GiveUp(); CopyAll(frame); return; }
            payload.Slice(offset, 5).CopyTo(_priority);
            offset += 5;
        }
        if (offset + pad > length) { GiveUp(); CopyAll(frame); return; }
        _inBlock = true;
        _blockStream = stream;
        _blockFlags = flags;
        _blockFrames.Write(frame);
        _fragments.Write(payload.Slice(offset, length - offset - pad));
        if ((flags & FlagEndHeaders) != 0) EndBlock();
    }

    private void EndBlock()
    {
        _inBlock = false;
        _fields.Clear();
        if (!_decoder.TryDecode(_fragments.WrittenSpan, _fields))
        {
            GiveUp();
            return;
        }
        if (_mode == Mode.Undecided)
        {
            string? bad = BadAuthority();
            if (bad == null)
            {
                // The client names a host: its bytes are Kestrel's from now on, dynamic table and all.
                GiveUp();
                return;
            }
            _mode = Mode.Rewrite;
            _onRewrite?.Invoke(bad);
        }
        _encoded.ResetWrittenCount();
        foreach (var f in _fields)
            if (!IsHostField(f.Name) || AuthorityFilter.IsHostName(f.Value)) HPackLiteralEncoder.Write(_encoded, f);
        WriteBlock(_encoded.WrittenSpan);
        _blockFrames.ResetWrittenCount();
        _fragments.ResetWrittenCount();
    }

    /// <summary>Passes the block collected so far on as received and stops parsing this connection.</summary>
    private void GiveUp()
    {
        _output.Write(_blockFrames.WrittenSpan);
        _blockFrames.ResetWrittenCount();
        _fragments.ResetWrittenCount();
        _inBlock = false;
        _mode = Mode.Passthrough;
    }

    private string? BadAuthority()
    {
        foreach (var f in _fields)
            if (IsHostField(f.Name) && !AuthorityFilter.IsHostName(f.Value)) return Encoding.ASCII.GetString(f.Value);
        return null;
    }

    private static bool IsHostField(byte[] name) => name.AsSpan().SequenceEqual(AuthorityName) || name.AsSpan().SequenceEqual(HostName);

    /// <summary>Writes the block as one HEADERS frame and as many CONTINUATIONs as the max frame size needs.</summary>
    private void WriteBlock(ReadOnlySpan<byte> block)
    {
        bool priority = (_blockFlags & FlagPriority) != 0;
        int room = _maxFrameSize - (priority ? 5 : 0);
        int first = Math.Min(room, block.Length);
        byte flags = (byte)((_blockFlags & FlagEndStream) | (priority ? FlagPriority : 0) | (first == block.Length ? FlagEndHeaders : 0));
        WriteFrameHeader(first + (priority ? 5 : 0), TypeHeaders, flags);
        if (priority) _output.Write(_priority);
        _output.Write(block[..first]);
        block = block[first..];
        while (!block.IsEmpty)
        {
            int n = Math.Min(_maxFrameSize, block.Length);
            WriteFrameHeader(n, TypeContinuation, n == block.Length ? FlagEndHeaders : (byte)0);
            _output.Write(block[..n]);
            block = block[n..];
        }
    }

    private void WriteFrameHeader(int length, byte type, byte flags)
    {
        var h = _output.GetSpan(FrameHeaderLength);
        h[0] = (byte)(length >> 16);
        h[1] = (byte)(length >> 8);
        h[2] = (byte)length;
        h[3] = type;
        h[4] = flags;
        BinaryPrimitives.WriteUInt32BigEndian(h[5..], _blockStream);
        _output.Advance(FrameHeaderLength);
    }
}

internal static class BufferWriterExtensions
{
    public static void Write(this IBufferWriter<byte> w, ReadOnlySequence<byte> seq)
    {
        foreach (var seg in seq) w.Write(seg.Span);
    }
}
