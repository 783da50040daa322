using Stargz.TestSupport;

namespace Stargz.Registry.Tests.Infra;

/// <summary>
/// One real plain-HTTP docker-registry with a pushed image, shared by a test class. Started on first use
/// (after the test checked its requirements, so a missing binary skips or fails the test, not the class).
/// </summary>
public sealed class SharedRegistry : IAsyncDisposable
{
    private readonly SemaphoreSlim _gate = new(1, 1);
    private LocalRegistry? _registry;
    private PushedImage? _image;

    public async Task<(LocalRegistry Registry, PushedImage Image)> GetAsync()
    {
        Requires.Command("docker-registry");
        await _gate.WaitAsync();
        try
        {
            _registry ??= await LocalRegistry.StartAsync();
            _image ??= await PushedImage.PushAsync(_registry.BaseUrl, "test/app");
            return (_registry, _image);
        }
        finally { _gate.Release(); }
    }

    public async ValueTask DisposeAsync()
    {
        if (_registry is not null) await _registry.DisposeAsync();
        _gate.Dispose();
    }

    public static RegistryHostsConfig FastRetries(RegistryHostsConfig? c = null)
    {
        c ??= new RegistryHostsConfig();
        c.Blob = c.Blob with { MinWait = TimeSpan.FromMilliseconds(10), MaxWait = TimeSpan.FromMilliseconds(200), FetchingTimeout = TimeSpan.FromSeconds(30) };
        return c;
    }
}

/// <summary>A registry (auth or TLS configured) over storage that already holds a pushed image.</summary>
public sealed class PreparedRegistry : IAsyncDisposable
{
    public required LocalRegistry Registry { get; init; }
    public required PushedImage Image { get; init; }
    public required TempDir Dir { get; init; }

    /// <summary>
    /// Pushes the image into a plain registry first, then serves the same storage with the given
    /// auth/TLS settings: pushing through auth would need the client under test.
    /// </summary>
    public static async Task<PreparedRegistry> StartAsync(TempDir dir, string? extraHttpYaml = null, string? authYaml = null, bool tls = false)
    {
        Requires.Command("docker-registry");
        var storage = dir.Sub("storage");
        PushedImage img;
        await using (var plain = await LocalRegistry.StartAsync(storageDir: storage))
            img = await PushedImage.PushAsync(plain.BaseUrl, "test/app");
        var reg = await LocalRegistry.StartAsync(extraHttpYaml, authYaml, storage, tls: tls);
        return new PreparedRegistry { Registry = reg, Image = img, Dir = dir };
    }

    public async ValueTask DisposeAsync()
    {
        await Registry.DisposeAsync();
        Dir.Dispose();
    }
}
