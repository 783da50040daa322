using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace Stargz.Containerd;

/// <summary>
/// Records which files are opened on one filesystem, in first-open order, with fanotify (FAN_CLASS_NOTIF: no
/// permission events, nothing is ever blocked). The mark is FAN_MARK_FILESYSTEM on the superblock of the mount at
/// <c>mountPoint</c> — a private overlay mount of the image's rootfs — so opens through runc's bind mount of it in the
/// container's own mount namespace are seen too (a FAN_MARK_MOUNT mark would see only our vfsmount, not runc's).
/// Needs CAP_SYS_ADMIN. Each event's fd is mapped to a path with readlink(/proc/self/fd/N); see <see cref="ToImagePath"/>.
/// </summary>
public sealed partial class FanotifyRecorder : IDisposable
{
    private const uint FAN_CLASS_NOTIF = 0x0, FAN_CLOEXEC = 0x1, FAN_NONBLOCK = 0x2;
    private const uint FAN_MARK_ADD = 0x1, FAN_MARK_FILESYSTEM = 0x100;
    private const ulong FAN_OPEN = 0x20, FAN_OPEN_EXEC = 0x1000, FAN_Q_OVERFLOW = 0x4000;
    private const int O_RDONLY = 0, O_LARGEFILE = 0x8000, O_CLOEXEC = 0x80000, AT_FDCWD = -100, EAGAIN = 11, EINTR = 4;
    private const int MetadataLength = 24; // struct fanotify_event_metadata (vers 3)

    private readonly int _fd;
    private readonly string _mountPoint;
    private readonly Thread _reader;
    private readonly List<string> _order = [];
    private readonly HashSet<string> _seen = new(StringComparer.Ordinal);
    private readonly Lock _lock = new();
    private volatile bool _stop;
    private bool _closed;
    private Exception? _failure;

    /// <summary>True when the kernel dropped events (queue overflow): the record is then incomplete.</summary>
    public bool Overflowed { get; private set; }

    private FanotifyRecorder(int fd, string mountPoint)
    {
        _fd = fd;
        _mountPoint = mountPoint;
        _reader = new Thread(ReadLoop) { IsBackground = true, Name = "fanotify" };
    }

    /// <summary>Marks the filesystem mounted at <paramref name="mountPoint"/> and starts reading events.</summary>
    public static FanotifyRecorder Start(string mountPoint)
    {
        var full = Path.GetFullPath(mountPoint).TrimEnd('/');
        // O_CLOEXEC on the event fds too: ctr is started while events arrive, and must not inherit the opened files.
        int fd = fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY | O_LARGEFILE | O_CLOEXEC);
        if (fd < 0)
            throw new IOException($"fanotify_init: {Marshal.GetLastPInvokeErrorMessage()} (errno {Marshal.GetLastPInvokeError()}; needs root / CAP_SYS_ADMIN)");
        if (fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_OPEN | FAN_OPEN_EXEC, AT_FDCWD, full) != 0)
        {
            var (errno, msg) = (Marshal.GetLastPInvokeError(), Marshal.GetLastPInvokeErrorMessage());
            close(fd);
            throw new IOException($"fanotify_mark {full}: {msg} (errno {errno})");
        }
        var r = new FanotifyRecorder(fd, full);
        r._reader.Start();
        return r;
    }

    /// <summary>Drains what is queued, stops, and returns the image paths opened (absolute, first open first, each once).</summary>
    public IReadOnlyList<string> Stop()
    {
        _stop = true;
        _reader.Join();
        if (_failure is not null) throw new IOException($"reading fanotify events: {_failure.Message}", _failure);
        lock (_lock) return [.. _order];
    }

    private void ReadLoop()
    {
        var buf = ArrayPool<byte>.Shared.Rent(64 * 1024);
        try
        {
            // Non-blocking fd + poll with a short timeout: Stop() is seen within 100 ms, and a final drain after it
            // picks up events queued before the workload ended.
            bool draining = false;
            while (true)
            {
                var pfd = new PollFd { Fd = _fd, Events = 1 /* POLLIN */ };
                poll(ref pfd, 1, 100);
                int n;
                unsafe
                {
                    fixed (byte* p = buf) n = (int)read(_fd, p, (nuint)buf.Length);
                }
                if (n < 0)
                {
                    int errno = Marshal.GetLastPInvokeError();
                    if (errno is not (EAGAIN or EINTR)) throw new IOException($"read: errno {errno}");
                    if (draining) return;
                    if (_stop) draining = true;
                    continue;
                }
                Parse(buf.AsSpan(0, n));
            }
        }
        catch (Exception e)
        {
            _failure = e;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buf);
        }
    }

    private void Parse(ReadOnlySpan<byte> events)
    {
        Span<byte> link = stackalloc byte[4096];
        while (events.Length >= MetadataLength)
        {
            uint len = BinaryPrimitives.ReadUInt32LittleEndian(events);
            ulong mask = BinaryPrimitives.ReadUInt64LittleEndian(events[8..]);
            int fd = BinaryPrimitives.ReadInt32LittleEndian(events[16..]);
            if (len < MetadataLength || len > events.Length) break;
            events = events[(int)len..];
            if ((mask & FAN_Q_OVERFLOW) != 0) Overflowed = true;
            if (fd < 0) continue;
            try
            {
                nint got;
                unsafe
                {
                    fixed (byte* l = link) got = readlink($"/proc/self/fd/{fd}", l, (nuint)link.Length);
                }
                if (got <= 0) continue;
                var path = ToImagePath(System.Text.Encoding.UTF8.GetString(link[..(int)got]), _mountPoint);
                if (path is null) continue;
                lock (_lock)
                    if (_seen.Add(path)) _order.Add(path);
            }
            finally
            {
                close(fd);
            }
        }
    }

    /// <summary>
    /// The path inside the image of a file whose /proc/self/fd link reads <paramref name="link"/>, or null when it is
    /// not a file of the image. Opened through our own mount the link is <c>MOUNTPOINT/etc/passwd</c>; opened in the
    /// container (runc pivot_root'ed into its bind mount, unreachable from our root) the kernel prints the path from
    /// that mount's root, <c>/etc/passwd</c>. Deleted files (" (deleted)") and anonymous objects ("pipe:[…]") are not
    /// image files.
    /// </summary>
    public static string? ToImagePath(string link, string mountPoint)
    {
        if (link.Length == 0 || link[0] != '/' || link.EndsWith(" (deleted)", StringComparison.Ordinal)) return null;
        var mp = mountPoint.TrimEnd('/');
        if (mp.Length > 0 && link.StartsWith(mp, StringComparison.Ordinal))
        {
            if (link.Length == mp.Length) return null; // the root directory itself
            if (link[mp.Length] == '/') link = link[mp.Length..];
        }
        return link == "/" ? null : link;
    }

    public void Dispose()
    {
        if (_closed) return;
        _closed = true;
        if (!_stop)
        {
            _stop = true;
            _reader.Join();
        }
        close(_fd);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd
    {
        public int Fd;
        public short Events;
        public short Revents;
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fanotify_init(uint flags, int eventFlags);

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int fanotify_mark(int fd, uint flags, ulong mask, int dirfd, string path);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int poll(ref PollFd fds, nuint nfds, int timeout);

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial nint read(int fd, byte* buf, nuint count);

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static unsafe partial nint readlink(string path, byte* buf, nuint size);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int close(int fd);
}
