using System.Globalization;
using System.Security.Cryptography;
using System.Text;

namespace Stargz.Fuse.Handover;

/// <summary>What INIT agreed on a connection: a server that adopts the connection answers as the first one did.</summary>
public readonly record struct FuseAgreement(uint ProtocolMinor, bool Passthrough, bool DirectIoAllowMmap, int MaxRead);

/// <summary>A stored connection handed to a new server: its /dev/fuse fds (any of them reads and answers) and the agreement.</summary>
/// <param name="StoreName">its name in the fd store; <param name="DetachedTag">for a connection detached from its mount
/// point (<see cref="FuseServer.DetachKeepingConnection"/>), what it was tagged with; null for a mounted one.</param>
public sealed record AdoptedConnection(string MountPoint, int[] Fds, FuseAgreement Agreement, string? StoreName = null, string? DetachedTag = null);

/// <summary>
/// Keeps FUSE connections alive when this process ends: every mount's /dev/fuse fds go to the service manager's fd
/// store (systemd, or <c>stargz-snapshotter supervise</c>), and what INIT agreed goes to a small file under
/// <see cref="StateDir"/>. The kernel keeps a connection while any process holds one of its fds, and requests simply
/// queue until a reader comes back; the next process takes the fds back by mount point and serves the same mounts.
/// </summary>
public sealed class FuseConnectionStore : IDisposable
{
    private const string Prefix = "fuse-";
    private readonly ServiceManagerNotifier _notifier;
    private readonly Action<string>? _log;
    private readonly Lock _lock = new();
    private readonly Dictionary<string, AdoptedConnection> _adoptable = new(StringComparer.Ordinal);
    private readonly List<AdoptedConnection> _detached = [];
    private long _adopted;

    /// <summary>The service manager's notify socket the fds go to.</summary>
    public string ManagerSocket => _notifier.SocketPath;

    /// <summary>Directory of the agreement files (one per stored connection).</summary>
    public string StateDir { get; }
    /// <summary>Connections taken over from an earlier process so far.</summary>
    public long Adopted => Interlocked.Read(ref _adopted);
    /// <summary>Connections passed at start that no mount has taken yet.</summary>
    public int Unclaimed { get { lock (_lock) return _adoptable.Count + _detached.Count; } }

    public FuseConnectionStore(string stateDir, ServiceManagerNotifier notifier, IReadOnlyList<(string Name, int Fd)> passed, Action<string>? log)
    {
        StateDir = stateDir;
        _notifier = notifier;
        _log = log;
        Directory.CreateDirectory(stateDir);
        Collect(passed);
    }

    /// <summary>
    /// A store when a service manager listens (<c>$NOTIFY_SOCKET</c>), holding the connections it passed back
    /// (<c>$LISTEN_FDS</c>); null otherwise (mounts then end with the process, as before).
    /// </summary>
    public static FuseConnectionStore? FromEnvironment(string stateDir, Action<string>? log)
    {
        var passed = ListenFds.Take();
        var notifier = ServiceManagerNotifier.FromEnvironment();
        if (notifier == null)
        {
            foreach (var (_, fd) in passed) NotifyNative.Close(fd);
            return null;
        }
        return new FuseConnectionStore(stateDir, notifier, passed, log);
    }

