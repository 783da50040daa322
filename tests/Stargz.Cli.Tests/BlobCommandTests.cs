using System.Formats.Tar;
using System.Security.Cryptography;
using System.Text.Json;
using Stargz.Estargz;
using Stargz.Estargz.Tests;
using Stargz.TestSupport;

namespace Stargz.Cli.Tests;

/// <summary>The `stargz blob` commands as a user runs them (a real process).</summary>
public class BlobCommandTests
{
    private static Task<ProcessResult> Stargz(params string[] args)
    {
        var dll = Path.Combine(AppContext.BaseDirectory, "stargz.dll");
        Assert.True(File.Exists(dll), $"{dll} missing");
        return ProcessRunner.RunAsync("dotnet", ["exec", dll, .. args], TimeSpan.FromMinutes(2));
    }

    [Fact]
    public async Task BuildTocVerifyExtract_RoundTrip()
    {
        using var dir = new TempDir("estargz-cli");
        var big = RandomNumberGenerator.GetBytes(200_000);
        var model = new List<ModelEntry>
        {
            new() { Path = "app", Type = TarEntryType.Directory, Mode = (UnixFileMode)0x1ed },
            new() { Path = "app/big", Type = TarEntryType.RegularFile, Content = big, Mode = (UnixFileMode)0x1ed },
            new() { Path = "app/small", Type = TarEntryType.RegularFile, Content = "small\n"u8.ToArray() },
            new() { Path = "app/link", Type = TarEntryType.SymbolicLink, Link = "big" },
        };
        var tar = Path.Combine(dir.Path, "in.tar");
        await File.WriteAllBytesAsync(tar, TreeModel.ToTar(model), TestContext.Current.CancellationToken);
        var blob = Path.Combine(dir.Path, "out.esgz");

        var build = (await Stargz("blob", "build", "--chunk-size", "65536", "--level", "6", "--prioritize", "app/small", tar, blob)).EnsureSuccess("blob build");
        var json = JsonDocument.Parse(build.StdOut).RootElement;
        var tocDigest = json.GetProperty("tocDigest").GetString()!;
        Assert.Equal(new FileInfo(blob).Length, json.GetProperty("size").GetInt64());
        Assert.StartsWith("sha256:", json.GetProperty("diffId").GetString());
        Assert.True(json.GetProperty("uncompressedSize").GetInt64() > big.Length);

        // `toc` prints the stored TOC: its digest is the TOC digest, and it lists the chunks.
        var toc = (await Stargz("blob", "toc", blob)).EnsureSuccess("blob toc").StdOut;
        Assert.Equal(tocDigest, TreeModel.Sha256(System.Text.Encoding.UTF8.GetBytes(toc.TrimEnd('\n'))));
        var parsed = Toc.Parse(System.Text.Encoding.UTF8.GetBytes(toc));
        Assert.Equal(4, parsed.Entries.Count(e => TocTree.CleanName(e.Name) == "app/big"));
        Assert.Equal("app/small", TocTree.CleanName(parsed.Entries[1].Name));
        Assert.Equal(LayerLabels.PrefetchLandmark, parsed.Entries[2].Name);

        Assert.Equal(0, (await Stargz("blob", "verify", blob, "--toc-digest", tocDigest)).ExitCode);
        var wrong = await Stargz("blob", "verify", blob, "--toc-digest", "sha256:" + new string('1', 64));
        Assert.Equal(1, wrong.ExitCode);
        Assert.Contains("DigestMismatchException", wrong.StdErr);

        // A flipped byte inside big's second chunk fails verify.
        var bytes = await File.ReadAllBytesAsync(blob, TestContext.Current.CancellationToken);
        var chunk = parsed.Entries.Where(e => TocTree.CleanName(e.Name) == "app/big").ElementAt(1);
        bytes[chunk.Offset + 100] ^= 0x01;
        var bad = Path.Combine(dir.Path, "bad.esgz");
        await File.WriteAllBytesAsync(bad, bytes, TestContext.Current.CancellationToken);
        Assert.Equal(1, (await Stargz("blob", "verify", bad, "--toc-digest", tocDigest)).ExitCode);

        var outDir = Path.Combine(dir.Path, "x");
        (await Stargz("blob", "extract", blob, outDir)).EnsureSuccess("blob extract");
        Assert.Equal(big, await File.ReadAllBytesAsync(Path.Combine(outDir, "app/big"), TestContext.Current.CancellationToken));
        Assert.Equal("small\n", await File.ReadAllTextAsync(Path.Combine(outDir, "app/small"), TestContext.Current.CancellationToken));
        Assert.Equal("big", new FileInfo(Path.Combine(outDir, "app/link")).LinkTarget);
        Assert.Equal((UnixFileMode)0x1ed, File.GetUnixFileMode(Path.Combine(outDir, "app/big")));
        Assert.Equal(model[1].MTime, new DateTimeOffset(File.GetLastWriteTimeUtc(Path.Combine(outDir, "app/big"))));

        // Usage errors exit 2; a file that is not a blob exits 1 with the reason.
        Assert.Equal(2, (await Stargz("blob", "build", tar)).ExitCode);
        var notBlob = await Stargz("blob", "toc", tar);
        Assert.Equal(1, notBlob.ExitCode);
        Assert.Contains("footer", notBlob.StdErr);
    }

    [Fact]
    public async Task BuildZstd_FromGzippedTar_ThenVerify()
    {
        using var dir = new TempDir("estargz-cli");
        var model = TreeModel.Random(new Random(3), 10_000, files: 15);
        var tgz = Path.Combine(dir.Path, "in.tar.gz");
        await using (var f = File.Create(tgz))
        await using (var gz = new System.IO.Compression.GZipStream(f, System.IO.Compression.CompressionLevel.Fastest))
            gz.Write(TreeModel.ToTar(model));
        var blob = Path.Combine(dir.Path, "out.zst");
        var build = (await Stargz("blob", "build", "--zstd", "--chunk-size", "10000", tgz, blob)).EnsureSuccess("blob build --zstd");
        var json = JsonDocument.Parse(build.StdOut).RootElement;
        Assert.Equal(0, (await Stargz("blob", "verify", blob, "--toc-digest", json.GetProperty("tocDigest").GetString()!, "--diff-id", json.GetProperty("diffId").GetString()!)).ExitCode);
        var bytes = await File.ReadAllBytesAsync(blob, TestContext.Current.CancellationToken);
        Assert.True(Footer.TryParse(bytes.AsSpan(bytes.Length - Footer.MaxFooterSize), out var info));
        Assert.Equal(BlobCompression.Zstd, info.Compression);
    }
}
