using System.Buffers;
using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using Google.Protobuf;

namespace Stargz.Snapshotter.Tests;

/// <summary>HTTP/2 frames and HPACK pieces as a client writes them (literals, no Huffman).</summary>
public static class H2
{
    public const byte Data = 0x0, Headers = 0x1, RstStream = 0x3, Settings = 0x4, Ping = 0x6, GoAway = 0x7, WindowUpdate = 0x8, Continuation = 0x9;
    public const byte EndStream = 0x1, Ack = 0x1, EndHeaders = 0x4, Padded = 0x8, Priority = 0x20;
    public static readonly byte[] Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"u8.ToArray();

    public static byte[] Frame(byte type, byte flags, uint stream, ReadOnlySpan<byte> payload)
    {
        var f = new byte[9 + payload.Length];
        f[0] = (byte)(payload.Length >> 16);
        f[1] = (byte)(payload.Length >> 8);
        f[2] = (byte)payload.Length;
        f[3] = type;
        f[4] = flags;
        BinaryPrimitives.WriteUInt32BigEndian(f.AsSpan(5), stream);
        payload.CopyTo(f.AsSpan(9));
        return f;
    }

    /// <summary>Builds a header block: indexed fields, literals with or without indexing.</summary>
    public sealed class Block
    {
        private readonly ArrayBufferWriter<byte> _w = new();

        public Block Indexed(int index)
        {
            HPackLiteralEncoder.WriteInt(_w, 0x80, 7, index);
            return this;
        }

        /// <summary>Literal value for a static-table name; <paramref name="index"/>ing adds it to the dynamic table.</summary>
        public Block Literal(int nameIndex, string value, bool index = false)
        {
            HPackLiteralEncoder.WriteInt(_w, index ? (byte)0x40 : (byte)0x00, index ? 6 : 4, nameIndex);
            return Str(value);
        }

        public Block Literal(string name, string value, bool index = false)
        {
            _w.Write([index ? (byte)0x40 : (byte)0x00]);
            return Str(name).Str(value);
        }

        private Block Str(string s)
        {
            var b = Encoding.ASCII.GetBytes(s);
            HPackLiteralEncoder.WriteInt(_w, 0, 7, b.Length);
            _w.Write(b);
            return this;
        }

        public byte[] ToArray() => _w.WrittenSpan.ToArray();
    }

    public readonly record struct ParsedFrame(byte Type, byte Flags, uint Stream, byte[] Payload);

    public static List<ParsedFrame> ParseFrames(ReadOnlySpan<byte> s)
    {
        var frames = new List<ParsedFrame>();
        while (s.Length >= 9)
        {
            int len = s[0] << 16 | s[1] << 8 | s[2];
            frames.Add(new ParsedFrame(s[3], s[4], BinaryPrimitives.ReadUInt32BigEndian(s[5..]) & 0x7fffffff, s.Slice(9, len).ToArray()));
            s = s[(9 + len)..];
        }
        Assert.True(s.IsEmpty, "trailing bytes that are not a whole frame");
        return frames;
    }
}

