using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace Stargz.Snapshotter;

/// <summary>
/// Gives a request that is not valid protobuf InvalidArgument (naming the message type and the parser's complaint)
/// instead of Unknown. Grpc.AspNetCore deserializes a request before any interceptor or handler runs, and answers
/// Unknown to whatever the deserializer throws except an <see cref="RpcException"/>, whose status it keeps. So the
/// service is bound through <see cref="Wrap"/>: the same methods, each request marshaller wrapped to turn
/// <see cref="InvalidProtocolBufferException"/> into that RpcException. Use it from a static bind method that a
/// <see cref="BindServiceMethodAttribute"/> on the service class names (Grpc.AspNetCore looks for that attribute on
/// the most derived class first).
/// </summary>
public sealed class MalformedRequests : ServiceBinderBase
{
    private readonly ServiceBinderBase _inner;

    /// <summary>
    /// Where refused requests are logged (a warning each). Static: Grpc.AspNetCore calls the bind method by reflection,
    /// with no service provider; the host sets it once it is built (<see cref="SnapshotterServer.Build"/>).
    /// </summary>
    public static ILogger? Logger { get; set; }

    private MalformedRequests(ServiceBinderBase inner) => _inner = inner;

    /// <summary>A binder that forwards every method to <paramref name="inner"/> with a checking request marshaller.</summary>
    public static ServiceBinderBase Wrap(ServiceBinderBase inner) => new MalformedRequests(inner);

    private static Method<TRequest, TResponse> Checked<TRequest, TResponse>(Method<TRequest, TResponse> m)
        where TRequest : class where TResponse : class
    {
        var inner = m.RequestMarshaller;
        var request = Marshallers.Create<TRequest>(inner.ContextualSerializer, ctx =>
        {
            try { return inner.ContextualDeserializer(ctx); }
            catch (InvalidProtocolBufferException e)
            {
                Logger?.LogWarning("{Method}: refused a request that is not a valid {Message} message ({PayloadBytes} bytes): {Error}",
                    m.FullName, typeof(TRequest).Name, ctx.PayloadLength, e.Message);
                throw new RpcException(new Status(StatusCode.InvalidArgument,
                    $"{m.FullName}: the request is not a valid {typeof(TRequest).Name} message: {e.Message}"));
            }
        });
        return new Method<TRequest, TResponse>(m.Type, m.ServiceName, m.Name, request, m.ResponseMarshaller);
    }

    public override void AddMethod<TRequest, TResponse>(Method<TRequest, TResponse> method, UnaryServerMethod<TRequest, TResponse>? handler)
        => _inner.AddMethod(Checked(method), handler);

    public override void AddMethod<TRequest, TResponse>(Method<TRequest, TResponse> method, ClientStreamingServerMethod<TRequest, TResponse>? handler)
        => _inner.AddMethod(Checked(method), handler);

    public override void AddMethod<TRequest, TResponse>(Method<TRequest, TResponse> method, ServerStreamingServerMethod<TRequest, TResponse>? handler)
        => _inner.AddMethod(Checked(method), handler);

    public override void AddMethod<TRequest, TResponse>(Method<TRequest, TResponse> method, DuplexStreamingServerMethod<TRequest, TResponse>? handler)
        => _inner.AddMethod(Checked(method), handler);
}
