using System.Diagnostics;
using Stargz.Fuse.Handover;
using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

/// <summary>The fd store protocol (sd_notify FDSTORE, sd_listen_fds) and adopting a connection whose server died.</summary>
public sealed class HandoverTests
{
    [Fact]
    public void A_stored_fd_arrives_with_its_name_and_the_senders_pid()
    {
        using var listener = new NotifyListener(NotifyListener.NewAbstractName("stargz-test"));
        using var notifier = new ServiceManagerNotifier(listener.Path);
        var (r, w) = Pipe();
        try
        {
            notifier.StoreFds("fuse-abc", [r, w]);
            var m = listener.Receive(5000);
            Assert.NotNull(m);
            Assert.Equal("1", m.Value("FDSTORE"));
            Assert.Equal("fuse-abc", m.Value("FDNAME"));
            Assert.Equal(Environment.ProcessId, m.SenderPid);
            Assert.Equal(2, m.Fds.Length);
            // The received fds are the same pipe: a byte written through one copy comes out of the other.
            using (var wr = new FileStream(new Microsoft.Win32.SafeHandles.SafeFileHandle(m.Fds[1], ownsHandle: true), FileAccess.Write))
                wr.WriteByte(42);
            using var rd = new FileStream(new Microsoft.Win32.SafeHandles.SafeFileHandle(r, ownsHandle: true), FileAccess.Read);
            Assert.Equal(42, rd.ReadByte());
            NotifyNative.Close(m.Fds[0]);

            notifier.RemoveFds("fuse-abc");
            var rm = listener.Receive(5000);
            Assert.NotNull(rm);
            Assert.Equal("1", rm.Value("FDSTOREREMOVE"));
            Assert.Empty(rm.Fds);
        }
        finally { NotifyNative.Close(w); }
    }

    [Fact]
    public void Names_the_service_manager_would_refuse_are_refused_before_sending()
    {
        Assert.True(ServiceManagerNotifier.IsValidName("fuse-0123456789abcdef"));
        Assert.False(ServiceManagerNotifier.IsValidName("a:b"));
        Assert.False(ServiceManagerNotifier.IsValidName(""));
        Assert.False(ServiceManagerNotifier.IsValidName(new string('x', 256)));
        Assert.False(ServiceManagerNotifier.IsValidName("with space"));
        using var listener = new NotifyListener(NotifyListener.NewAbstractName("stargz-test"));
        using var notifier = new ServiceManagerNotifier(listener.Path);
        Assert.Throws<ArgumentException>(() => notifier.StoreFds("a:b", [0]));
    }

    [Fact]
    public void Listen_fds_are_taken_only_when_meant_for_this_process()
    {
        var env = new Dictionary<string, string?> { ["LISTEN_FDS"] = "3", ["LISTEN_PID"] = "1234", ["LISTEN_FDNAMES"] = "fuse-a:fuse-a:fuse-b" };
        var fds = ListenFds.Take(k => env.GetValueOrDefault(k), pid: 1234, clear: false);
        Assert.Equal([("fuse-a", 3), ("fuse-a", 4), ("fuse-b", 5)], fds);
        Assert.Empty(ListenFds.Take(k => env.GetValueOrDefault(k), pid: 999, clear: false)); // another process's
        env.Remove("LISTEN_PID");
        Assert.Empty(ListenFds.Take(k => env.GetValueOrDefault(k), pid: 1234, clear: false));
        env["LISTEN_PID"] = "1234";
        env["LISTEN_FDS"] = "x";
        Assert.Empty(ListenFds.Take(k => env.GetValueOrDefault(k), pid: 1234, clear: false));
    }

