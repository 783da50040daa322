using Grpc.Core;
using Grpc.Core.Interceptors;
using Grpc.Net.Client;
using Stargz.Cri.V1;
using Stargz.Protos;
using Stargz.TestSupport;

namespace Stargz.Integration.Tests;

/// <summary>A kubelet-like CRI client over containerd's unix socket (runtime.v1 Image + Runtime services).</summary>
public sealed class CriClient : IDisposable
{
    private readonly GrpcChannel _channel;
    public ImageService.ImageServiceClient Images { get; }
    public RuntimeService.RuntimeServiceClient Runtime { get; }

    /// <param name="version">the CRI version the calls are made in: "v1", or "v1alpha2" as kubelets before 1.26 speak it.</param>
    public CriClient(string socketPath, string version = "v1")
    {
        _channel = UnixGrpcChannel.Create(socketPath);
        var invoker = version == "v1" ? _channel.CreateCallInvoker() : _channel.Intercept(new VersionInterceptor(version));
        Images = new ImageService.ImageServiceClient(invoker);
        Runtime = new RuntimeService.RuntimeServiceClient(invoker);
    }

    public void Dispose() => _channel.Dispose();

    /// <summary>
    /// Sends each call as the same call of another CRI version: the ImageService messages of v1 and v1alpha2 have the
    /// same field numbers, so only the service name on the wire changes.
    /// </summary>
    private sealed class VersionInterceptor(string version) : Interceptor
    {
        public override AsyncUnaryCall<TResponse> AsyncUnaryCall<TRequest, TResponse>(TRequest request,
            ClientInterceptorContext<TRequest, TResponse> context, AsyncUnaryCallContinuation<TRequest, TResponse> continuation)
        {
            var m = context.Method;
            var renamed = new Method<TRequest, TResponse>(m.Type, m.ServiceName.Replace("runtime.v1.", $"runtime.{version}.", StringComparison.Ordinal),
                m.Name, m.RequestMarshaller, m.ResponseMarshaller);
            return continuation(request, new ClientInterceptorContext<TRequest, TResponse>(renamed, context.Host, context.Options));
        }
    }
}
