using System.Globalization;

namespace Stargz.Snapshotter;

/// <summary>What went wrong, as containerd's errdefs classes it; <see cref="SnapshotsGrpcService"/> maps each to its gRPC code.</summary>
public enum SnapshotterErrorKind
{
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    /// <summary>The layer (or the snapshotter) cannot serve now; a retry later may succeed.</summary>
    Unavailable,
    /// <summary>Over a size limit of the store.</summary>
    ResourceExhausted,
}

/// <summary>
/// An error of a <see cref="SnapshotterErrorKind"/> (the API turns it into the gRPC code containerd expects). The message
/// names the key or digest. Messages are kept as their format and arguments, so the API can quote each snapshot key as
/// the caller knows it (<see cref="MessageFor"/>) while <see cref="Exception.Message"/> has the keys as stored.
/// </summary>
public sealed class SnapshotterException : Exception
{
    private readonly FormattableString? _message;

    public SnapshotterErrorKind Kind { get; }

    public SnapshotterException(SnapshotterErrorKind kind, string message, Exception? inner = null) : base(message, inner) => Kind = kind;

    private SnapshotterException(SnapshotterErrorKind kind, FormattableString message, Exception? inner)
        : base(FormattableString.Invariant(message), inner)
    {
        Kind = kind;
        _message = message;
    }

    public static SnapshotterException NotFound(FormattableString m) => new(SnapshotterErrorKind.NotFound, m, null);
    public static SnapshotterException AlreadyExists(FormattableString m) => new(SnapshotterErrorKind.AlreadyExists, m, null);
    public static SnapshotterException FailedPrecondition(FormattableString m) => new(SnapshotterErrorKind.FailedPrecondition, m, null);
    public static SnapshotterException InvalidArgument(FormattableString m) => new(SnapshotterErrorKind.InvalidArgument, m, null);
    public static SnapshotterException Unavailable(FormattableString m, Exception? inner = null) => new(SnapshotterErrorKind.Unavailable, m, inner);

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
