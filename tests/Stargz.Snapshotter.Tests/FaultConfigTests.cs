using Stargz.Daemon;

namespace Stargz.Snapshotter.Tests;

/// <summary>The config keys of issue 18 (stalls, outages, the disk budget): parsed, checked, mapped.</summary>
public class FaultConfigTests
{
    private static DaemonConfig Parse(string toml)
    {
        var warnings = new List<string>();
        var c = ConfigLoader.Parse(toml, "test.toml", warnings);
        Assert.Empty(warnings);
        return c;
    }

    [Fact]
    public void StallAndOutageTimeoutsParseAndTheShorterOfOutageAndFetchingBoundsAnUncachedRead()
    {
        var d = Parse("");
        Assert.Equal((3L, 7L), (d.Blob.StallTimeoutSec, d.Blob.OutageTimeoutSec));
        Assert.Equal(7, RemoteLayerWiring.ReadTimeoutSec(d.Blob)); // the reference's fetching_timeout_sec (300) is longer

        var c = Parse("""
            [blob]
            stall_timeout_sec = 2
            outage_timeout_sec = 20
            fetching_timeout_sec = 5
            """);
        Assert.Equal((2L, 20L), (c.Blob.StallTimeoutSec, c.Blob.OutageTimeoutSec));
        Assert.Equal(5, RemoteLayerWiring.ReadTimeoutSec(c.Blob));

        var off = Parse("""
            [blob]
            outage_timeout_sec = 0
            """);
        Assert.Equal(300, RemoteLayerWiring.ReadTimeoutSec(off.Blob));

        Assert.Throws<ConfigException>(() => Parse("[blob]\nstall_timeout_sec = -1"));
        Assert.Throws<ConfigException>(() => Parse("[blob]\noutage_timeout_sec = \"soon\""));
    }

    [Fact]
    public void MaxDiskMbParsesAndIsUnboundedWhenAbsent()
    {
        Assert.Equal(0, Parse("").DirectoryCache.MaxDiskMb);
        Assert.Equal(512, Parse("[directory_cache]\nmax_disk_mb = 512").DirectoryCache.MaxDiskMb);
        Assert.Throws<ConfigException>(() => Parse("[directory_cache]\nmax_disk_mb = -5"));
    }
}
