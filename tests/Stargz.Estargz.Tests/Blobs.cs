using System.IO.Compression;

namespace Stargz.Estargz.Tests;

public static class Blobs
{
    public static async Task<(byte[] Blob, BuildResult Result)> BuildAsync(byte[] tar, BuildOptions? o = null)
    {
        var output = new MemoryStream();
        var r = await EstargzBuilder.BuildAsync(new MemoryStream(tar), output, o ?? new BuildOptions { CompressionLevel = 1 }, TestContext.Current.CancellationToken);
        return (output.ToArray(), r);
    }

    public static Task<EstargzReader> OpenAsync(byte[] blob, string? tocDigest = null, EstargzReaderOptions? o = null)
        => EstargzReader.OpenAsync(new ByteArrayBlobSource(blob), tocDigest, o, TestContext.Current.CancellationToken);

    /// <summary>A gzip eStargz blob with arbitrary payload bytes and an arbitrary (possibly hostile) TOC JSON.</summary>
    public static byte[] WithToc(byte[] payload, byte[] tocJson, string tarName = "stargz.index.json")
    {
        var ms = new MemoryStream();
        ms.Write(payload);
        long tocOffset = ms.Length;
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest, leaveOpen: true))
            WriteTocTar(gz, tocJson, tarName);
        ms.Write(Footer.BuildGzip(tocOffset));
        return ms.ToArray();
    }

    public static void WriteTocTar(Stream s, byte[] json, string name)
    {
        var hdr = new byte[512];
        System.Text.Encoding.ASCII.GetBytes(name, hdr);
        WriteOctal(hdr.AsSpan(100, 8), 0x1a4);
        WriteOctal(hdr.AsSpan(108, 8), 0);
        WriteOctal(hdr.AsSpan(116, 8), 0);
        WriteOctal(hdr.AsSpan(124, 12), json.Length);
        WriteOctal(hdr.AsSpan(136, 12), 0);
        hdr[156] = (byte)'0';
        "ustar\000"u8.CopyTo(hdr.AsSpan(257));
        hdr.AsSpan(148, 8).Fill((byte)' ');
        int sum = 0;
        foreach (var b in hdr) sum += b;
        WriteOctal(hdr.AsSpan(148, 7), sum);
        s.Write(hdr);
        s.Write(json);
        s.Write(new byte[(512 - json.Length % 512) % 512 + 1024]);
    }

    private static void WriteOctal(Span<byte> f, long v)
    {
        var s = Convert.ToString(v, 8).PadLeft(f.Length - 1, '0');
        System.Text.Encoding.ASCII.GetBytes(s, f);
        f[^1] = 0;
    }

    public static byte[] Gunzip(byte[] blob)
    {
        using var gz = new GZipStream(new MemoryStream(blob), CompressionMode.Decompress);
        var ms = new MemoryStream();
        gz.CopyTo(ms);
        return ms.ToArray();
    }
}
