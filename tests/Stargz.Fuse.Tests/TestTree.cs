using Stargz.Fuse;
using Stargz.Fuse.Samples;
using Stargz.TestSupport;

namespace Stargz.Fuse.Tests;

/// <summary>The example tree every mount test serves.</summary>
internal static class TestTree
{
    public const long LargeSize = 1L << 30;
    public const int BigDirEntries = 10_000;
    /// <summary>8 MiB + 123 bytes held in memory (served through the zero-copy TryReadDirect path).</summary>
    public static readonly byte[] RandomBytes = MakeRandom();

    private static byte[] MakeRandom()
    {
        var b = new byte[(8 << 20) + 123];
        new Random(42).NextBytes(b);
        return b;
    }

    public static MemoryFileSystem Build()
    {
        var fs = new MemoryFileSystem();
        fs.AddFile("hello.txt", "hello world\n");
        fs.AddFile("random.bin", RandomBytes);
        fs.AddFile("dir/sub/deep.txt", "deep\n", 0x180 /*0600*/);
        fs.AddFile("dir/exec.sh", "#!/bin/sh\necho hi\n", 0x1ED /*0755*/);
        for (int i = 0; i < BigDirEntries; i++) fs.AddFile($"big/f{i:D5}", $"{i}\n");
        fs.AddGeneratedFile("large.bin", LargeSize, TestPattern.Fill);
        fs.AddSymlink("link-to-hello", "hello.txt");
        fs.AddSymlink("dir/dangling", "/does/not/exist");
        fs.AddFile("hard1", "same bytes\n");
        fs.AddHardlink("hard2", "hard1");
        fs.AddHardlink("dir/hard3", "hard1");
        fs.AddFile("xattr.txt", "x\n");
        fs.SetXattr("xattr.txt", "user.comment", "hi there");
        fs.SetXattr("xattr.txt", "trusted.note", "root only");
        // Overlay lower-layer markers: an opaque directory and a whiteout.
        fs.AddFile("opaque/new.txt", "new\n");
        fs.SetXattr("opaque", "trusted.overlay.opaque", "y");
        fs.AddCharDevice("gone.txt", 0, 0);
        fs.AddFile("fail.bin", new byte[8192]).FailReads = Errno.EIO;
        fs.AddFile("block.bin", new byte[4096]).BlockReads = true;
        return fs;
    }
}

/// <summary>One real mount of <see cref="TestTree"/> shared by a test class.</summary>
public sealed class MountFixture : IDisposable
{
    private readonly TempDir _dir = new("fuse-mnt");
    public MemoryFileSystem Fs { get; } = TestTree.Build();
    public FuseServer? Server { get; }
    public string Mnt { get; }
    public string? SetupError { get; }

    public MountFixture()
    {
        Mnt = _dir.Sub("mnt");
        if (!Requires.IsRoot || !File.Exists("/dev/fuse")) { SetupError = "needs root and /dev/fuse"; return; }
        Server = FuseServer.Mount(Mnt, Fs, new FuseMountOptions { AllowOther = true, FsName = "stargz-test" });
    }

    /// <summary>Skips/fails like Requires.Fuse when the mount could not be made.</summary>
    public string Path(string rel = "")
    {
        Requires.Fuse();
        Assert.NotNull(Server);
        return System.IO.Path.Combine(Mnt, rel);
    }

    public void Dispose()
    {
        Server?.Dispose();
        _dir.Dispose();
    }
}

internal static class Tools
{
    public static async Task<string> Out(string tool, params string[] args)
        => (await ProcessRunner.RunAsync(Requires.Command(tool), args, TimeSpan.FromMinutes(2))).EnsureSuccess($"{tool} {string.Join(' ', args)}").StdOut;

    public static Task<ProcessResult> Run(string tool, params string[] args)
        => ProcessRunner.RunAsync(Requires.Command(tool), args, TimeSpan.FromMinutes(2));
}
