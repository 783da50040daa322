using System.Net.Sockets;
using Grpc.Net.Client;

namespace Stargz.TestSupport;

/// <summary>gRPC over a unix socket (our daemon's snapshots API, containerd's CRI), as containerd itself connects.</summary>
public static class UnixGrpc
{
    public static GrpcChannel Channel(string socketPath)
    {
        var handler = new SocketsHttpHandler
        {
            ConnectCallback = async (_, ct) =>
            {
                var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await s.ConnectAsync(new UnixDomainSocketEndPoint(socketPath), ct);
                    return new NetworkStream(s, ownsSocket: true);
                }
                catch
                {
                    s.Dispose();
                    throw;
                }
            },
        };
        return GrpcChannel.ForAddress("http://localhost", new GrpcChannelOptions { HttpHandler = handler, DisposeHttpClient = true });
    }
}