/// <summary>
/// A bare HTTP/2 gRPC client on a unix socket that sends whatever <c>:authority</c> it is told, as grpc-go does when
/// it dials a socket path as its target (grpc-dotnet's SocketsHttpHandler only sends host names). The authority goes
/// into the HPACK dynamic table on the first call and is sent by index afterwards, as grpc-go's encoder does.
/// </summary>
public sealed class RawGrpcClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly HPackDecoder _responses = new(4096);
    private uint _nextStream = 1;
    private string? _indexedAuthority;

    private RawGrpcClient(Socket s)
    {
        _socket = s;
        _stream = new NetworkStream(s, ownsSocket: false);
    }

    public static async Task<RawGrpcClient> ConnectAsync(string socketPath, CancellationToken ct)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await s.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), ct);
        var c = new RawGrpcClient(s);
        await c._stream.WriteAsync(H2.Preface, ct);
        await c._stream.WriteAsync(H2.Frame(H2.Settings, 0, 0, []), ct);
        return c;
    }

    public sealed record Result(IReadOnlyDictionary<string, string> Trailers, byte[] Message)
    {
        public string Status => Trailers.TryGetValue("grpc-status", out var s) ? s : "(none)";
        public string ErrorMessage => Trailers.TryGetValue("grpc-message", out var m) ? Uri.UnescapeDataString(m) : "";
    }

    /// <summary>One unary call. Throws <see cref="IOException"/> naming the error code when the server resets the stream.</summary>
    public Task<Result> CallAsync(string method, string authority, IMessage request, CancellationToken ct,
        params (string Name, string Value)[] headers) => CallAsync(method, authority, request.ToByteArray(), ct, headers);

    /// <summary>One unary call whose message is <paramref name="body"/> as it is (well-formed or not).</summary>
    public async Task<Result> CallAsync(string method, string authority, byte[] body, CancellationToken ct,
        params (string Name, string Value)[] headers)
    {
        uint id = _nextStream;
        _nextStream += 2;
        var b = new H2.Block().Indexed(3).Indexed(6).Literal(4, method); // :method POST, :scheme http, :path
        if (_indexedAuthority == authority) b.Indexed(62);                  // the newest (only) entry we indexed
        else
        {
            b.Literal(1, authority, index: true);
            _indexedAuthority = authority;
        }
        b.Literal(31, "application/grpc").Literal("te", "trailers");
        foreach (var (n, v) in headers) b.Literal(n, v);
        var data = new byte[5 + body.Length];
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(1), (uint)body.Length);
        body.CopyTo(data, 5);
        await _stream.WriteAsync(H2.Frame(H2.Headers, H2.EndHeaders, id, b.ToArray()), ct);
        await _stream.WriteAsync(H2.Frame(H2.Data, H2.EndStream, id, data), ct);

        var fields = new Dictionary<string, string>(StringComparer.Ordinal);
        var message = new MemoryStream();
        var block = new ArrayBufferWriter<byte>();
        var header = new byte[9];
        while (true)
        {
            await _stream.ReadExactlyAsync(header, ct);
            int len = header[0] << 16 | header[1] << 8 | header[2];
            byte type = header[3], flags = header[4];
            uint stream = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(5)) & 0x7fffffff;
            var payload = new byte[len];
            await _stream.ReadExactlyAsync(payload, ct);
            switch (type)
            {
                case H2.Settings when (flags & H2.Ack) == 0:
                    await _stream.WriteAsync(H2.Frame(H2.Settings, H2.Ack, 0, []), ct);
                    break;
                case H2.Ping when (flags & H2.Ack) == 0:
                    await _stream.WriteAsync(H2.Frame(H2.Ping, H2.Ack, 0, payload), ct);
                    break;
                case H2.GoAway:
                    throw new IOException($"GOAWAY, error code {BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(4))}");
                case H2.RstStream when stream == id:
                    throw new IOException($"stream reset, error code {BinaryPrimitives.ReadUInt32BigEndian(payload)} ({ErrorName(BinaryPrimitives.ReadUInt32BigEndian(payload))})");
                case H2.Data when stream == id:
                    message.Write(payload);
                    break;
                case H2.Headers or H2.Continuation when stream == id:
                    int off = 0, pad = 0;
                    if (type == H2.Headers && (flags & H2.Padded) != 0) { pad = payload[0]; off = 1; }
                    if (type == H2.Headers && (flags & H2.Priority) != 0) off += 5;
                    block.Write(payload.AsSpan(off, len - off - pad));
                    if ((flags & H2.EndHeaders) != 0)
                    {
                        var decoded = new List<HeaderField>();
                        Assert.True(_responses.TryDecode(block.WrittenSpan, decoded), "response header block does not decode");
                        foreach (var f in decoded) fields[Encoding.ASCII.GetString(f.Name)] = Encoding.ASCII.GetString(f.Value);
                        block.ResetWrittenCount();
                    }
                    if ((flags & H2.EndStream) != 0)
                    {
                        var m = message.ToArray();
                        return new Result(fields, m.Length >= 5 ? m[5..] : []);
                    }
                    break;
            }
        }
    }

    private static string ErrorName(uint code) => code switch
    {
        0 => "NO_ERROR", 1 => "PROTOCOL_ERROR", 2 => "INTERNAL_ERROR", 7 => "REFUSED_STREAM", 8 => "CANCEL", 9 => "COMPRESSION_ERROR",
        _ => "other",
    };

    public ValueTask DisposeAsync()
    {
        _stream.Dispose();
        _socket.Dispose();
        return ValueTask.CompletedTask;
    }
}
