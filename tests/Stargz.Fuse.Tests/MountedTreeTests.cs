using System.Text;
using Stargz.Fuse.Samples;

namespace Stargz.Fuse.Tests;

public sealed class MountedTreeTests(MountFixture fx) : IClassFixture<MountFixture>
{
    [Fact]
    public async Task Stat_shows_types_sizes_modes_and_link_counts()
    {
        var m = fx.Path();
        string S(string rel) => System.IO.Path.Combine(m, rel);
        var outp = await Tools.Out("stat", "-c", "%n|%F|%s|%a|%h", S("hello.txt"), S("dir"), S("dir/sub/deep.txt"),
            S("dir/exec.sh"), S("link-to-hello"), S("large.bin"));
        var lines = outp.Trim().Split('\n');
        Assert.Equal($"{S("hello.txt")}|regular file|12|644|1", lines[0]);
        Assert.Equal($"{S("dir")}|directory|0|755|3", lines[1]);
        Assert.Equal($"{S("dir/sub/deep.txt")}|regular file|5|600|1", lines[2]);
        Assert.Equal($"{S("dir/exec.sh")}|regular file|18|755|1", lines[3]);
        Assert.Equal($"{S("link-to-hello")}|symbolic link|9|777|1", lines[4]);
        Assert.Equal($"{S("large.bin")}|regular file|{TestTree.LargeSize}|644|1", lines[5]);
    }

    [Fact]
    public async Task Ls_l_lists_a_directory_with_types_and_targets()
    {
        var outp = await Tools.Out("ls", "-l", "--time-style=+%Y", fx.Path("dir"));
        // ls pads columns, so fields are separated by one or more spaces.
        Assert.Matches(@"(?m)^-rwxr-xr-x +1 root root +18 2024 exec\.sh$", outp);
        Assert.Matches(@"(?m)^drwxr-xr-x +2 root root +0 2024 sub$", outp);
        Assert.Matches(@"(?m)^lrwxrwxrwx +1 root root +15 2024 dangling -> /does/not/exist$", outp);
        Assert.Matches(@"(?m)^-rw-r--r-- +3 root root +11 2024 hard3$", outp);
    }

    [Fact]
    public async Task Find_sees_all_10000_entries_of_one_directory()
    {
        var outp = await Tools.Out("find", fx.Path("big"), "-mindepth", "1", "-printf", "%f %s\n");
        var lines = outp.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(TestTree.BigDirEntries, lines.Length);
        var set = new HashSet<string>(lines);
        for (int i = 0; i < TestTree.BigDirEntries; i++)
            Assert.Contains($"f{i:D5} {($"{i}\n").Length}", set);
        // ls sorts and stats every entry (readdirplus path).
        var ls = await Tools.Out("ls", "-l", fx.Path("big"));
        Assert.Contains("f09999", ls);
        Assert.StartsWith($"total ", ls);
    }

    [Fact]
    public async Task Cat_returns_file_contents_and_follows_symlinks()
    {
        Assert.Equal("hello world\n", await Tools.Out("cat", fx.Path("hello.txt")));
        Assert.Equal("hello world\n", await Tools.Out("cat", fx.Path("link-to-hello")));
        Assert.Equal("deep\n", await Tools.Out("cat", fx.Path("dir/sub/deep.txt")));
        Assert.Equal("hello.txt\n", await Tools.Out("readlink", fx.Path("link-to-hello")));
        var dangling = await Tools.Run("cat", fx.Path("dir/dangling"));
        Assert.NotEqual(0, dangling.ExitCode);
        Assert.Contains("No such file or directory", dangling.StdErr);
    }

    [Fact]
    public async Task Hardlinks_share_an_inode_and_report_nlink()
    {
        var outp = await Tools.Out("stat", "-c", "%i %h", fx.Path("hard1"), fx.Path("hard2"), fx.Path("dir/hard3"));
        var lines = outp.Trim().Split('\n');
        Assert.Equal(3, lines.Length);
        Assert.All(lines, l => Assert.Equal(lines[0], l));
        Assert.EndsWith(" 3", lines[0]);
        Assert.Equal("same bytes\n", await Tools.Out("cat", fx.Path("dir/hard3")));
    }

    [Fact]
    public async Task Getfattr_shows_user_and_trusted_xattrs()
    {
        var outp = await Tools.Out("getfattr", "-d", "-m", "-", fx.Path("xattr.txt"));
        Assert.Contains("user.comment=\"hi there\"", outp);
        Assert.Contains("trusted.note=\"root only\"", outp);
        var op = await Tools.Out("getfattr", "-n", "trusted.overlay.opaque", fx.Path("opaque"));
        Assert.Contains("trusted.overlay.opaque=\"y\"", op);
        var missing = await Tools.Run("getfattr", "-n", "user.nope", fx.Path("hello.txt"));
        Assert.NotEqual(0, missing.ExitCode);
        Assert.Contains("No such attribute", missing.StdErr);
    }

