using System.Security.Cryptography;
using Stargz.TestSupport;

namespace Stargz.Estargz.Tests;

/// <summary>Tars made by GNU tar (the usual producer) keep their metadata, including binary xattrs.</summary>
public class GnuTarInputTests
{
    [Fact]
    public async Task BinaryXattrs_LongNamesAndBigIds_FromGnuTar_SurviveBuildAndExtract()
    {
        var ct = TestContext.Current.CancellationToken;
        Requires.Command("setfattr");
        Requires.Command("getfattr");
        using var dir = new TempDir("estargz-gnutar");
        var src = dir.Sub("src");
        var deep = Path.Combine(src, string.Join("/", Enumerable.Repeat("long-directory-name-xxxxxxxxxxxxxxxxxxxx", 5)));
        Directory.CreateDirectory(deep);
        var file = Path.Combine(deep, "capable-" + new string('f', 110));
        await File.WriteAllBytesAsync(file, RandomNumberGenerator.GetBytes(20_000), ct);
        var set = await ProcessRunner.RunAsync("setfattr", ["-n", "user.bin", "-v", "0x0100fffe80c3", file]);
        if (set.ExitCode != 0) Requires.Missing($"user xattrs not supported on {dir.Path}: {set.StdErr}");
        var tar = Path.Combine(dir.Path, "in.tar");
        (await ProcessRunner.RunAsync("tar", ["--xattrs", "--xattrs-include=*", "--owner=2000000", "--group=3000000", "--numeric-owner", "-C", src, "-cf", tar, "."])).EnsureSuccess("tar");

        var blob = Path.Combine(dir.Path, "out.esgz");
        BuildResult r;
        await using (var i = File.OpenRead(tar))
        await using (var o = File.Create(blob))
            r = await EstargzBuilder.BuildAsync(i, o, new BuildOptions(), ct);
        using var bs = new FileBlobSource(blob);
        var reader = await EstargzReader.OpenAsync(bs, r.TocDigest, null, ct);
        var rel = Path.GetRelativePath(src, file);
        var node = reader.Lookup(rel)!;
        Assert.NotNull(node);
        Assert.Equal(new byte[] { 0x01, 0x00, 0xff, 0xfe, 0x80, 0xc3 }, node.Entry.Xattrs!["user.bin"]);
        Assert.Equal((2000000, 3000000), (node.Entry.Uid, node.Entry.Gid));
        await reader.VerifyAllAsync(ct);

        var outDir = Path.Combine(dir.Path, "x");
        await EstargzExtractor.ExtractAsync(reader, outDir, new ExtractOptions { SetOwners = Requires.IsRoot }, ct);
        var got = (await ProcessRunner.RunAsync("getfattr", ["-e", "hex", "-n", "user.bin", Path.Combine(outDir, rel)])).EnsureSuccess("getfattr").StdOut;
        Assert.Contains("user.bin=0x0100fffe80c3", got);
        Assert.Equal(await File.ReadAllBytesAsync(file, ct), await File.ReadAllBytesAsync(Path.Combine(outDir, rel), ct));
    }
}
