using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.Extensions.Logging;
using Stargz.Cri.V1;
using Stargz.Protos;
using Stargz.Registry;
using Stargz.Snapshotter;

namespace Stargz.Daemon;

/// <summary>
/// The CRI keychain's server side, as the reference's: CRI runtime.v1 ImageService on the daemon's own socket
/// (kubelet --image-service-endpoint points here), every call forwarded to the backing CRI image service
/// (<c>[cri_keychain] image_service_path</c>, e.g. containerd's socket). PullImage's AuthConfig is kept in
/// <see cref="CriKeychain"/> for the image before the pull is forwarded, because the backend's pull is what makes
/// containerd ask us to mount the image's layers; RemoveImage drops it. Answers and errors come back unchanged. A
/// request that is not valid protobuf gets InvalidArgument naming the method and message, as on the snapshots service
/// (<see cref="MalformedRequests"/>, bound by <see cref="BindService"/>; the v1alpha2 binding too).
/// </summary>
[BindServiceMethod(typeof(CriImageServiceProxy), nameof(BindService))]
internal sealed class CriImageServiceProxy(CriBackend backend, CriKeychain keychain, ILogger<CriImageServiceProxy> log)
    : ImageService.ImageServiceBase
{
    /// <summary>The generated binding with checking request marshallers (found by Grpc.AspNetCore through the attribute).</summary>
    public static void BindService(ServiceBinderBase binder, ImageService.ImageServiceBase? service)
        => ImageService.BindService(MalformedRequests.Wrap(binder), service);

    public override async Task<PullImageResponse> PullImage(PullImageRequest request, ServerCallContext context)
    {
        var image = request.Image?.Image ?? "";
        var kind = "none";
        try
        {
            var a = request.Auth;
            var cred = a is null ? null : CriKeychain.FromAuthConfig(a.Username, a.Password, a.Auth, a.IdentityToken, a.RegistryToken);
            kind = cred is null ? "none" : cred.RegistryToken != null ? "registry token" : cred.IdentityToken != null ? "identity token" : "basic";
            keychain.Remember(image, cred, a?.ServerAddress);
        }
        catch (Exception e) when (e is InvalidReferenceException or FormatException)
        {
            // The backend gives kubelet its own answer for a bad reference or auth; the lazy layers just get no credentials.
            log.LogWarning("CRI PullImage {Image}: credentials not kept for lazy layers: {Error}", image, e.Message);
        }
        log.LogInformation("CRI PullImage {Image} (credentials: {CredentialKind}), forwarding to {Backend}", image, kind, backend.Address);
        return await backend.CallAsync(image, "PullImage", CriBackend.PullTimeout, context,
            (c, o) => c.PullImageAsync(request, o).ResponseAsync).ConfigureAwait(false);
    }

    public override async Task<RemoveImageResponse> RemoveImage(RemoveImageRequest request, ServerCallContext context)
    {
        var image = request.Image?.Image ?? "";
        // kubelet's image GC removes by image ID (sha256:...), which names no repository: the image's tags and digests
        // (asked for before it is gone) say whose credentials go with it.
        var names = new List<string> { image };
        try
        {
            var status = await backend.CallAsync(image, "ImageStatus", CriBackend.CallTimeout, context,
                (c, o) => c.ImageStatusAsync(new ImageStatusRequest { Image = request.Image ?? new ImageSpec() }, o).ResponseAsync).ConfigureAwait(false);
            if (status.Image is { } found)
            {
                names.AddRange(found.RepoTags);
                names.AddRange(found.RepoDigests);
            }
        }
        catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled)
        {
            // The removal itself tells kubelet what is wrong; only the request's own name is forgotten then.
            log.LogInformation("CRI RemoveImage {Image}: the image's names could not be read ({Code}); dropping the credentials of that name only", image, e.StatusCode);
        }
        var removed = await backend.CallAsync(image, "RemoveImage", CriBackend.CallTimeout, context,
            (c, o) => c.RemoveImageAsync(request, o).ResponseAsync).ConfigureAwait(false);
        // Only once it is gone: an image still in use keeps the credentials its lazy layers read with.
        var dropped = keychain.Forget(names);
        if (dropped > 0)
            log.LogInformation("CRI RemoveImage {Image}: its pull credentials are dropped ({Count} name(s){Persisted})", image, dropped,
                keychain.StorePath != null ? ", persisted store updated" : "");
        return removed;
    }

    public override Task<ListImagesResponse> ListImages(ListImagesRequest request, ServerCallContext context)
        => backend.CallAsync("", "ListImages", CriBackend.CallTimeout, context, (c, o) => c.ListImagesAsync(request, o).ResponseAsync);

    public override Task<ImageStatusResponse> ImageStatus(ImageStatusRequest request, ServerCallContext context)
        => backend.CallAsync(request.Image?.Image ?? "", "ImageStatus", CriBackend.CallTimeout, context,
            (c, o) => c.ImageStatusAsync(request, o).ResponseAsync);

    public override Task<ImageFsInfoResponse> ImageFsInfo(ImageFsInfoRequest request, ServerCallContext context)
        => backend.CallAsync("", "ImageFsInfo", CriBackend.CallTimeout, context, (c, o) => c.ImageFsInfoAsync(request, o).ResponseAsync);
}

