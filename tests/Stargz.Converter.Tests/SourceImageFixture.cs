using Stargz.TestSupport;

namespace Stargz.Converter.Tests;

/// <summary>
/// A real docker-registry holding a plain gzip image built with umoci from local files and pushed with skopeo, as a
/// user's `docker build` + push would leave it. Three layers: busybox; data (a small text file, a 3 MiB file that spans
/// several chunks, a symlink, a hardlink, an empty file, a file to be deleted, a dir to be made opaque); a layer
/// with a whiteout of a file of layer 2; a layer that makes a dir of layer 2 opaque and adds a file to it. Started on first use, after the test checked its requirements.
/// </summary>
public sealed class SourceImageFixture : IAsyncDisposable
{
    private readonly SemaphoreSlim _gate = new(1, 1);
    private LocalRegistry? _registry;
    private TempDir? _dir;
    private bool _pushed;
    private Exception? _failed;

    public const string Repository = "src/busybox";
    public const string Tag = "v1";
    /// <summary>What <c>cat /data/hello.txt</c> prints in the image.</summary>
    public const string Hello = "hello from the data layer";
    public const int LayerCount = 4;

    public LocalRegistry Registry => _registry ?? throw new InvalidOperationException("not started");
    public string Reference => $"{Registry.Host}/{Repository}:{Tag}";
    /// <summary>The OCI layout (umoci) the image was built in; tag <see cref="Tag"/>.</summary>
    public string LayoutDir => Path.Combine(_dir?.Path ?? throw new InvalidOperationException("not started"), "oci");
    /// <summary>Payload of /data/big.bin (3 MiB + 12345 bytes of random data).</summary>
    public byte[] Big { get; } = MakeBig();

    private static byte[] MakeBig()
    {
        var b = new byte[(3 << 20) + 12345];
        new Random(7).NextBytes(b);
        return b;
    }

    public async Task<SourceImageFixture> GetAsync()
    {
        Requires.Command("docker-registry");
        Requires.Command("umoci");
        Requires.Command("skopeo");
        await _gate.WaitAsync();
        try
        {
            if (_failed is not null) throw new InvalidOperationException($"building the source image failed earlier: {_failed.Message}", _failed);
            _registry ??= await LocalRegistry.StartAsync();
            if (!_pushed)
            {
                try
                {
                    _dir ??= new TempDir("convert-src");
                    var l1 = _dir.Sub("l1");
                    TestImages.WriteBusybox(l1);
                    var l2 = _dir.Sub("l2");
                    var data = Path.Combine(l2, "data");
                    Directory.CreateDirectory(Path.Combine(data, "sub"));
                    Directory.CreateDirectory(Path.Combine(l2, "opaque"));
                    await File.WriteAllTextAsync(Path.Combine(data, "hello.txt"), Hello + "\n");
                    await File.WriteAllBytesAsync(Path.Combine(data, "big.bin"), Big);
                    await File.WriteAllTextAsync(Path.Combine(data, "sub", "deep.txt"), "deep\n");
                    await File.WriteAllTextAsync(Path.Combine(data, "gone.txt"), "this file is deleted by layer 3\n");
                    await File.WriteAllBytesAsync(Path.Combine(data, "empty"), []);
                    await File.WriteAllTextAsync(Path.Combine(l2, "opaque", "old.txt"), "hidden by the opaque marker\n");
                    File.SetUnixFileMode(Path.Combine(data, "hello.txt"), (UnixFileMode)0b110_100_000); // 0640
                    File.CreateSymbolicLink(Path.Combine(data, "link-to-hello"), "hello.txt");
                    File2.Link(Path.Combine(data, "hello.txt"), Path.Combine(data, "hard-hello"));
                    var l3 = _dir.Sub("l3");
                    await File.WriteAllTextAsync(Path.Combine(l3, "new.txt"), "after the opaque marker\n");
                    var layout = Path.Combine(_dir.Path, "oci");
                    await TestImages.BuildAsync(layout, Tag, [l1, l2], entrypoint: ["/bin/cat"], cmd: ["/data/hello.txt"]);
                    // Layer 3: a whiteout for /data/gone.txt; layer 4: /opaque made opaque with new content (umoci writes the markers).
                    var umoci = Requires.Command("umoci");
                    (await ProcessRunner.RunAsync(umoci, ["insert", "--image", $"{layout}:{Tag}", "--no-history", "--whiteout", "/data/gone.txt"]))
                        .EnsureSuccess("umoci insert --whiteout");
                    (await ProcessRunner.RunAsync(umoci, ["insert", "--image", $"{layout}:{Tag}", "--no-history", "--opaque", l3, "/opaque"]))
                        .EnsureSuccess("umoci insert --opaque");
                    await TestImages.PushAsync(layout, Tag, _registry.Host, $"{Repository}:{Tag}");
                    _pushed = true;
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    _failed = e;
                    throw;
                }
            }
            return this;
        }
        finally { _gate.Release(); }
    }

    public async ValueTask DisposeAsync()
    {
        if (_registry is not null) await _registry.DisposeAsync();
        _dir?.Dispose();
        _gate.Dispose();
    }
}

internal static class File2
{
    /// <summary>Hard link <paramref name="link"/> to <paramref name="target"/> (link(2)).</summary>
    public static void Link(string target, string link)
    {
        if (LinkNative(target, link) != 0) throw new IOException($"link {target} {link} failed: errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "link", SetLastError = true)]
    private static extern int LinkNative(string oldpath, string newpath);
}
