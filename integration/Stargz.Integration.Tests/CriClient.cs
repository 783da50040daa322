using Grpc.Net.Client;
using Stargz.Cri.V1;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>A kubelet-like CRI client over containerd's unix socket (runtime.v1 Image + Runtime services).</summary>
public sealed class CriClient : IDisposable
{
    private readonly GrpcChannel _channel;
    public ImageService.ImageServiceClient Images { get; }
    public RuntimeService.RuntimeServiceClient Runtime { get; }

    public CriClient(string socketPath)
    {
        _channel = UnixGrpc.Channel(socketPath);
        Images = new ImageService.ImageServiceClient(_channel);
        Runtime = new RuntimeService.RuntimeServiceClient(_channel);
    }

    public void Dispose() => _channel.Dispose();
}
