using System.Net.Sockets;
using Grpc.Net.Client;

namespace Stargz.Protos;

/// <summary>
/// A gRPC channel over a unix socket, as containerd and kubelet connect: HTTP/2 without TLS on a stream socket. The
/// socket is dialled on first use and again after a failure, so a channel may be made before its server is up.
/// </summary>
public static class UnixGrpcChannel
{
    /// <summary>containerd's limit both ways: image lists of a busy node and 1 MiB content writes exceed gRPC's 4 MiB default.</summary>
    public const int MaxMessageBytes = 16 << 20;

    /// <summary>A connect that takes longer means the server is stuck: fail the call rather than wait forever.</summary>
    public static readonly TimeSpan ConnectTimeout = TimeSpan.FromSeconds(10);

    public static GrpcChannel Create(string socketPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(socketPath);
        var handler = new SocketsHttpHandler
        {
            ConnectTimeout = ConnectTimeout,
            ConnectCallback = async (_, ct) =>
            {
                var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await s.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), ct).ConfigureAwait(false);
                    return new NetworkStream(s, ownsSocket: true);
                }
                catch
                {
                    s.Dispose();
                    throw;
                }
            },
        };
        // The host is never resolved: every connection goes through the callback above.
        return GrpcChannel.ForAddress("http://localhost", new GrpcChannelOptions
        {
            HttpHandler = handler,
            DisposeHttpClient = true,
            MaxSendMessageSize = MaxMessageBytes,
            MaxReceiveMessageSize = MaxMessageBytes,
        });
    }
}
