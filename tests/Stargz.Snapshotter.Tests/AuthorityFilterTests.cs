using System.IO.Pipelines;
using System.Text;
using Containerd.Services.Snapshots.V1;
using Grpc.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;
using Stargz.TestSupport;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// Requests whose :authority is not a host name (a grpc-go client that dials the socket path as its target sends the
/// path) are served: the frame filter in front of Kestrel, and the daemon's server end to end.
/// </summary>
public class AuthorityFilterTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private const string SocketPath = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock";

    [Theory]
    [InlineData("", true)]
    [InlineData("localhost", true)]
    [InlineData("localhost:80", true)]
    [InlineData("127.0.0.1:1234", true)]
    [InlineData("[::1]", true)]
    [InlineData("[::1]:80", true)]
    [InlineData("a_b.example-1.com", true)]
    [InlineData(SocketPath, false)]
    [InlineData("run/x.sock", false)]
    [InlineData("unix:///x.sock", false)]
    [InlineData(":80", false)]
    [InlineData("host:", false)]
    [InlineData("host:123456", false)]
    [InlineData("host:8a", false)]
    [InlineData("[::1", false)]
    [InlineData("a b", false)]
    public void HostNames(string authority, bool host) => Assert.Equal(host, AuthorityFilter.IsHostName(Encoding.ASCII.GetBytes(authority)));

    /// <summary>Runs the filter over <paramref name="input"/>, fed in small pieces so frames arrive split.</summary>
    private static async Task<byte[]> FilterAsync(byte[] input, int maxFrameSize = 16384)
    {
        var inPipe = new Pipe();
        var outPipe = new Pipe();
        var run = new ClientFrameFilter(inPipe.Reader, outPipe.Writer, 4096, maxFrameSize).RunAsync();
        var read = Task.Run(async () =>
        {
            var ms = new MemoryStream();
            await outPipe.Reader.CopyToAsync(ms, Ct);
            return ms.ToArray();
        }, Ct);
        for (int i = 0; i < input.Length; i += 7)
            await inPipe.Writer.WriteAsync(input.AsMemory(i, Math.Min(7, input.Length - i)), Ct);
        await inPipe.Writer.CompleteAsync();
        await run;
        return await read;
    }

    private static byte[] Concat(params byte[][] parts) => parts.SelectMany(p => p).ToArray();

    private static string[] Fields(HPackDecoder d, byte[] block)
    {
        var fields = new List<HeaderField>();
        Assert.True(d.TryDecode(block, fields));
        return fields.Select(f => Encoding.ASCII.GetString(f.Name) + ": " + Encoding.ASCII.GetString(f.Value)).ToArray();
    }

    /// <summary>Two requests as grpc-go sends them: the first indexes :path, :authority and content-type, the second
    /// refers to them by dynamic index.</summary>
    private static (byte[] First, byte[] Second) GrpcGoBlocks(string authority) =>
    (
        new H2.Block().Indexed(3).Indexed(6).Literal(4, "/x.Y/Stat", index: true).Literal(1, authority, index: true)
            .Literal(31, "application/grpc", index: true).Literal("containerd-namespace", "b").ToArray(),
        new H2.Block().Indexed(3).Indexed(6).Indexed(64).Indexed(63).Indexed(62).ToArray()
    );

    [Fact]
    public async Task AConnectionThatNamesAHostGoesOnUnchanged()
    {
        var (first, second) = GrpcGoBlocks("localhost");
        var input = Concat(H2.Preface, H2.Frame(H2.Settings, 0, 0, []),
            H2.Frame(H2.Headers, H2.EndHeaders, 1, first), H2.Frame(H2.Data, H2.EndStream, 1, [0, 0, 0, 0, 1, 9]),
            H2.Frame(H2.Headers, H2.EndHeaders | H2.EndStream, 3, second));
        Assert.Equal(input, await FilterAsync(input));
    }

    [Fact]
    public async Task ASocketPathAuthorityIsLeftOutOfEveryBlockOfTheConnection()
    {
        var (first, second) = GrpcGoBlocks(SocketPath);
        var settings = H2.Frame(H2.Settings, 0, 0, [0, 4, 0, 1, 0, 0]);
        var data = H2.Frame(H2.Data, H2.EndStream, 1, [0, 0, 0, 0, 1, 9]);
        var output = await FilterAsync(Concat(H2.Preface, settings,
            H2.Frame(H2.Headers, H2.EndHeaders, 1, first), data, H2.Frame(H2.Headers, H2.EndHeaders | H2.EndStream, 3, second)));

        Assert.Equal(H2.Preface, output[..H2.Preface.Length]);
        var frames = H2.ParseFrames(output.AsSpan(H2.Preface.Length));
        Assert.Equal([(H2.Settings, (byte)0, 0u), (H2.Headers, H2.EndHeaders, 1u), (H2.Data, H2.EndStream, 1u),
            (H2.Headers, (byte)(H2.EndHeaders | H2.EndStream), 3u)], frames.Select(f => (f.Type, f.Flags, f.Stream)));
        Assert.Equal(settings[9..], frames[0].Payload);
        Assert.Equal(data[9..], frames[2].Payload);
        // Kestrel gets literals only: its dynamic table stays empty, and the second request is whole again.
        var kestrel = new HPackDecoder(4096);
        Assert.Equal([":method: POST", ":scheme: http", ":path: /x.Y/Stat", "content-type: application/grpc", "containerd-namespace: b"],
            Fields(kestrel, frames[1].Payload));
        Assert.Equal([":method: POST", ":scheme: http", ":path: /x.Y/Stat", "content-type: application/grpc"], Fields(kestrel, frames[3].Payload));
        Assert.Equal(0, kestrel.TableCount);
    }

    [Fact]
    public async Task PaddingPriorityAndContinuationsAreHandledAndBigBlocksSplitAtTheFrameSize()
    {
        // The first block comes padded, with a priority, in a HEADERS and a CONTINUATION; the second is three bytes
        // on the wire but a long literal once written out, so it needs CONTINUATIONs at a 64-byte max frame size.
        var longValue = new string('v', 100);
        var first = new H2.Block().Indexed(3).Indexed(6).Literal(4, "/p", index: true).Literal(1, "a/b", index: true)
            .Literal("x-long", longValue[..40], index: true).ToArray();
        Assert.True(first.Length > 40);
        byte[] priority = [0, 0, 0, 0, 15];
        var headersPayload = Concat([3], priority, first[..30], [0, 0, 0]);
        var second = new H2.Block().Indexed(3).Indexed(6).Indexed(64).Indexed(63).Indexed(62).Literal("x-more", longValue).ToArray();
        var output = await FilterAsync(Concat(H2.Preface,
            H2.Frame(H2.Headers, H2.Padded | H2.Priority, 1, headersPayload), H2.Frame(H2.Continuation, H2.EndHeaders, 1, first[30..]),
            H2.Frame(H2.Headers, H2.EndStream, 3, second[..50]), H2.Frame(H2.Continuation, H2.EndHeaders, 3, second[50..])), maxFrameSize: 64);

        var frames = H2.ParseFrames(output.AsSpan(H2.Preface.Length));
        Assert.All(frames, f => Assert.True(f.Payload.Length <= 64));
        Assert.Equal((H2.Headers, (byte)H2.Priority, 1u), (frames[0].Type, frames[0].Flags, frames[0].Stream));
        Assert.Equal(priority, frames[0].Payload[..5]);
        var kestrel = new HPackDecoder(4096);
        var blocks = new List<(uint Stream, bool EndStream, byte[] Block)>();
        var current = new List<byte>();
        bool endStream = false;
        foreach (var f in frames)
        {
            if (f.Type == H2.Headers)
            {
                endStream = (f.Flags & H2.EndStream) != 0;
                current.AddRange((f.Flags & H2.Priority) != 0 ? f.Payload[5..] : f.Payload);
            }
            else
            {
                Assert.Equal(H2.Continuation, f.Type);
                current.AddRange(f.Payload);
            }
            if ((f.Flags & H2.EndHeaders) != 0)
            {
                blocks.Add((f.Stream, endStream, current.ToArray()));
                current.Clear();
            }
        }
        Assert.Equal([(1u, false), (3u, true)], blocks.Select(b => (b.Stream, b.EndStream)));
        Assert.Equal([":method: POST", ":scheme: http", ":path: /p", "x-long: " + longValue[..40]], Fields(kestrel, blocks[0].Block));
        Assert.Equal([":method: POST", ":scheme: http", ":path: /p", "x-long: " + longValue[..40], "x-more: " + longValue],
            Fields(kestrel, blocks[1].Block));
        Assert.True(frames.Count > 4, "the second block needed CONTINUATIONs");
    }

    [Fact]
    public async Task WhatTheFilterCannotParseGoesOnUnchanged()
    {
        var http1 = "GET / HTTP/1.1\r\nHost: /x.sock\r\n\r\n"u8.ToArray();
        Assert.Equal(http1, await FilterAsync(http1));
        var badHpack = Concat(H2.Preface, H2.Frame(H2.Headers, H2.EndHeaders, 1, [0x80]), H2.Frame(H2.Data, H2.EndStream, 1, [1, 2]));
        Assert.Equal(badHpack, await FilterAsync(badHpack));
        var strayContinuation = Concat(H2.Preface, H2.Frame(H2.Continuation, H2.EndHeaders, 1, [0x82]));
        Assert.Equal(strayContinuation, await FilterAsync(strayContinuation));
        var tooBig = Concat(H2.Preface, H2.Frame(H2.Headers, H2.EndHeaders, 1, new byte[100]));
        Assert.Equal(tooBig, await FilterAsync(tooBig, maxFrameSize: 64));
    }

    [Theory]
    [InlineData(SocketPath)]       // replaced below by the test's own socket path
    [InlineData("")]
    [InlineData("localhost")]
    public async Task TheSnapshotterServesCallsWhateverTheAuthority(string authority)
    {
        await using var s = await InProcessSnapshotter.StartAsync();
        if (authority == SocketPath) authority = s.Socket;
        await using var raw = await RawGrpcClient.ConnectAsync(s.Socket, Ct);
        const string svc = "/containerd.services.snapshots.v1.Snapshots/";

        // First call: the authority goes into the connection's HPACK table; later calls send it by index.
        var prepared = await raw.CallAsync(svc + "Prepare", authority, new PrepareSnapshotRequest { Snapshotter = "stargz", Key = "k1" }, Ct);
        Assert.Equal("0", prepared.Status);
        Assert.Equal("bind", PrepareSnapshotResponse.Parser.ParseFrom(prepared.Message).Mounts.Single().Type);
        var stat = await raw.CallAsync(svc + "Stat", authority, new StatSnapshotRequest { Snapshotter = "stargz", Key = "k1" }, Ct);
        Assert.Equal("0", stat.Status);
        Assert.Equal(("k1", Kind.Active), (StatSnapshotResponse.Parser.ParseFrom(stat.Message).Info.Name, StatSnapshotResponse.Parser.ParseFrom(stat.Message).Info.Kind));
        var missing = await raw.CallAsync(svc + "Stat", authority, new StatSnapshotRequest { Snapshotter = "stargz", Key = "nope" }, Ct,
            ("containerd-namespace", "b"));
        Assert.Equal(((int)StatusCode.NotFound).ToString(), missing.Status);
        Assert.Equal("snapshot nope does not exist", missing.ErrorMessage);

        // The snapshot is there for an ordinary client too.
        Assert.Equal(Kind.Active, (await s.Client.StatAsync(new StatSnapshotRequest { Key = "k1" }, cancellationToken: Ct)).Info.Kind);
    }

    [Fact]
    public async Task KestrelAloneResetsAStreamWhoseAuthorityIsASocketPath()
    {
        // Why the filter exists: the same Kestrel without it refuses the request at the protocol layer. If this starts
        // failing, Kestrel serves such requests itself and the filter can go.
        using var dir = new TempDir("sga");
        var sock = Path.Combine(dir.Path, "k.sock");
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.ListenUnixSocket(sock, lo => lo.Protocols = HttpProtocols.Http2));
        await using var app = builder.Build();
        app.Run(ctx => ctx.Response.WriteAsync("served", Ct));
        await app.StartAsync(Ct);
        try
        {
            await using var raw = await RawGrpcClient.ConnectAsync(sock, Ct);
            var e = await Assert.ThrowsAsync<IOException>(() => raw.CallAsync("/x", sock, new StatSnapshotRequest(), Ct));
            Assert.Contains("PROTOCOL_ERROR", e.Message);
        }
        finally { await app.StopAsync(Ct); }
    }
}
