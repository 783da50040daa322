using System.Text;
using System.Text.Json;
using Stargz.TestSupport;

namespace Stargz.Containerd.Tests;

public class FanotifyPathTests
{
    [Theory]
    [InlineData("/tmp/w/rootfs/bin/busybox", "/tmp/w/rootfs", "/bin/busybox")] // opened through our mount
    [InlineData("/bin/busybox", "/tmp/w/rootfs", "/bin/busybox")]              // opened in the container (pivot_root)
    [InlineData("/tmp/w/rootfs-other/x", "/tmp/w/rootfs", "/tmp/w/rootfs-other/x")] // a prefix, not a parent
    [InlineData("/tmp/w/rootfs/etc/passwd", "/tmp/w/rootfs/", "/etc/passwd")]
    [InlineData("/tmp/w/rootfs", "/tmp/w/rootfs", null)]
    [InlineData("/", "/tmp/w/rootfs", null)]
    [InlineData("/tmp/x (deleted)", "/tmp/w/rootfs", null)]
    [InlineData("pipe:[1234]", "/tmp/w/rootfs", null)]
    [InlineData("", "/tmp/w/rootfs", null)]
    public void LinksMapToImagePaths(string link, string mountPoint, string? expected) =>
        Assert.Equal(expected, FanotifyRecorder.ToImagePath(link, mountPoint));

    [Fact]
    public void OpensOnAMarkedFilesystemAreRecordedInFirstOpenOrderOnce()
    {
        Requires.Root();
        using var dir = new TempDir("fan");
        var mnt = Directory.CreateDirectory(Path.Combine(dir.Path, "mnt")).FullName;
        // A filesystem of its own (the mark is on its superblock): a small tmpfs.
        Mounts.MountTmpfs(mnt, 1 << 20);
        try
        {
            File.WriteAllText(Path.Combine(mnt, "a"), "a");
            File.WriteAllText(Path.Combine(mnt, "b"), "b");
            File.WriteAllText(Path.Combine(mnt, "c"), "c");
            IReadOnlyList<string> got;
            using (var r = FanotifyRecorder.Start(mnt))
            {
                File.ReadAllText(Path.Combine(mnt, "b"));
                File.ReadAllText(Path.Combine(mnt, "a"));
                File.ReadAllText(Path.Combine(mnt, "b"));
                got = r.Stop();
            }
            Assert.Equal(["/b", "/a"], got);
        }
        finally
        {
            Mounts.UnmountAllUnder(mnt);
        }
    }
}

public class RootfsMountTests
{
    [Fact]
    public void OverlayOptionsArePassedAndTheLowerDirsReturnedTopmostFirst()
    {
        var (flags, data, lower) = RootfsMount.Translate("overlay", ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l3:/l2:/l1"]);
        Assert.Equal(0UL, flags);
        Assert.Equal("index=off,workdir=/w,upperdir=/u,lowerdir=/l3:/l2:/l1", data);
        Assert.Equal(["/l3", "/l2", "/l1"], lower);
    }

    [Fact]
    public void ABindIsAFlagNotData()
    {
        var (flags, data, lower) = RootfsMount.Translate("bind", ["rbind", "ro"]);
        Assert.Equal(0x1000UL | 0x4000UL | 0x1UL, flags);
        Assert.Null(data);
        Assert.Empty(lower);
    }
}

public class WorkloadSpecTests
{
    private static byte[] Config(string cfg) =>
        Encoding.UTF8.GetBytes("{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{" + cfg + "},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}");

    [Fact]
    public void EntrypointThenCmdWithoutACommand()
    {
        var p = WorkloadSpec.FromImageConfig(Config("""
            "Entrypoint":["/app/run"],"Cmd":["--port","80"],"Env":["PATH=/app:/bin","A=1"],"WorkingDir":"/app"
            """), [], "/nonexistent");
        Assert.Equal(["/app/run", "--port", "80"], p.Args);
        Assert.Equal(["PATH=/app:/bin", "A=1"], p.Env);
        Assert.Equal("/app", p.Cwd);
        Assert.Equal((0u, 0u), (p.Uid, p.Gid));
    }

    [Fact]
    public void TheCommandGivenReplacesEntrypointAndCmdAndPathIsAddedWhenMissing()
    {
        var p = WorkloadSpec.FromImageConfig(Config("""
            "Entrypoint":["/app/run"],"Cmd":["x"],"Env":["A=1"]
            """), ["/bin/sh", "-c", "true"], "/nonexistent");
        Assert.Equal(["/bin/sh", "-c", "true"], p.Args);
        Assert.Equal([WorkloadSpec.DefaultPath, "A=1"], p.Env);
        Assert.Equal("/", p.Cwd);
    }

