using System.Net.Sockets;
using Grpc.Net.Client;
using Stargz.Cri.V1;

namespace Stargz.Integration.Tests;

/// <summary>A kubelet-like CRI client over containerd's unix socket (runtime.v1 Image + Runtime services).</summary>
public sealed class CriClient : IDisposable
{
    private readonly GrpcChannel _channel;
    public ImageService.ImageServiceClient Images { get; }
    public RuntimeService.RuntimeServiceClient Runtime { get; }

    public CriClient(string socketPath)
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
        _channel = GrpcChannel.ForAddress("http://localhost", new GrpcChannelOptions { HttpHandler = handler });
        Images = new ImageService.ImageServiceClient(_channel);
        Runtime = new RuntimeService.RuntimeServiceClient(_channel);
    }

    public void Dispose() => _channel.Dispose();
}
