using System.Diagnostics;
using System.Runtime.CompilerServices;
using Stargz.Fuse.Samples;

namespace Stargz.Fuse.Tests;

/// <summary>
/// The test executable doubles as a tiny FUSE server process for tests that must kill the server:
/// started with STARGZ_FUSE_TESTHOST=MOUNTPOINT it mounts a small tree, reports on stdout and serves until killed.
/// </summary>
internal static class TestHost
{
    public const string EnvVar = "STARGZ_FUSE_TESTHOST";
    /// <summary>With this set (a state dir) and NOTIFY_SOCKET, the host keeps its connection in that fd store.</summary>
    public const string StoreEnvVar = "STARGZ_FUSE_TESTHOST_STORE";
    /// <summary>With this set (a local file), the host also serves it as pt.bin with passthrough on.</summary>
    public const string PassthroughEnvVar = "STARGZ_FUSE_TESTHOST_PASSTHROUGH";

#pragma warning disable CA2255 // the module initializer is the only hook that runs before xunit's generated Main
    [ModuleInitializer]
#pragma warning restore CA2255
    internal static void MaybeServe()
    {
        var mnt = Environment.GetEnvironmentVariable(EnvVar);
        if (string.IsNullOrEmpty(mnt)) return;
        try
        {
            var fs = new MemoryFileSystem();
            fs.AddFile("hello.txt", "hello from the child\n");
            fs.AddFile("block.bin", new byte[4096]).BlockReads = true;
            var backing = Environment.GetEnvironmentVariable(PassthroughEnvVar);
            if (!string.IsNullOrEmpty(backing)) fs.AddBackedFile("pt.bin", backing);
            var storeDir = Environment.GetEnvironmentVariable(StoreEnvVar);
            var store = string.IsNullOrEmpty(storeDir) ? null : Handover.FuseConnectionStore.FromEnvironment(storeDir, Console.Error.WriteLine);
            var server = FuseServer.Mount(mnt, fs, new FuseMountOptions { FsName = "stargz-testhost", Log = Console.Error.WriteLine, Connections = store,
                Passthrough = !string.IsNullOrEmpty(backing) });
            Console.Out.WriteLine("READY");
            Console.Out.Flush();
            // "unmount" on stdin: end cleanly (the non-root test uses this to exercise fusermount3 -u).
            new Thread(() =>
            {
                var cmd = Console.In.ReadLine();
                if (cmd == "unmount") server.Unmount();
            }) { IsBackground = true }.Start();
            bool reported = false;
            while (!server.Completion.Wait(50))
            {
                if (!reported && fs.ReadCalls > 0)
                {
                    Console.Out.WriteLine("READ-PENDING");
                    Console.Out.Flush();
                    reported = true;
                }
            }
            Environment.Exit(0);
        }
        catch (Exception e)
        {
            Console.Error.WriteLine(e);
            Environment.Exit(3);
        }
    }

    /// <summary>A start info that runs this test assembly in host mode.</summary>
    /// <param name="asUser">run as this uid/gid through setpriv (null: as ourselves).</param>
    public static ProcessStartInfo StartInfo(string mountPoint, int? asUser = null)
    {
        var self = Environment.ProcessPath!;
        var psi = new ProcessStartInfo(self)
        {
            UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true,
        };
        if (asUser is int uid)
        {
            psi.FileName = Stargz.TestSupport.Requires.Command("setpriv");
            foreach (var a in new[] { $"--reuid={uid}", $"--regid={uid}", "--clear-groups", "--", self }) psi.ArgumentList.Add(a);
            psi.Environment["HOME"] = "/tmp";
            psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        }
        // Under `dotnet exec` the process is the muxer; then name our assembly explicitly.
        if (Path.GetFileNameWithoutExtension(self) == "dotnet") psi.ArgumentList.Add(typeof(TestHost).Assembly.Location);
        psi.Environment[EnvVar] = mountPoint;
        return psi;
    }
}