/// <summary>
/// The same proxy as CRI <c>runtime.v1alpha2.ImageService</c>, which kubelets before 1.26 speak and the reference
/// serves too. The two versions' ImageService messages have the same field numbers, so the v1 types read and write
/// them (fields this build does not know travel along untouched), and calls are forwarded to the backend as v1.
/// </summary>
[BindServiceMethod(typeof(CriImageServiceProxyV1Alpha2), nameof(BindService))]
internal class CriImageServiceProxyV1Alpha2(CriBackend backend, CriKeychain keychain, ILogger<CriImageServiceProxy> log)
{
    public const string ServiceName = "runtime.v1alpha2.ImageService";

    private readonly CriImageServiceProxy _v1 = new(backend, keychain, log);

    // Virtual and declared here: ASP.NET Core binds each handler to a method whose base definition is on this type.
    public virtual Task<PullImageResponse> PullImage(PullImageRequest request, ServerCallContext context) => _v1.PullImage(request, context);
    public virtual Task<RemoveImageResponse> RemoveImage(RemoveImageRequest request, ServerCallContext context) => _v1.RemoveImage(request, context);
    public virtual Task<ListImagesResponse> ListImages(ListImagesRequest request, ServerCallContext context) => _v1.ListImages(request, context);
    public virtual Task<ImageStatusResponse> ImageStatus(ImageStatusRequest request, ServerCallContext context) => _v1.ImageStatus(request, context);
    public virtual Task<ImageFsInfoResponse> ImageFsInfo(ImageFsInfoRequest request, ServerCallContext context) => _v1.ImageFsInfo(request, context);

    private static Method<TRequest, TResponse> Unary<TRequest, TResponse>(string name)
        where TRequest : class, Google.Protobuf.IMessage<TRequest>, new()
        where TResponse : class, Google.Protobuf.IMessage<TResponse>, new()
    {
        var requestParser = new Google.Protobuf.MessageParser<TRequest>(() => new TRequest());
        var responseParser = new Google.Protobuf.MessageParser<TResponse>(() => new TResponse());
        return new Method<TRequest, TResponse>(MethodType.Unary, ServiceName, name,
            Marshallers.Create(m => Google.Protobuf.MessageExtensions.ToByteArray(m), requestParser.ParseFrom),
            Marshallers.Create(m => Google.Protobuf.MessageExtensions.ToByteArray(m), responseParser.ParseFrom));
    }