    [Fact]
    public void The_agreement_file_round_trips_and_a_broken_one_is_refused()
    {
        var ok = FuseConnectionStore.ParseState("mountpoint=/var/lib/x/snapshots/3/fs\nminor=40\npassthrough=1\ndirect_io_allow_mmap=0\nmax_read=1048576\n");
        Assert.NotNull(ok);
        Assert.Equal("/var/lib/x/snapshots/3/fs", ok.Value.MountPoint);
        Assert.Equal(new FuseAgreement(40, true, false, 1048576), ok.Value.Agreement);
        Assert.Null(FuseConnectionStore.ParseState("minor=40\nmax_read=1048576\n")); // no mount point
        Assert.Null(FuseConnectionStore.ParseState("mountpoint=/x\nminor=12\nmax_read=1048576\n")); // protocol too old
        Assert.Null(FuseConnectionStore.ParseState("mountpoint=/x\nminor=40\nmax_read=12\n"));
        Assert.Null(FuseConnectionStore.ParseState("mountpoint=relative\nminor=40\nmax_read=1048576\n"));
        Assert.Null(ok.Value.Detached);
        // A connection detached from its mount point (its layer promoted) carries its tag and a name of its own.
        var detached = FuseConnectionStore.ParseState("mountpoint=/x/fs\nminor=40\npassthrough=0\ndirect_io_allow_mmap=0\nmax_read=1048576\ndetached=sha256:aa sha256:bb\n");
        Assert.Equal("sha256:aa sha256:bb", detached!.Value.Detached);
        Assert.NotEqual(FuseConnectionStore.NameOf("/x/fs"), FuseConnectionStore.DetachedNameOf("/x/fs", "sha256:aa sha256:bb"));
        Assert.NotEqual(FuseConnectionStore.DetachedNameOf("/x/fs", "a"), FuseConnectionStore.DetachedNameOf("/x/fs", "b"));
        Assert.True(ServiceManagerNotifier.IsValidName(FuseConnectionStore.DetachedNameOf("/x/fs", "sha256:aa sha256:bb")));
        Assert.NotEqual(FuseConnectionStore.NameOf("/a/fs"), FuseConnectionStore.NameOf("/b/fs"));
        Assert.True(ServiceManagerNotifier.IsValidName(FuseConnectionStore.NameOf("/a/fs")));
    }

