using System.Text.Json;
using Stargz.Estargz;

namespace Stargz.Cli;

public static class Program
{
    private const string Usage = """
        usage:
          stargz blob build [--chunk-size N] [--level L] [--prioritize PATH]... [--zstd] [--parallelism N] IN OUT
              IN: a tar, tar.gz or tar.zst ("-" = stdin); prints {"tocDigest","diffId","size","uncompressedSize"}
          stargz blob toc BLOB                      print the TOC JSON exactly as stored
          stargz blob verify BLOB --toc-digest D    exit 0 only if the TOC and every chunk verify
          stargz blob extract BLOB DIR              write the tree (modes, owners, times, links, xattrs)
          stargz image convert [--zstd] [--chunk-size N] [--level L] [--prioritize PATH]... [--plain-http]
                               [--platform P | --all-platforms] [--user U:P] SRC DST
              registry to registry: every layer rebuilt as eStargz (or zstd:chunked), annotated with its TOC digest
        """ + "\n" + OptimizeCommand.Usage + RpullCommand.Usage + StatusCommand.Usage;

    public static async Task<int> Main(string[] args)
    {
        using var cts = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; cts.Cancel(); };
        try
        {
            if (args.Length >= 2 && args[0] == "image" && args[1] == "rpull")
                return await RpullCommand.RunAsync(args[2..], Console.Out, Console.Error, cts.Token);
            if (args.Length >= 1 && args[0] == "status")
                return await StatusCommand.RunAsync(args[1..], Console.Out, Console.Error, cts.Token);
            if (args.Length >= 2 && args[0] == "image" && args[1] == "optimize")
                return await OptimizeCommand.RunAsync(args[2..], Console.Out, Console.Error, cts.Token);
            if (args.Length >= 2 && args[0] == "image" && args[1] == "convert")
                return await ConvertCommand.RunAsync(args[2..], Console.Out, Console.Error, cts.Token);
            if (args.Length >= 2 && args[0] == "blob")
            {
                var rest = args[2..];
                return args[1] switch
                {
                    "build" => await BlobBuild(rest, cts.Token),
                    "toc" => await BlobToc(rest, cts.Token),
                    "verify" => await BlobVerify(rest, cts.Token),
                    "extract" => await BlobExtract(rest, cts.Token),
                    _ => Fail(),
                };
            }
            return Fail();
        }
        catch (UsageException e)
        {
            Console.Error.WriteLine($"stargz: {e.Message}");
            Console.Error.Write(Usage);
            return 2;
        }
        catch (EstargzFormatException e)
        {
            Console.Error.WriteLine($"stargz: {e.GetType().Name}: {e.Message}");
            return 1;
        }
        catch (IOException e)
        {
            Console.Error.WriteLine($"stargz: {e.Message}");
            return 1;
        }
        catch (UnauthorizedAccessException e)
        {
            Console.Error.WriteLine($"stargz: {e.Message}");
            return 1;
        }
    }

    private static int Fail()
    {
        Console.Error.Write(Usage);
        return 2;
    }

    private static async Task<int> BlobBuild(string[] args, CancellationToken ct)
    {
        var f = new ArgParser().Value("--chunk-size").Value("--level").Value("--prioritize").Value("--parallelism")
            .Switch("--zstd").Switch("--allow-prioritized-not-found").Parse(args);
        var pos = f.Positional;
        if (pos.Count != 2) throw new UsageException("blob build needs IN and OUT");
        var o = new BuildOptions
        {
            ChunkSize = f.Int("--chunk-size", min: 1) ?? 4 << 20,
            Compression = f.Has("--zstd") ? BlobCompression.Zstd : BlobCompression.Gzip,
            Prioritized = f.All("--prioritize"),
            AllowPrioritizedNotFound = f.Has("--allow-prioritized-not-found"),
        };
        if (f.Int("--level") is int level) o = o with { CompressionLevel = level };
        if (f.Int("--parallelism") is int par) o = o with { Parallelism = par };

        await using Stream input = pos[0] == "-" ? Console.OpenStandardInput() : new FileStream(pos[0], FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        var tmp = pos[1] + ".tmp-" + Environment.ProcessId;
        BuildResult r;
        try
        {
            await using (var output = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
                r = await EstargzBuilder.BuildAsync(input, output, o, ct);
            File.Move(tmp, pos[1], overwrite: true);
        }
        catch
        {
            File.Delete(tmp);
            throw;
        }
        using var stdout = Console.OpenStandardOutput();
        using (var w = new Utf8JsonWriter(stdout))
        {
            w.WriteStartObject();
            w.WriteString("tocDigest", r.TocDigest);
            w.WriteString("diffId", r.DiffId);
            w.WriteNumber("size", r.Size);
            w.WriteNumber("uncompressedSize", r.UncompressedSize);
            if (r.ZstdManifestChecksum is not null) w.WriteString("zstdManifestChecksum", r.ZstdManifestChecksum);
            if (r.ZstdManifestPosition is not null) w.WriteString("zstdManifestPosition", r.ZstdManifestPosition);
            w.WriteEndObject();
        }
        stdout.Write("\n"u8);
        return 0;
    }

    private static async Task<int> BlobToc(string[] args, CancellationToken ct)
    {
        var pos = new ArgParser().Parse(args).Positional;
        if (pos.Count != 1) throw new UsageException("blob toc needs BLOB");
        using var blob = new FileBlobSource(pos[0]);
        var footer = await EstargzReader.ReadFooterAsync(blob, ct);
        long len = footer.TocLength >= 0 ? footer.TocLength : blob.Size - footer.FooterSize - footer.TocOffset;
        if (len <= 0 || len > TocLimits.Default.MaxTocCompressedBytes || footer.TocOffset + len > blob.Size)
            throw new EstargzFormatException($"footer points at an invalid TOC range [{footer.TocOffset}, +{len})");
        var compressed = new byte[len];
        await blob.ReadAtAsync(footer.TocOffset, compressed, ct);
        var json = EstargzReader.DecodeToc(compressed, footer.Compression);
        Toc.Parse(json); // refuse to print something that is not a TOC
        using var stdout = Console.OpenStandardOutput();
        stdout.Write(json);
        if (json.Length == 0 || json[^1] != (byte)'\n') stdout.Write("\n"u8);
        return 0;
    }

    private static async Task<int> BlobVerify(string[] args, CancellationToken ct)
    {
        var f = new ArgParser().Value("--toc-digest").Value("--diff-id").Parse(args);
        var pos = f.Positional;
        if (pos.Count != 1) throw new UsageException("blob verify needs BLOB");
        if (f.Last("--toc-digest") is not { } d) throw new UsageException("blob verify needs --toc-digest D");
        using var blob = new FileBlobSource(pos[0]);
        var r = await EstargzReader.OpenAsync(blob, d, null, ct);
        await r.VerifyAllAsync(ct);
        if (f.Last("--diff-id") is { } want)
        {
            var got = await r.ComputeDiffIdAsync(ct);
            if (got != want)
                throw new DigestMismatchException("layer diffID", want, got);
        }
        int files = 0, chunks = 0;
        foreach (var n in r.Tree.Nodes) if (n.IsRegular) { files++; chunks += n.Chunks.Count; }
        Console.WriteLine($"ok: TOC {r.TocDigest}, {files} files, {chunks} chunks verified ({r.Compression})");
        return 0;
    }

    private static async Task<int> BlobExtract(string[] args, CancellationToken ct)
    {
        var f = new ArgParser().Value("--toc-digest").Parse(args);
        var pos = f.Positional;
        if (pos.Count != 2) throw new UsageException("blob extract needs BLOB and DIR");
        using var blob = new FileBlobSource(pos[0]);
        var r = await EstargzReader.OpenAsync(blob, f.Last("--toc-digest"), null, ct);
        await EstargzExtractor.ExtractAsync(r, pos[1], null, ct);
        return 0;
    }
}
