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
    /// Whiteouts: a layer dir may hold `.wh.NAME` files / `.wh..wh..opq` markers; they are passed through as-is.
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
}