    [Fact]
    public async Task A_read_pending_when_the_server_is_killed_is_answered_by_the_server_that_adopts_the_kept_connection()
    {
        Requires.Fuse();
        Requires.Root();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-adopt");
        var mnt = dir.Sub("mnt");
        using var kept = await StoredHost.StartAsync(mnt, dir.Sub("state"), ct);
        var (host, listener, stored) = (kept.Host, kept.Listener, kept.Stored);
        Process? reader = null;
        FuseServer? adopter = null;
        try
        {
            Assert.Equal(host.Id, stored.SenderPid);
            Assert.Equal(FuseConnectionStore.NameOf(mnt), stored.Value("FDNAME"));
            Assert.NotEmpty(stored.Fds);
            var mountBefore = MountInfo.Find(mnt);
            Assert.NotNull(mountBefore);

            // A READ the dying server has read and never answers.
            reader = Process.Start(new ProcessStartInfo(Requires.Command("sha256sum"), Path.Combine(mnt, "block.bin"))
            { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true })!;
            Assert.Equal("READ-PENDING", await kept.NextLineAsync(ct));
            await kept.KillAsync(ct);
            // The connection lives on in the store: the reader neither fails nor finishes, it waits.
            await Task.Delay(500, ct);
            Assert.False(reader.HasExited, "the reader ended when the server died instead of waiting");

            // A new server (here: this process) adopts it by mount point: same mount, the pending READ answered by it.
            var fs = new MemoryFileSystem();
            fs.AddFile("hello.txt", "hello from the child\n");
            var data = new byte[4096];
            Array.Fill(data, (byte)0x5A);
            fs.AddFile("block.bin", data);
            var store = kept.AdoptingStore();
            Assert.True(store.Holds(mnt));
            adopter = FuseServer.Mount(mnt, fs, new FuseMountOptions { FsName = "stargz-testhost", Connections = store });
            Assert.True(adopter.Adopted);
            using var readerWait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            readerWait.CancelAfter(TimeSpan.FromSeconds(15));
            await reader.WaitForExitAsync(readerWait.Token);
            Assert.Equal(0, reader.ExitCode);
            Assert.StartsWith(Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(data)), await reader.StandardOutput.ReadToEndAsync(ct));
            Assert.True(adopter.WaitedRequests >= 1, $"waited requests: {adopter.WaitedRequests}");
            Assert.Equal(mountBefore.DeviceId, MountInfo.Find(mnt)?.DeviceId); // not mounted again
            Assert.Equal("hello from the child\n", await File.ReadAllTextAsync(Path.Combine(mnt, "hello.txt"), ct));

            // Unmounting for good tells the store to let go.
            adopter.Unmount();
            var removed = listener.Receive(5000);
            Assert.NotNull(removed);
            Assert.Equal("1", removed.Value("FDSTOREREMOVE"));
            Assert.False(FuseServer.IsMountPoint(mnt));
        }
        finally
        {
            if (!host.HasExited) host.Kill();
            if (reader is { HasExited: false }) reader.Kill();
            reader?.Dispose();
            adopter?.Dispose();
            if (FuseServer.IsMountPoint(mnt)) await Tools.Run("umount", "-l", mnt);
        }
    }

    [Fact]
    public async Task A_file_held_open_in_passthrough_mode_over_the_restart_opens_again_and_closes_right()
    {
        Requires.Fuse();
        Requires.Root();
        Requires.PassthroughKernel();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-adopt-pt");
        var mnt = dir.Sub("mnt");
        var state = dir.Sub("state");
        var backing = Path.Combine(dir.Path, "backing.bin");
        var data = new byte[1 << 20];
        new Random(7).NextBytes(data);
        await File.WriteAllBytesAsync(backing, data, ct);
        var hash = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(data));
        using var kept = await StoredHost.StartAsync(mnt, state, ct, passthroughBacking: backing);
        var host = kept.Host;
        Process? holder = null;
        FuseServer? adopter = null;
        try
        {
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            var pt = Path.Combine(mnt, "pt.bin");
            // Opened in passthrough mode by the first server, and kept open over its death.
            holder = Process.Start(new ProcessStartInfo(Requires.Command("python3"))
            {
                ArgumentList = { "-c", "import sys; f = open(sys.argv[1], 'rb'); print(len(f.read()), flush=True); sys.stdin.read(); print(len(f.read(1)), flush=True)", pt },
                UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardInput = true, RedirectStandardError = true,
            })!;
            Assert.Equal($"{data.Length}", await holder.StandardOutput.ReadLineAsync(wait.Token));
            await kept.KillAsync(ct);

            using var fs = new MemoryFileSystem();
            fs.AddFile("hello.txt", "hello from the child\n");
            fs.AddFile("block.bin", new byte[4096]);
            fs.AddBackedFile("pt.bin", backing);
            adopter = FuseServer.Mount(mnt, fs, new FuseMountOptions { FsName = "stargz-testhost", Connections = kept.AdoptingStore(), Passthrough = true });
            Assert.True(adopter.Adopted);
            Assert.True(adopter.PassthroughNegotiated);
            // A new open of the same inode shares the backing file the first server registered (a second one, or a
            // cached open, would fail with EIO while the first open lasts).
            var again = await Tools.Run("sha256sum", pt);
            Assert.True(again.ExitCode == 0, again.StdErr);
            Assert.StartsWith(hash, again.StdOut);
            Assert.Equal(0, fs.ReadCalls); // passthrough: the kernel read the backing file itself
            // The held open ends; the inode leaves passthrough mode, and an open after that works as well.
            holder.StandardInput.Close();
            Assert.Equal("0", await holder.StandardOutput.ReadLineAsync(wait.Token));
            await holder.WaitForExitAsync(wait.Token);
            Assert.Equal(0, holder.ExitCode);
            var third = await Tools.Run("sha256sum", pt);
            Assert.True(third.ExitCode == 0, third.StdErr);
            Assert.StartsWith(hash, third.StdOut);
        }
        finally
        {
            if (!host.HasExited) host.Kill();
            if (holder is { HasExited: false }) holder.Kill();
            holder?.Dispose();
            adopter?.Dispose();
            if (FuseServer.IsMountPoint(mnt)) await Tools.Run("umount", "-l", mnt);
        }
    }

    [Fact]
    public async Task A_kept_connection_no_mount_takes_is_ended_and_dropped_from_the_store()
    {
        Requires.Fuse();
        Requires.Root();
        var ct = TestContext.Current.CancellationToken;
        using var dir = new TempDir("fuse-unclaimed");
        var mnt = dir.Sub("mnt");
        var state = dir.Sub("state");
        using var kept = await StoredHost.StartAsync(mnt, state, ct);
        var (host, listener) = (kept.Host, kept.Listener);
        Process? reader = null;
        try
        {
            reader = Process.Start(new ProcessStartInfo(Requires.Command("cat"), Path.Combine(mnt, "block.bin"))
            { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true })!;
            Assert.Equal("READ-PENDING", await kept.NextLineAsync(ct));
            await kept.KillAsync(ct);

            // The snapshot of this mount was removed while no daemon ran: nothing adopts it.
            var store = kept.AdoptingStore();
            Assert.True(store.Holds(mnt));
            Assert.Equal(1, store.CloseUnclaimed());
            Assert.False(store.Holds(mnt));
            var removed = listener.Receive(5000);
            Assert.NotNull(removed);
            Assert.Equal("1", removed.Value("FDSTOREREMOVE"));
            Assert.Equal(FuseConnectionStore.NameOf(mnt), removed.Value("FDNAME"));
            Assert.False(FuseServer.IsMountPoint(mnt));
            Assert.False(File.Exists(Path.Combine(state, FuseConnectionStore.NameOf(mnt))));
            // The connection is over: the reader that waited on it fails instead of hanging.
            using var readerWait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            readerWait.CancelAfter(TimeSpan.FromSeconds(15));
            await reader.WaitForExitAsync(readerWait.Token);
            Assert.NotEqual(0, reader.ExitCode);
        }
        finally
        {
            if (!host.HasExited) host.Kill();
            if (reader is { HasExited: false }) reader.Kill();
            reader?.Dispose();
            if (FuseServer.IsMountPoint(mnt)) await Tools.Run("umount", "-l", mnt);
        }
    }

    /// <summary>
    /// A TestHost serving <c>mnt</c> whose connection is kept in a store this test holds (its listener): started, its
    /// stored fds received. <see cref="AdoptingStore"/> hands them to a server in this process, as a restarted daemon
    /// gets them back.
    /// </summary>
    private sealed class StoredHost : IDisposable
    {
        public required Process Host { get; init; }
        public required NotifyListener Listener { get; init; }
        public required NotifyMessage Stored { get; init; }
        public required string State { get; init; }

        public static async Task<StoredHost> StartAsync(string mnt, string state, CancellationToken ct, string? passthroughBacking = null)
        {
            var listener = new NotifyListener(NotifyListener.NewAbstractName("stargz-test"));
            var psi = TestHost.StartInfo(mnt);
            psi.Environment["NOTIFY_SOCKET"] = listener.Path;
            psi.Environment[TestHost.StoreEnvVar] = state;
            if (passthroughBacking != null) psi.Environment[TestHost.PassthroughEnvVar] = passthroughBacking;
            var host = Process.Start(psi)!;
            try
            {
                using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
                wait.CancelAfter(TimeSpan.FromSeconds(30));
                Assert.Equal("READY", await host.StandardOutput.ReadLineAsync(wait.Token));
                var stored = listener.Receive(10_000);
                Assert.NotNull(stored);
                return new StoredHost { Host = host, Listener = listener, Stored = stored, State = state };
            }
            catch
            {
                if (!host.HasExited) host.Kill();
                host.Dispose();
                listener.Dispose();
                throw;
            }
        }

        /// <summary>Waits (bounded) for the host's next line on stdout (READ-PENDING).</summary>
        public async Task<string?> NextLineAsync(CancellationToken ct)
        {
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            return await Host.StandardOutput.ReadLineAsync(wait.Token);
        }

        /// <summary>SIGKILL: no code of the server runs; its connection lives on in the store.</summary>
        public async Task KillAsync(CancellationToken ct)
        {
            Host.Kill();
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            await Host.WaitForExitAsync(wait.Token);
        }

        /// <summary>The store a restarted server would build from what the manager passes back.</summary>
        public FuseConnectionStore AdoptingStore() => new(State, new ServiceManagerNotifier(Listener.Path),
            [.. Stored.Fds.Select(fd => (Stored.Value("FDNAME")!, fd))], null);

        public void Dispose()
        {
            if (!Host.HasExited) Host.Kill();
            Host.Dispose();
            Listener.Dispose();
        }
    }

    private static unsafe (int Read, int Write) Pipe()
    {
        int* fds = stackalloc int[2];
        Assert.Equal(0, Native.Pipe2(fds, Native.O_CLOEXEC));
        return (fds[0], fds[1]);
    }
}
