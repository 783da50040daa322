using Grpc.Core;

namespace Stargz.Snapshotter.Tests;

/// <summary>Error kinds become gRPC codes in the service only; each kind keeps the code containerd's errdefs maps back.</summary>
public class ErrorKindTests
{
    [Theory]
    [InlineData(SnapshotterErrorKind.NotFound, StatusCode.NotFound)]
    [InlineData(SnapshotterErrorKind.AlreadyExists, StatusCode.AlreadyExists)]
    [InlineData(SnapshotterErrorKind.FailedPrecondition, StatusCode.FailedPrecondition)]
    [InlineData(SnapshotterErrorKind.InvalidArgument, StatusCode.InvalidArgument)]
    [InlineData(SnapshotterErrorKind.Unavailable, StatusCode.Unavailable)]
    [InlineData(SnapshotterErrorKind.ResourceExhausted, StatusCode.ResourceExhausted)]
    public void EachKindMapsToItsGrpcCode(SnapshotterErrorKind kind, StatusCode code)
        => Assert.Equal(code, SnapshotsGrpcService.CodeOf(kind));

    [Fact]
    public void NoKindIsLeftUnmapped()
    {
        foreach (var kind in Enum.GetValues<SnapshotterErrorKind>())
            Assert.NotEqual(StatusCode.Unknown, SnapshotsGrpcService.CodeOf(kind));
    }

    [Fact]
    public void FactoriesSetTheirKindAndKeepTheMessage()
    {
        var key = "k1";
        Assert.Equal(SnapshotterErrorKind.NotFound, SnapshotterException.NotFound($"snapshot {key} does not exist").Kind);
        Assert.Equal(SnapshotterErrorKind.AlreadyExists, SnapshotterException.AlreadyExists($"snapshot {key} already exists").Kind);
        Assert.Equal(SnapshotterErrorKind.FailedPrecondition, SnapshotterException.FailedPrecondition($"snapshot {key} is not active").Kind);
        Assert.Equal(SnapshotterErrorKind.InvalidArgument, SnapshotterException.InvalidArgument($"bad {key}").Kind);
        var e = SnapshotterException.Unavailable($"layer of {key} is unavailable");
        Assert.Equal(SnapshotterErrorKind.Unavailable, e.Kind);
        Assert.Equal("layer of k1 is unavailable", e.Message);
        Assert.Equal("layer of <k1> is unavailable", e.MessageFor(s => "<" + s + ">"));
    }
}