    [Fact]
    public async Task Char_device_0_0_is_presented_as_a_whiteout()
    {
        var outp = await Tools.Out("stat", "-c", "%F %t %T", fx.Path("gone.txt"));
        Assert.Equal("character special file 0 0", outp.Trim());
    }

    [Fact]
    public async Task A_read_the_filesystem_fails_returns_EIO()
    {
        var r = await Tools.Run("cat", fx.Path("fail.bin"));
        Assert.NotEqual(0, r.ExitCode);
        Assert.Contains("Input/output error", r.StdErr);
    }

    [Fact]
    public async Task Writes_are_refused_as_read_only()
    {
        var touch = await Tools.Run("touch", fx.Path("new-file"));
        Assert.NotEqual(0, touch.ExitCode);
        Assert.Contains("Read-only file system", touch.StdErr);
        var mkdir = await Tools.Run("mkdir", fx.Path("dir/newdir"));
        Assert.Contains("Read-only file system", mkdir.StdErr);
        Assert.False(File.Exists(fx.Path("new-file")));
    }

    [Fact]
    public async Task Statfs_reports_the_fuse_type_and_name_length()
    {
        var outp = await Tools.Out("stat", "-f", "-c", "%T %l", fx.Path());
        // coreutils names FUSE's magic 0x65735546 "fuseblk".
        Assert.Equal("fuseblk 255", outp.Trim());
        var mounts = await File.ReadAllTextAsync("/proc/self/mounts", TestContext.Current.CancellationToken);
        Assert.Contains($"stargz-test {fx.Mnt} fuse.stargz ro,", mounts);
    }

    [Fact]
    public async Task One_GiB_generated_file_matches_the_generator()
    {
        var file = fx.Path("large.bin");
        // Selected ranges across the file, including ones that straddle page and pattern boundaries.
        long[] offsets = [0, 4095, 65521 * 3 - 7, 123_456_789, TestTree.LargeSize - 100_000];
        using var tmp = new Stargz.TestSupport.TempDir("fuse-ranges");
        foreach (var off in offsets)
        {
            int len = (int)Math.Min(100_000, TestTree.LargeSize - off);
            var outFile = System.IO.Path.Combine(tmp.Path, $"r{off}");
            await Tools.Out("dd", $"if={file}", $"of={outFile}", "bs=64K", $"skip={off}", $"count={len}",
                "iflag=skip_bytes,count_bytes", "status=none");
            var got = await File.ReadAllBytesAsync(outFile, TestContext.Current.CancellationToken);
            var want = new byte[len];
            TestPattern.Fill(off, want);
            Assert.Equal(len, got.Length);
            Assert.True(want.AsSpan().SequenceEqual(got), $"bytes at {off} differ");
        }
        // Whole file, sequentially, compared byte for byte by cmp against the generator through a fifo.
        var fifo = System.IO.Path.Combine(tmp.Path, "expected");
        await Tools.Out("mkfifo", fifo);
        var cmp = Tools.Run("cmp", file, fifo);
        await using (var w = new FileStream(fifo, FileMode.Open, FileAccess.Write, FileShare.Read, 0))
        {
            var buf = new byte[1 << 20];
            try
            {
                for (long off = 0; off < TestTree.LargeSize; off += buf.Length)
                {
                    TestPattern.Fill(off, buf);
                    await w.WriteAsync(buf, TestContext.Current.CancellationToken);
                }
            }
            catch (IOException) { /* cmp stopped early: its exit code says why */ }
        }
        var r = await cmp;
        Assert.True(r.ExitCode == 0, $"cmp: {r.StdOut}{r.StdErr}");
    }

    [Fact]
    public async Task A_file_held_in_memory_is_served_byte_for_byte()
    {
        using var tmp = new Stargz.TestSupport.TempDir("fuse-mem");
        var expected = System.IO.Path.Combine(tmp.Path, "expected.bin");
        await File.WriteAllBytesAsync(expected, TestTree.RandomBytes, TestContext.Current.CancellationToken);
        var r = await Tools.Run("cmp", fx.Path("random.bin"), expected);
        Assert.True(r.ExitCode == 0, r.StdOut + r.StdErr);
        // A read starting past the end returns nothing; one straddling the end returns the tail.
        var tail = await Tools.Out("sh", "-c", $"tail -c 5 {fx.Path("random.bin")} | od -An -tu1");
        var want = string.Join(" ", TestTree.RandomBytes[^5..].Select(b => b.ToString()));
        Assert.Equal(want, string.Join(" ", tail.Split(' ', StringSplitOptions.RemoveEmptyEntries)).Trim());
    }