    /// <summary>Binds the v1 handlers under the v1alpha2 service name (ASP.NET Core finds each handler by method name).</summary>
    public static void BindService(ServiceBinderBase binder, CriImageServiceProxyV1Alpha2? service)
    {
        binder = MalformedRequests.Wrap(binder); // InvalidArgument for a request that is not valid protobuf, as on v1
        binder.AddMethod(Unary<ListImagesRequest, ListImagesResponse>("ListImages"),
            service == null ? null : new UnaryServerMethod<ListImagesRequest, ListImagesResponse>(service.ListImages));
        binder.AddMethod(Unary<ImageStatusRequest, ImageStatusResponse>("ImageStatus"),
            service == null ? null : new UnaryServerMethod<ImageStatusRequest, ImageStatusResponse>(service.ImageStatus));
        binder.AddMethod(Unary<PullImageRequest, PullImageResponse>("PullImage"),
            service == null ? null : new UnaryServerMethod<PullImageRequest, PullImageResponse>(service.PullImage));
        binder.AddMethod(Unary<RemoveImageRequest, RemoveImageResponse>("RemoveImage"),
            service == null ? null : new UnaryServerMethod<RemoveImageRequest, RemoveImageResponse>(service.RemoveImage));
        binder.AddMethod(Unary<ImageFsInfoRequest, ImageFsInfoResponse>("ImageFsInfo"),
            service == null ? null : new UnaryServerMethod<ImageFsInfoRequest, ImageFsInfoResponse>(service.ImageFsInfo));
    }
}

/// <summary>
/// The backing CRI image service over its unix socket. The channel connects lazily and again after a failure, so the
/// daemon may start before containerd (as under systemd); a call while it is down fails with Unavailable naming it.
/// </summary>
internal sealed class CriBackend : IDisposable
{
    /// <summary>Deadline of a forwarded call when the caller set none (kubelet sets one on all but pulls).</summary>
    public static readonly TimeSpan CallTimeout = TimeSpan.FromMinutes(2);
    /// <summary>Deadline of a forwarded pull when kubelet set none: a big image over a slow link, not forever.</summary>
    public static readonly TimeSpan PullTimeout = TimeSpan.FromHours(1);

    private readonly GrpcChannel _channel;
    private readonly ImageService.ImageServiceClient _client;
    private readonly ILogger _log;

    public string Address { get; }

    public CriBackend(string address, ILogger log)
    {
        Address = address;
        _log = log;
        var path = ConfigLoader.CriSocketPath(address) ?? throw new ArgumentException($"not a unix socket address: {address}", nameof(address));
        // Image lists of a busy node exceed gRPC's 4 MiB default; the channel allows containerd's 16 MiB.
        _channel = UnixGrpcChannel.Create(path);
        _client = new ImageService.ImageServiceClient(_channel);
    }

    /// <summary>
    /// Forwards one call with the caller's cancellation and deadline (or <paramref name="defaultTimeout"/>). The
    /// backend's status comes back as it is; a backend that cannot be reached is Unavailable with its address.
    /// </summary>
    public async Task<T> CallAsync<T>(string image, string method, TimeSpan defaultTimeout, ServerCallContext context,
        Func<ImageService.ImageServiceClient, CallOptions, Task<T>> call)
    {
        var deadline = context.Deadline == DateTime.MaxValue ? DateTime.UtcNow + defaultTimeout : context.Deadline.ToUniversalTime();
        try
        {
            return await call(_client, new CallOptions(deadline: deadline, cancellationToken: context.CancellationToken)).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.Unavailable)
        {
            _log.LogWarning("CRI {Method} {Image}: backing image service {Backend} is unavailable: {Error}", method, image, Address, e.Status.Detail);
            throw new RpcException(new Status(StatusCode.Unavailable, $"backing CRI image service {Address}: {e.Status.Detail}"));
        }
        catch (RpcException e)
        {
            _log.LogInformation("CRI {Method} {Image}: backend answered {Code}: {Error}", method, image, e.StatusCode, e.Status.Detail);
            throw new RpcException(e.Status, e.Trailers);
        }
    }

    public void Dispose() => _channel.Dispose();
}