    /// <summary>The fd store name of the connection mounted at <paramref name="mountPoint"/>.</summary>
    public static string NameOf(string mountPoint) =>
        Prefix + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(Path.GetFullPath(mountPoint))))[..24];

    /// <summary>The fd store name of a connection detached from <paramref name="mountPoint"/>, tagged <paramref name="tag"/>.</summary>
    public static string DetachedNameOf(string mountPoint, string tag) =>
        Prefix + "d" + Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(Path.GetFullPath(mountPoint) + "\n" + tag)))[..23];

    private void Collect(IReadOnlyList<(string Name, int Fd)> passed)
    {
        var byName = new Dictionary<string, List<int>>(StringComparer.Ordinal);
        foreach (var (name, fd) in passed)
        {
            if (!name.StartsWith(Prefix, StringComparison.Ordinal) || !IsFuseDevice(fd))
            {
                _log?.Invoke($"fd {fd} passed at start as \"{name}\" is not a stored FUSE connection; closing it");
                NotifyNative.Close(fd);
                continue;
            }
            if (!byName.TryGetValue(name, out var l)) byName[name] = l = [];
            l.Add(fd);
        }
        foreach (var (name, fds) in byName)
        {
            var state = ReadState(name);
            if (state is { Detached: { } tag } d)
            {
                // No mount point to check: a detached connection lives as long as what was made over it (an overlay).
                if (string.Equals(DetachedNameOf(d.MountPoint, tag), name, StringComparison.Ordinal))
                {
                    _detached.Add(new AdoptedConnection(d.MountPoint, fds.ToArray(), d.Agreement, name, tag));
                    continue;
                }
                state = null;
            }
            string? why = state == null ? "no agreement file" :
                !MountInfo.IsFuseMount(state.Value.MountPoint) ? $"{state.Value.MountPoint} is no longer a FUSE mount" :
                !string.Equals(NameOf(state.Value.MountPoint), name, StringComparison.Ordinal) ? "agreement file names another mount" : null;
            if (why != null)
            {
                _log?.Invoke($"stored FUSE connection {name}: {why}; closing its {fds.Count} fds");
                foreach (var fd in fds) NotifyNative.Close(fd);
                Forget(name);
                continue;
            }
            _adoptable[state!.Value.MountPoint] = new AdoptedConnection(state.Value.MountPoint, fds.ToArray(), state.Value.Agreement);
        }
    }

    /// <summary>True when a live connection for <paramref name="mountPoint"/> waits to be adopted: do not unmount it.</summary>
    public bool Holds(string mountPoint)
    {
        lock (_lock) return _adoptable.ContainsKey(Path.GetFullPath(mountPoint));
    }

    /// <summary>Mount points with a connection waiting to be adopted.</summary>
    public IReadOnlyList<string> HeldMountPoints()
    {
        lock (_lock) return [.. _adoptable.Keys];
    }

    /// <summary>Takes the stored connection of <paramref name="mountPoint"/>, if one waits.</summary>
    internal AdoptedConnection? Take(string mountPoint)
    {
        lock (_lock)
        {
            if (!_adoptable.Remove(mountPoint, out var c)) return null;
            Interlocked.Increment(ref _adopted);
            return c;
        }
    }

    /// <summary>
    /// Takes the detached connections of <paramref name="mountPoint"/> passed at start whose tag <paramref name="accept"/>
    /// accepts (e.g. those of the layer now mounted there).
    /// </summary>
    public IReadOnlyList<AdoptedConnection> TakeDetached(string mountPoint, Func<string, bool> accept)
    {
        mountPoint = Path.GetFullPath(mountPoint);
        var taken = new List<AdoptedConnection>();
        lock (_lock)
        {
            for (var i = _detached.Count - 1; i >= 0; i--)
            {
                var c = _detached[i];
                if (c.MountPoint != mountPoint || !accept(c.DetachedTag!)) continue;
                _detached.RemoveAt(i);
                taken.Add(c);
                Interlocked.Increment(ref _adopted);
            }
        }
        return taken;
    }

    /// <summary>Stores a connection's fds and agreement (after INIT, so a new process never waits for an INIT that was answered).</summary>
    /// <param name="name">its name in the store (default: the mount point's, <see cref="NameOf"/>).</param>
    /// <param name="detachedTag">set for a connection detached from its mount point.</param>
    internal void Keep(string mountPoint, IReadOnlyList<int> fds, FuseAgreement a, string? name = null, string? detachedTag = null)
    {
        name ??= NameOf(mountPoint);
        var path = Path.Combine(StateDir, name);
        var tmp = path + ".tmp";
        File.WriteAllText(tmp, string.Create(CultureInfo.InvariantCulture,
            $"mountpoint={mountPoint}\nminor={a.ProtocolMinor}\npassthrough={(a.Passthrough ? 1 : 0)}\ndirect_io_allow_mmap={(a.DirectIoAllowMmap ? 1 : 0)}\nmax_read={a.MaxRead}\n")
            + (detachedTag != null ? "detached=" + detachedTag + "\n" : ""));
        File.Move(tmp, path, overwrite: true);
        var list = new int[fds.Count];
        for (int i = 0; i < list.Length; i++) list[i] = fds[i];
        _notifier.StoreFds(name, list);
    }

    /// <summary>The connection was ended on purpose (unmount) or by the kernel: the manager lets go of its fds.</summary>
    internal void Drop(string mountPoint) => DropName(NameOf(mountPoint), mountPoint);

    /// <summary>As <see cref="Drop"/>, by the connection's name in the store.</summary>
    internal void DropName(string name, string? mountPoint = null)
    {
        try { _notifier.RemoveFds(name); }
        catch (IOException e) { _log?.Invoke($"fd store: removing {name} ({mountPoint}): {e.Message}"); }
        Forget(name);
    }

    /// <summary>Where the open modes of the connection at <paramref name="mountPoint"/> are kept (passthrough only).</summary>
    public string ModesPath(string mountPoint) => Path.Combine(StateDir, NameOf(mountPoint) + ".modes");

    private void Forget(string name)
    {
        try { File.Delete(Path.Combine(StateDir, name + ".modes")); }
        catch (IOException e) { _log?.Invoke($"fd store: {e.Message}"); }
        try { File.Delete(Path.Combine(StateDir, name)); }
        catch (IOException e) { _log?.Invoke($"fd store: {e.Message}"); }
    }

    /// <summary>
    /// Ends every connection passed at start that no mount took (its snapshot was removed meanwhile): closes the fds,
    /// drops them from the store and detaches the mount. Returns how many.
    /// </summary>
    public int CloseUnclaimed()
    {
        List<AdoptedConnection> left;
        lock (_lock)
        {
            left = [.. _adoptable.Values];
            _adoptable.Clear();
            foreach (var d in _detached)
            {
                // Nothing to unmount: ending the connection fails what still reads through it (its layer is gone).
                _log?.Invoke($"stored detached FUSE connection of {d.MountPoint} ({d.DetachedTag}) was not adopted; ending it");
                DropName(d.StoreName!, d.MountPoint);
                foreach (var fd in d.Fds) NotifyNative.Close(fd);
            }
            var n = _detached.Count;
            _detached.Clear();
            if (n > 0) _log?.Invoke($"{n} detached FUSE connections ended");
        }
        foreach (var c in left)
        {
            _log?.Invoke($"stored FUSE connection of {c.MountPoint} was not adopted (its snapshot is gone); ending it");
            Drop(c.MountPoint);
            foreach (var fd in c.Fds) NotifyNative.Close(fd);
            Native.Umount2(c.MountPoint, Native.MNT_DETACH);
        }
        return left.Count;
    }

    /// <summary>Tells the manager this process is ready, or stopping (<c>READY=1</c>, <c>STOPPING=1</c>).</summary>
    public void Notify(string state)
    {
        try { _notifier.Send(state); }
        catch (IOException e) { _log?.Invoke($"notify {state}: {e.Message}"); }
    }

    private (string MountPoint, FuseAgreement Agreement, string? Detached)? ReadState(string name)
    {
        string text;
        try { text = File.ReadAllText(Path.Combine(StateDir, name)); }
        catch (IOException) { return null; }
        return ParseState(text);
    }

    internal static (string MountPoint, FuseAgreement Agreement, string? Detached)? ParseState(string text)
    {
        string? mp = null, detached = null;
        uint minor = 0;
        bool pt = false, mmap = false;
        int maxRead = 0;
        foreach (var line in text.Split('\n'))
        {
            int eq = line.IndexOf('=');
            if (eq <= 0) continue;
            var k = line[..eq];
            var v = line[(eq + 1)..];
            switch (k)
            {
                case "mountpoint": mp = v; break;
                case "minor": uint.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out minor); break;
                case "passthrough": pt = v == "1"; break;
                case "direct_io_allow_mmap": mmap = v == "1"; break;
                case "max_read": int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out maxRead); break;
                case "detached": detached = v.Length > 0 ? v : null; break;
            }
        }
        if (mp is not { Length: > 1 } || mp[0] != '/' || minor < 31 || maxRead < 4096) return null;
        return (mp, new FuseAgreement(minor, pt, mmap, maxRead), detached);
    }

    private static bool IsFuseDevice(int fd)
    {
        try { return File.ResolveLinkTarget($"/proc/self/fd/{fd}", false)?.FullName == "/dev/fuse"; }
        catch (IOException) { return false; }
    }

    public void Dispose()
    {
        // The fds of unclaimed connections stay open until the process ends: the manager still holds its own copies.
        _notifier.Dispose();
    }
}
