using System.Formats.Tar;
using Stargz.Estargz;
using Stargz.Fuse;
using Stargz.Registry;
using Stargz.TestSupport;

namespace Stargz.Layer.Tests.Support;

/// <summary>
/// A real docker-registry, a counting proxy in front of it, a registry client that goes through the proxy, and a
/// <see cref="LayerManager"/> mounting real FUSE layers under a temp dir. Dispose unmounts everything and stops
/// every process, even when the test failed.
/// </summary>
internal sealed class LayerRig : IAsyncDisposable
{
    public LocalRegistry Registry { get; private set; } = null!;
    public CountingProxy Proxy { get; private set; } = null!;
    public RegistryClient Client { get; private set; } = null!;
    public LayerManager Manager { get; private set; } = null!;
    public TempDir Dir { get; } = new("layer-it");
    public LayerOptions Options { get; private set; } = null!;
    private int _mounts;
    private Stargz.Fuse.FuseMountOptions? _fuse;

    public static async Task<LayerRig> StartAsync(LayerOptions? options = null, Stargz.Fuse.FuseMountOptions? fuse = null)
    {
        Requires.Fuse();
        var rig = new LayerRig();
        try
        {
            rig.Registry = await LocalRegistry.StartAsync();
            rig.Proxy = new CountingProxy(rig.Registry.Host);
            rig.Client = new RegistryClient();
            rig.Options = (options ?? new LayerOptions()) with { CacheDirectory = options?.CacheDirectory ?? rig.Dir.Sub("cache") };
            rig._fuse = fuse;
            rig.Manager = new LayerManager(rig.Client, rig.Options, fuse);
            return rig;
        }
        catch
        {
            await rig.DisposeAsync();
            throw;
        }
    }

    /// <summary>A fresh manager over the same cache directory, as after a daemon restart.</summary>
    public async Task RestartManagerAsync()
    {
        await Manager.DisposeAsync();
        Manager = new LayerManager(Client, Options, _fuse);
    }

    /// <summary>Builds an eStargz blob from a tar with our builder.</summary>
    public static async Task<(byte[] Blob, BuildResult Result)> BuildAsync(byte[] tar, BuildOptions? options, CancellationToken ct)
    {
        var output = new MemoryStream();
        var result = await EstargzBuilder.BuildAsync(new MemoryStream(tar), output, options ?? new BuildOptions { ChunkSize = 1 << 20 }, ct);
        return (output.ToArray(), result);
    }

    /// <summary>Pushes a blob into repository <paramref name="repo"/> and returns its digest.</summary>
    public async Task<string> PushAsync(string repo, byte[] blob, CancellationToken ct)
    {
        var r = await Client.PushBlobAsync(ImageReference.Parse($"{Registry.Host}/{repo}:latest"), blob, null, ct);
        return r.Digest;
    }

    /// <summary>Labels as ctr-remote passes them, with the image reference going through the counting proxy.</summary>
    public Dictionary<string, string> Labels(string repo, string digest, string? tocDigest, string? layers = null)
    {
        var l = new Dictionary<string, string>
        {
            [SnapshotLabels.Reference] = $"{Proxy.Host}/{repo}:latest",
            [SnapshotLabels.Digest] = digest,
        };
        if (tocDigest != null) l[SnapshotLabels.TocDigest] = tocDigest;
        if (layers != null) l[SnapshotLabels.Layers] = layers;
        return l;
    }

    public async Task<string> MountAsync(Dictionary<string, string> labels, CancellationToken ct)
    {
        var mp = Dir.Sub("mnt" + Interlocked.Increment(ref _mounts));
        await Manager.MountAsync(mp, labels, ct);
        return mp;
    }

    public string RegistryBlobPath(string digest) =>
        Path.Combine(Registry.StorageDir, "docker", "registry", "v2", "blobs", "sha256", digest.Substring(7, 2), digest.Substring(7), "data");

    public async ValueTask DisposeAsync()
    {
        try { if (Manager != null) await Manager.DisposeAsync(); }
        catch (Exception) { }
        Mounts.UnmountAllUnder(Dir.Path);
        Client?.Dispose();
        if (Proxy != null) await Proxy.DisposeAsync();
        if (Registry != null) await Registry.DisposeAsync();
        Dir.Dispose();
    }
}

/// <summary>Tars written in tests with every entry kind a layer can hold.</summary>
internal static class TestTars
{
    public static readonly DateTimeOffset T0 = new(2021, 3, 4, 5, 6, 7, TimeSpan.Zero);

    public static byte[] Random(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        for (var i = 0; i < b.Length; i += 3) b[i] = (byte)(i >> 12);
        return b;
    }

    public static void Dir(TarWriter w, string name, int mode = 0x1ED /* 0755 */, int uid = 0, int gid = 0, Dictionary<string, string>? xattrs = null)
    {
        var e = xattrs == null ? new PaxTarEntry(TarEntryType.Directory, name) : new PaxTarEntry(TarEntryType.Directory, name, Pax(xattrs));
        Set(e, mode, uid, gid);
        w.WriteEntry(e);
    }

    public static void File(TarWriter w, string name, byte[] data, int mode = 0x1A4 /* 0644 */, int uid = 0, int gid = 0, Dictionary<string, string>? xattrs = null)
    {
        var e = xattrs == null ? new PaxTarEntry(TarEntryType.RegularFile, name) : new PaxTarEntry(TarEntryType.RegularFile, name, Pax(xattrs));
        Set(e, mode, uid, gid);
        e.DataStream = new MemoryStream(data);
        w.WriteEntry(e);
    }

    public static void Link(TarWriter w, TarEntryType type, string name, string target, int mode = 0x1FF /* 0777 */)
    {
        var e = new PaxTarEntry(type, name) { LinkName = target };
        Set(e, mode, 0, 0);
        w.WriteEntry(e);
    }

    public static void Device(TarWriter w, TarEntryType type, string name, int major, int minor, int mode = 0x180 /* 0600 */)
    {
        var e = new PaxTarEntry(type, name);
        Set(e, mode, 0, 0);
        if (type != TarEntryType.Fifo)
        {
            e.DeviceMajor = major;
            e.DeviceMinor = minor;
        }
        w.WriteEntry(e);
    }

    private static Dictionary<string, string> Pax(Dictionary<string, string> xattrs)
    {
        var d = new Dictionary<string, string>();
        foreach (var (k, v) in xattrs) d["SCHILY.xattr." + k] = v;
        return d;
    }

    private static void Set(PaxTarEntry e, int mode, int uid, int gid)
    {
        e.Mode = (UnixFileMode)mode;
        e.Uid = uid;
        e.Gid = gid;
        e.ModificationTime = T0.AddSeconds(e.Name.Length);
    }

    public static byte[] Write(Action<TarWriter> fill)
    {
        var ms = new MemoryStream();
        using (var w = new TarWriter(ms, TarEntryFormat.Pax, leaveOpen: true)) fill(w);
        return ms.ToArray();
    }
}
