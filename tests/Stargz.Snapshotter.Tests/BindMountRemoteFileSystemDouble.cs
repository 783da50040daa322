using System.Collections.Concurrent;
using System.Runtime.InteropServices;

namespace Stargz.Snapshotter.Tests;

/// <summary>
/// TEST DOUBLE of the remote-layer seam (not the lazy layer): a "remote layer" is a local directory prepared by the
/// test, registered under a layer digest, and "mounting" it bind-mounts that directory at the mountpoint. It lets the
/// snapshotter's remote-snapshot logic (commit under the ref, AlreadyExists, fallback, single flight, check, restore)
/// be tested on real mounts without a registry. Layers whose digest is not registered are refused the way the real
/// layer refuses a non-eStargz blob.
/// </summary>
public sealed class BindMountRemoteFileSystemDouble : IRemoteFileSystem
{
    public const string DigestLabel = "containerd.io/snapshot/remote/stargz.digest";

    private readonly ConcurrentDictionary<string, string> _layers = new();
    private readonly ConcurrentDictionary<string, int> _mountCalls = new();
    private readonly ConcurrentDictionary<string, bool> _unhealthy = new();
    private int _checkCalls;

    /// <summary>Delay inside MountAsync, to widen the window for concurrent Prepares.</summary>
    public TimeSpan MountDelay { get; set; }

    public int CheckCalls => Volatile.Read(ref _checkCalls);
    public int MountCalls(string digest) => _mountCalls.TryGetValue(digest, out var n) ? n : 0;
    public ConcurrentDictionary<string, string> Mounted { get; } = new(); // mountpoint -> digest

    public void AddLayer(string digest, string dir) => _layers[digest] = dir;
    public void SetUnhealthy(string digest, bool unhealthy) => _unhealthy[digest] = unhealthy;

    public async Task MountAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        if (!labels.TryGetValue(DigestLabel, out var digest))
            throw new RemoteLayerUnavailableException("no layer digest label: not a remote layer");
        _mountCalls.AddOrUpdate(digest, 1, (_, n) => n + 1);
        if (MountDelay > TimeSpan.Zero) await Task.Delay(MountDelay, ct);
        if (!_layers.TryGetValue(digest, out var dir))
            throw new RemoteLayerUnavailableException($"layer {digest} is not eStargz (test double has no such layer)");
        Directory.CreateDirectory(mountpoint);
        if (mount(dir, mountpoint, null, MS_BIND, IntPtr.Zero) != 0)
            throw new IOException($"bind mount {dir} at {mountpoint}: errno {Marshal.GetLastPInvokeError()}");
        Mounted[mountpoint] = digest;
    }

    public Task CheckAsync(string mountpoint, IReadOnlyDictionary<string, string> labels, CancellationToken ct)
    {
        Interlocked.Increment(ref _checkCalls);
        if (!Mounted.TryGetValue(mountpoint, out var digest)) throw new IOException($"nothing mounted at {mountpoint}");
        if (_unhealthy.TryGetValue(digest, out var bad) && bad) throw new IOException($"registry unreachable for {digest}");
        return Task.CompletedTask;
    }

    /// <summary>Mountpoints passed to UnmountAsync (shutdown, failed prepare) and ReleaseAsync (snapshot removed), in order.</summary>
    public ConcurrentQueue<string> Unmounts { get; } = new();
    public ConcurrentQueue<string> Releases { get; } = new();

    public Task ReleaseAsync(string mountpoint, CancellationToken ct)
    {
        Releases.Enqueue(mountpoint);
        return Unmount(mountpoint);
    }

    public Task UnmountAsync(string mountpoint, CancellationToken ct)
    {
        Unmounts.Enqueue(mountpoint);
        return Unmount(mountpoint);
    }

    private Task Unmount(string mountpoint)
    {
        if (Mounted.TryRemove(mountpoint, out _) && umount2(mountpoint, 0) != 0)
            throw new IOException($"umount {mountpoint}: errno {Marshal.GetLastPInvokeError()}");
        return Task.CompletedTask;
    }

    private const ulong MS_BIND = 4096;

    [DllImport("libc", SetLastError = true)]
    private static extern int mount(string source, string target, string? fstype, ulong flags, IntPtr data);

    [DllImport("libc", SetLastError = true)]
    private static extern int umount2(string target, int flags);
}