    [Fact]
    public void NoCommandAnywhereIsAClearError()
    {
        var e = Assert.Throws<InvalidDataException>(() => WorkloadSpec.FromImageConfig(Config("\"Env\":[]"), [], "/nonexistent"));
        Assert.Contains("no Entrypoint or Cmd", e.Message);
    }

    [Fact]
    public void UsersAreNumbersOrNamesFromTheImagesPasswdAndGroup()
    {
        using var root = new TempDir("spec");
        Directory.CreateDirectory(Path.Combine(root.Path, "etc"));
        File.WriteAllText(Path.Combine(root.Path, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n");
        File.WriteAllText(Path.Combine(root.Path, "etc/group"), "root:x:0:\nstaff:x:50:\n");
        Assert.Equal((1000u, 1001u), WorkloadSpec.ResolveUser("app", root.Path));
        Assert.Equal((1000u, 50u), WorkloadSpec.ResolveUser("app:staff", root.Path));
        Assert.Equal((1000u, 1001u), WorkloadSpec.ResolveUser("1000", root.Path));
        Assert.Equal((4242u, 0u), WorkloadSpec.ResolveUser("4242", root.Path));
        Assert.Equal((4242u, 7u), WorkloadSpec.ResolveUser("4242:7", root.Path));
        Assert.Contains("\"nobody\"", Assert.Throws<InvalidDataException>(() => WorkloadSpec.ResolveUser("nobody", root.Path)).Message);
        Assert.Contains("\"wheel\"", Assert.Throws<InvalidDataException>(() => WorkloadSpec.ResolveUser("app:wheel", root.Path)).Message);
    }

    [Fact]
    public void TheSpecIsContainerdsDefaultWithTheProcessAndOurRootfs()
    {
        const string baseSpec = """{"ociVersion":"1.0.2-dev","process":{"user":{"uid":0,"gid":0},"cwd":"/","noNewPrivileges":true},"root":{"path":"rootfs"},"linux":{"cgroupsPath":"/default","namespaces":[{"type":"pid"}]}}""";
        var json = WorkloadSpec.BuildSpec(baseSpec, new WorkloadProcess(["/bin/sh", "-c", "echo \"hi\""], ["PATH=/bin"], "/w", 1000, 50), "/tmp/x/rootfs", "default", "stargz-optimize-abc");
        using var doc = JsonDocument.Parse(json);
        var s = doc.RootElement;
        var process = s.GetProperty("process");
        Assert.Equal(["/bin/sh", "-c", "echo \"hi\""], process.GetProperty("args").EnumerateArray().Select(e => e.GetString()));
        Assert.Equal("PATH=/bin", process.GetProperty("env")[0].GetString());
        Assert.Equal("/w", process.GetProperty("cwd").GetString());
        Assert.Equal(1000u, process.GetProperty("user").GetProperty("uid").GetUInt32());
        Assert.Equal(50u, process.GetProperty("user").GetProperty("gid").GetUInt32());
        Assert.False(process.GetProperty("terminal").GetBoolean());
        Assert.True(process.GetProperty("noNewPrivileges").GetBoolean());
        Assert.Equal("/tmp/x/rootfs", s.GetProperty("root").GetProperty("path").GetString());
        Assert.Equal("/default/stargz-optimize-abc", s.GetProperty("linux").GetProperty("cgroupsPath").GetString());
        Assert.Equal("pid", s.GetProperty("linux").GetProperty("namespaces")[0].GetProperty("type").GetString());
    }
}

public class RecordedFileLayerTests
{
    [Fact]
    public void EachFileBelongsToTheTopmostLayerThatHasItAndFilesOfNoLayerAreDropped()
    {
        using var dir = new TempDir("locate");
        string l0 = dir.Sub("l0"), l1 = dir.Sub("l1"), l2 = dir.Sub("l2");
        Directory.CreateDirectory(Path.Combine(l0, "bin"));
        File.WriteAllText(Path.Combine(l0, "bin/sh"), "0123456789");
        File.WriteAllText(Path.Combine(l0, "shadowed"), "old");
        File.WriteAllText(Path.Combine(l2, "shadowed"), "newer!");
        Directory.CreateDirectory(Path.Combine(l1, "data"));
        File.WriteAllText(Path.Combine(l1, "data/a"), "aa");
        var files = WorkloadRecorder.Locate(["/bin/sh", "/data/a", "/shadowed", "/created-by-the-workload", "/data"], "/nonexistent", [l2, l1, l0], 3);
        Assert.Equal([new RecordedFile("/bin/sh", 10, 0), new RecordedFile("/data/a", 2, 1), new RecordedFile("/shadowed", 6, 2)], files);
    }
}
