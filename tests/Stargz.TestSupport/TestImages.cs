namespace Stargz.TestSupport;

/// <summary>
/// Builds real OCI images from local files with umoci (one layer per directory given) and pushes them to a local
/// registry with skopeo. The result is a plain gzip image, as `docker build` would make; convert it with
/// <see cref="LocalContainerd.ConvertWithReferenceAsync"/> or our own converter.
/// </summary>
public static class TestImages
{
    /// <summary>
    /// Creates (or extends) the OCI layout at <paramref name="layoutDir"/> with image <paramref name="tag"/>, one layer
    /// per entry of <paramref name="layerDirs"/> (each directory's contents land at the image root, in order).
    /// umoci refuses `.wh.` files inside a layer dir; make whiteouts with `umoci insert --whiteout PATH` instead.
    /// </summary>
    public static async Task BuildAsync(string layoutDir, string tag, IReadOnlyList<string> layerDirs,
        string[]? entrypoint = null, string[]? cmd = null)
    {
        var umoci = Requires.Command("umoci");
        if (!Directory.Exists(Path.Combine(layoutDir, "blobs")))
            (await ProcessRunner.RunAsync(umoci, ["init", "--layout", layoutDir])).EnsureSuccess("umoci init");
        var img = $"{layoutDir}:{tag}";
        (await ProcessRunner.RunAsync(umoci, ["new", "--image", img])).EnsureSuccess("umoci new");
        foreach (var dir in layerDirs)
        {
            // --history.* keeps umoci from needing a tty; no-history would also do.
            (await ProcessRunner.RunAsync(umoci, ["insert", "--image", img, "--no-history", dir, "/"]))
                .EnsureSuccess($"umoci insert {dir}");
        }
        var cfg = new List<string> { "config", "--image", img, "--no-history", "--config.workingdir", "/" };
        if (entrypoint != null) foreach (var e in entrypoint) { cfg.Add("--config.entrypoint"); cfg.Add(e); }
        if (cmd != null) foreach (var c in cmd) { cfg.Add("--config.cmd"); cfg.Add(c); }
        cfg.Add("--config.env");
        cfg.Add("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        (await ProcessRunner.RunAsync(umoci, cfg)).EnsureSuccess("umoci config");
    }

    /// <summary>Pushes `layoutDir:tag` to `registryHost/repoAndTag` over plain HTTP with skopeo.</summary>
    public static async Task PushAsync(string layoutDir, string tag, string registryHost, string repoAndTag)
    {
        var skopeo = Requires.Command("skopeo");
        (await ProcessRunner.RunAsync(skopeo, ["copy", "--quiet", "--dest-tls-verify=false",
            $"oci:{layoutDir}:{tag}", $"docker://{registryHost}/{repoAndTag}"], TimeSpan.FromMinutes(5)))
            .EnsureSuccess($"skopeo copy to {registryHost}/{repoAndTag}");
    }

    /// <summary>Puts a static busybox and its applet links (sh, cat, ls, echo, ...) into rootDir/bin.</summary>
    public static void WriteBusybox(string rootDir)
    {
        var src = Requires.Which("busybox") ?? "/bin/busybox";
        if (!File.Exists(src)) Requires.Missing("busybox (Debian package busybox-static) is not installed");
        var bin = Path.Combine(rootDir, "bin");
        Directory.CreateDirectory(bin);
        File.Copy(src, Path.Combine(bin, "busybox"), overwrite: true);
        File.SetUnixFileMode(Path.Combine(bin, "busybox"), (UnixFileMode)0b111_101_101);
        foreach (var applet in new[] { "sh", "cat", "ls", "echo", "sha256sum", "find", "stat", "sleep", "head", "wc", "md5sum", "true", "test", "readlink" })
        {
            var link = Path.Combine(bin, applet);
            if (!File.Exists(link)) File.CreateSymbolicLink(link, "busybox");
        }
        foreach (var d in new[] { "etc", "tmp", "proc", "sys", "dev", "root" })
            Directory.CreateDirectory(Path.Combine(rootDir, d));
    }

    /// <summary>
    /// Lays out the three layer directories of a ~200 MB image with a real program: (1) busybox + the C libraries
    /// python3 needs, (2) the python3.11 interpreter and its stdlib, (3) dist-packages plus
    /// <paramref name="dataMegabytes"/> MB of incompressible generated data under /data (so a lazy pull that fetches
    /// only what it needs is visibly smaller than the image). Returns the three dirs.
    /// </summary>
    public static IReadOnlyList<string> WritePythonLayers(string workDir, int dataMegabytes = 100)
    {
        var python = "/usr/bin/python3.11";
        if (!File.Exists(python)) Requires.Missing("python3.11 (Debian package python3) is not installed");
        var l1 = Path.Combine(workDir, "py-l1");
        var l2 = Path.Combine(workDir, "py-l2");
        var l3 = Path.Combine(workDir, "py-l3");
        WriteBusybox(l1);
        foreach (var lib in new[] { "libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1" })
            CopyResolved($"/lib/x86_64-linux-gnu/{lib}", Path.Combine(l1, "lib/x86_64-linux-gnu", lib));
        CopyResolved("/lib64/ld-linux-x86-64.so.2", Path.Combine(l1, "lib64/ld-linux-x86-64.so.2"));
        CopyResolved(python, Path.Combine(l2, "usr/bin/python3.11"));
        File.CreateSymbolicLink(Path.Combine(l2, "usr/bin/python3"), "python3.11");
        CopyTree("/usr/lib/python3.11", Path.Combine(l2, "usr/lib/python3.11"));
        if (Directory.Exists("/usr/lib/python3/dist-packages"))
            CopyTree("/usr/lib/python3/dist-packages", Path.Combine(l3, "usr/lib/python3/dist-packages"));
        var data = Path.Combine(l3, "data");
        Directory.CreateDirectory(data);
        var rng = new Random(20261123);
        var buf = new byte[1 << 20];
        for (int i = 0; i < dataMegabytes; i++)
        {
            rng.NextBytes(buf);
            File.WriteAllBytes(Path.Combine(data, $"blob-{i:D3}.bin"), buf);
        }
        File.WriteAllText(Path.Combine(data, "message.txt"), "hello from the python image\n");
        return [l1, l2, l3];
    }

    /// <summary>Where <see cref="WriteJavaLayers"/> puts the JRE in the image (Debian's path).</summary>
    public const string JavaHome = "/usr/lib/jvm/java-17-openjdk-amd64";

    /// <summary>
    /// Lays out the layers of a large image (≥ 500 MB with the defaults) in which a program touches a small part:
    /// (1) busybox + the C/C++ libraries `java` needs, (2) the files of Debian's openjdk-17-jre-headless package at
    /// <see cref="JavaHome"/> and /etc/java-17-openjdk (about 190 MB; symlinks kept as they are), then
    /// <paramref name="bulkLayers"/> layers of <paramref name="bulkMegabytes"/> MB each of incompressible generated
    /// files under /bulk/N that `java -version` never reads. Returns the layer dirs in order.
    /// </summary>
    public static IReadOnlyList<string> WriteJavaLayers(string workDir, int bulkLayers = 3, int bulkMegabytes = 128)
    {
        const string package = "openjdk-17-jre-headless";
        if (!File.Exists(Path.Combine(JavaHome, "bin/java")))
            Requires.Missing($"{JavaHome}/bin/java ({package}) is not installed");
        var l1 = Path.Combine(workDir, "java-l1");
        var l2 = Path.Combine(workDir, "java-l2");
        WriteBusybox(l1);
        // What bin/java and lib/server/libjvm.so link against (ldd), outside the JRE itself.
        foreach (var lib in new[] { "libc.so.6", "libm.so.6", "libz.so.1", "libstdc++.so.6", "libgcc_s.so.1" })
            CopyResolved($"/lib/x86_64-linux-gnu/{lib}", Path.Combine(l1, "lib/x86_64-linux-gnu", lib));
        CopyResolved("/lib64/ld-linux-x86-64.so.2", Path.Combine(l1, "lib64/ld-linux-x86-64.so.2"));
        // The package's own file list, so the layer is the same whether or not a JDK is installed next to it.
        var list = File.ReadAllLines($"/var/lib/dpkg/info/{package}:amd64.list");
        foreach (var path in list)
        {
            if (!path.StartsWith(JavaHome + "/", StringComparison.Ordinal) && !path.StartsWith("/etc/java-17-openjdk/", StringComparison.Ordinal))
                continue;
            var info = new FileInfo(path);
            var dst = Path.Combine(l2, path.TrimStart('/'));
            if (info.LinkTarget != null)
            {
                Directory.CreateDirectory(Path.GetDirectoryName(dst)!);
                if (!File.Exists(dst) && !Directory.Exists(dst)) File.CreateSymbolicLink(dst, info.LinkTarget);
            }
            else if (info.Exists)
            {
                Directory.CreateDirectory(Path.GetDirectoryName(dst)!);
                info.CopyTo(dst, overwrite: true);
                File.SetUnixFileMode(dst, info.UnixFileMode);
            }
        }
        var dirs = new List<string> { l1, l2 };
        var rng = new Random(20261205);
        var buf = new byte[1 << 20];
        for (var layer = 0; layer < bulkLayers; layer++)
        {
            var dir = Path.Combine(workDir, $"java-bulk{layer}");
            var data = Path.Combine(dir, "bulk", layer.ToString(System.Globalization.CultureInfo.InvariantCulture));
            Directory.CreateDirectory(data);
            for (var i = 0; i < bulkMegabytes; i++)
            {
                rng.NextBytes(buf);
                File.WriteAllBytes(Path.Combine(data, $"blob-{i:D4}.bin"), buf);
            }
            dirs.Add(dir);
        }
        return dirs;
    }

    private static void CopyResolved(string src, string dst)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(dst)!);
        var real = new FileInfo(src).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? src;
        File.Copy(real, dst, overwrite: true);
        File.SetUnixFileMode(dst, File.GetUnixFileMode(real));
    }

    private static void CopyTree(string src, string dst)
    {
        Directory.CreateDirectory(dst);
        foreach (var entry in new DirectoryInfo(src).EnumerateFileSystemInfos())
        {
            var target = Path.Combine(dst, entry.Name);
            if (entry.LinkTarget != null) File.CreateSymbolicLink(target, entry.LinkTarget);
            else if (entry is DirectoryInfo) { if (entry.Name != "__pycache__") CopyTree(entry.FullName, target); }
            else if (entry is FileInfo f) { f.CopyTo(target, overwrite: true); File.SetUnixFileMode(target, f.UnixFileMode); }
        }
    }
}
