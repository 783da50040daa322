namespace Stargz.Snapshotter.Tests;

public class HeaderNamespaceTests
{
    private static readonly HashSet<string> Store = ["sha256:shared", "a//mine", "x/y", "b//theirs"];

    private static Task<bool> Exists(string k) => Task.FromResult(Store.Contains(k));

    [Theory]
    [InlineData("k", "a//k")]               // a direct client's key lives in its namespace
    [InlineData("a/3/k", "a/3/k")]          // containerd's own form for the header's namespace is kept
    [InlineData("b/3/k", "a//b/3/k")]       // another namespace's containerd key is not reachable
    [InlineData("a//k", "a//a//k")]         // a key that looks like the store form still round-trips
    [InlineData("", "")]                    // no parent
    public void CreatedKeysRoundTrip(string key, string store)
    {
        var h = new HeaderNamespace("a");
        Assert.Equal(store, h.ToStore(key));
        Assert.Equal(key, h.ToClient(store));
        Assert.True(h.Sees(store) || key.Length == 0);
    }

    [Theory]
    [InlineData("mine", "a//mine")]              // the namespace's own snapshot
    [InlineData("sha256:shared", "sha256:shared")] // made without a header, e.g. a remote snapshot's chainID
    [InlineData("theirs", "a//theirs")]          // b's snapshot: not found under a
    [InlineData("x/y", "a//x/y")]                // a name with '/' made without a header is not shared
    public async Task ReferencedKeysPreferTheNamespaceThenShared(string key, string store)
        => Assert.Equal(store, await new HeaderNamespace("a").ResolveAsync(key, Exists));

    [Fact]
    public void WithoutHeaderKeysAreTakenAsTheyAre()
    {
        var h = new HeaderNamespace(null);
        Assert.True(h.IsNone);
        Assert.Equal("a//k", h.ToStore("a//k"));
        Assert.True(h.Sees("b//theirs"));
        Assert.False(new HeaderNamespace("a").Sees("b//theirs"));
    }
}
