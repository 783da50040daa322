using Grpc.Core;

namespace Stargz.Snapshotter;

/// <summary>An error with the gRPC code containerd expects (errdefs mapping). The message names the key or digest.</summary>
public sealed class SnapshotterException : Exception
{
    public StatusCode Code { get; }

    public SnapshotterException(StatusCode code, string message, Exception? inner = null) : base(message, inner) => Code = code;

    public static SnapshotterException NotFound(string m) => new(StatusCode.NotFound, m);
    public static SnapshotterException AlreadyExists(string m) => new(StatusCode.AlreadyExists, m);
    public static SnapshotterException FailedPrecondition(string m) => new(StatusCode.FailedPrecondition, m);
    public static SnapshotterException InvalidArgument(string m) => new(StatusCode.InvalidArgument, m);
    public static SnapshotterException Unavailable(string m, Exception? inner = null) => new(StatusCode.Unavailable, m, inner);
}
