using System.Globalization;
using Grpc.Core;

namespace Stargz.Snapshotter;

/// <summary>
/// An error with the gRPC code containerd expects (errdefs mapping). The message names the key or digest. Messages are
/// kept as their format and arguments, so the API can quote each snapshot key as the caller knows it
/// (<see cref="MessageFor"/>) while <see cref="Exception.Message"/> has the keys as stored.
/// </summary>
public sealed class SnapshotterException : Exception
{
    private readonly FormattableString? _message;

    public StatusCode Code { get; }

    public SnapshotterException(StatusCode code, string message, Exception? inner = null) : base(message, inner) => Code = code;

    private SnapshotterException(StatusCode code, FormattableString message, Exception? inner)
        : base(FormattableString.Invariant(message), inner)
    {
        Code = code;
        _message = message;
    }

    public static SnapshotterException NotFound(FormattableString m) => new(StatusCode.NotFound, m, null);
    public static SnapshotterException AlreadyExists(FormattableString m) => new(StatusCode.AlreadyExists, m, null);
    public static SnapshotterException FailedPrecondition(FormattableString m) => new(StatusCode.FailedPrecondition, m, null);
    public static SnapshotterException InvalidArgument(FormattableString m) => new(StatusCode.InvalidArgument, m, null);
    public static SnapshotterException Unavailable(FormattableString m, Exception? inner = null) => new(StatusCode.Unavailable, m, inner);

    /// <summary>
    /// The message with every string argument passed through <paramref name="clientName"/> (which maps a store key to
    /// the caller's key and leaves anything else as it is, e.g. <see cref="HeaderNamespace.ToClient"/>).
    /// </summary>
    public string MessageFor(Func<string, string> clientName)
    {
        if (_message == null) return Message;
        var args = _message.GetArguments();
        var mapped = new object?[args.Length];
        for (int i = 0; i < args.Length; i++) mapped[i] = args[i] is string s ? clientName(s) : args[i];
        return string.Format(CultureInfo.InvariantCulture, _message.Format, mapped);
    }
}