    [Fact]
    public async Task Seek_data_and_hole_see_files_without_holes()
    {
        var script = "import os,sys\n" +
                     "fd=os.open(sys.argv[1],os.O_RDONLY)\n" +
                     "print(os.lseek(fd,3,os.SEEK_DATA),os.lseek(fd,3,os.SEEK_HOLE))\n" +
                     "try:\n  os.lseek(fd,12,os.SEEK_DATA)\nexcept OSError as e:\n  print(e.strerror)\n";
        var outp = await Tools.Out("python3", "-c", script, fx.Path("hello.txt"));
        Assert.Equal("3 12\nNo such device or address\n", outp);
        Assert.True(fx.Server!.RequestCount(46) > 0, "LSEEK never reached the server");
    }

    [Fact]
    public async Task Interrupting_a_blocked_reader_cancels_the_read()
    {
        var ct = TestContext.Current.CancellationToken;
        long cancelledBefore = fx.Fs.CancelledReads, readsBefore = fx.Fs.ReadCalls;
        // cat with SIGINT's default action, as a foreground command has it (a runner started in the background by a
        // non-interactive shell ignores SIGINT, and exec would pass that on).
        var psi = new System.Diagnostics.ProcessStartInfo(Stargz.TestSupport.Requires.Command("env"))
        { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "--default-signal=INT", Stargz.TestSupport.Requires.Command("cat"), fx.Path("block.bin") }) psi.ArgumentList.Add(a);
        using var cat = System.Diagnostics.Process.Start(psi)!;
        try
        {
            // Wait until the READ is parked in the filesystem, then interrupt the reader like Ctrl-C would.
            for (int i = 0; i < 600 && fx.Fs.ReadCalls == readsBefore; i++) await Task.Delay(50, ct);
            Assert.True(fx.Fs.ReadCalls > readsBefore, "cat never reached the read");
            Assert.False(cat.HasExited);
            await Tools.Out("kill", "-INT", cat.Id.ToString());
            using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
            wait.CancelAfter(TimeSpan.FromSeconds(30));
            await cat.WaitForExitAsync(wait.Token);
            Assert.NotEqual(0, cat.ExitCode);
            Assert.True(fx.Fs.CancelledReads > cancelledBefore, "the filesystem's read was not cancelled");
        }
        finally
        {
            if (!cat.HasExited) cat.Kill();
        }
    }

    [Fact]
    public async Task Overlayfs_applies_whiteouts_and_opaque_dirs_from_the_fuse_lower()
    {
        var lowerFuse = fx.Path();
        using var tmp = new Stargz.TestSupport.TempDir("fuse-ovl");
        var base_ = tmp.Sub("base");
        File.WriteAllText(System.IO.Path.Combine(base_, "gone.txt"), "should be hidden\n");
        File.WriteAllText(System.IO.Path.Combine(base_, "baseonly.txt"), "base\n");
        Directory.CreateDirectory(System.IO.Path.Combine(base_, "opaque"));
        File.WriteAllText(System.IO.Path.Combine(base_, "opaque", "old.txt"), "old\n");
        var upper = tmp.Sub("upper");
        var work = tmp.Sub("work");
        var merged = tmp.Sub("merged");
        await Tools.Out("mount", "-t", "overlay", "overlay", "-o",
            $"lowerdir={lowerFuse}:{base_},upperdir={upper},workdir={work}", merged);
        try
        {
            Assert.False(File.Exists(System.IO.Path.Combine(merged, "gone.txt")));
            var ls = await Tools.Out("ls", "-A", System.IO.Path.Combine(merged, "opaque"));
            Assert.Equal("new.txt\n", ls);
            Assert.Equal("base\n", await Tools.Out("cat", System.IO.Path.Combine(merged, "baseonly.txt")));
            Assert.Equal("hello world\n", await Tools.Out("cat", System.IO.Path.Combine(merged, "hello.txt")));
            var top = await Tools.Out("ls", "-A", merged);
            Assert.DoesNotContain("gone.txt", top);
            // Writes land in the upper dir; the FUSE lower stays untouched.
            await File.WriteAllTextAsync(System.IO.Path.Combine(merged, "hello.txt"), "changed\n", TestContext.Current.CancellationToken);
            Assert.Equal("changed\n", await Tools.Out("cat", System.IO.Path.Combine(merged, "hello.txt")));
            Assert.Equal("hello world\n", await Tools.Out("cat", fx.Path("hello.txt")));
        }
        finally
        {
            await Tools.Run("umount", merged);
        }
    }
}
