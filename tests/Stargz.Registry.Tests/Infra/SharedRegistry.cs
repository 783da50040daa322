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
