using System.Formats.Tar;
using System.IO.Compression;
using System.Security.Cryptography;
using Stargz.Estargz;
using Stargz.Registry;

namespace Stargz.Converter.Tests;

/// <summary>One tar entry as a user would compare it: path, type, mode, owner, link, size, content hash, mtime.</summary>
public sealed record EntryView(string Path, string Type, int Mode, int Uid, int Gid, string? Link, long Size, string? Sha256, long MTime);

internal static class LayerContent
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    public static async Task<byte[]> DownloadAsync(RegistryClient client, ImageReference repo, string digest)
    {
        using var ms = new MemoryStream();
        await client.DownloadBlobAsync(repo, digest, ms, Ct);
        return ms.ToArray();
    }

    /// <summary>The uncompressed stream of a layer blob (gzip, zstd or plain tar, by magic).</summary>
    public static byte[] Decompress(byte[] blob)
    {
        using var input = new MemoryStream(blob);
        using Stream dec = blob is [0x1f, 0x8b, ..] ? new GZipStream(input, CompressionMode.Decompress)
            : blob is [0x28, 0xb5, 0x2f, 0xfd, ..] ? new ZstdSharp.DecompressionStream(input)
            : input;
        using var ms = new MemoryStream();
        dec.CopyTo(ms);
        return ms.ToArray();
    }

    /// <summary>Every entry of a tar, sorted by path; the root entry and the eStargz bookkeeping entries are left out.</summary>
    public static List<EntryView> Entries(byte[] tar, bool dropEstargzEntries)
    {
        var list = new List<EntryView>();
        // umoci ends a whiteout-only layer without the end-of-archive blocks (Go's tar and containerd accept that).
        using var tr = new TarReader(new MemoryStream([.. tar, .. new byte[1024]]));
        while (tr.GetNextEntry() is { } e)
        {
            var name = e.Name;
            while (name.StartsWith("./", StringComparison.Ordinal)) name = name[2..];
            name = name.Trim('/');
            if (name is "" or ".") continue;
            if (dropEstargzEntries && name is LayerLabels.TocTarName or LayerLabels.PrefetchLandmark or LayerLabels.NoPrefetchLandmark) continue;
            var type = e.EntryType switch
            {
                TarEntryType.V7RegularFile or TarEntryType.RegularFile => "reg",
                TarEntryType.Directory => "dir",
                TarEntryType.SymbolicLink => "symlink",
                TarEntryType.HardLink => "hardlink",
                var t => t.ToString(),
            };
            string? sha = null;
            if (e.DataStream is { } ds)
            {
                using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
                var buf = new byte[81920];
                int n;
                while ((n = ds.Read(buf)) > 0) h.AppendData(buf, 0, n);
                sha = System.Convert.ToHexStringLower(h.GetHashAndReset());
            }
            var link = e.EntryType is TarEntryType.HardLink or TarEntryType.SymbolicLink ? e.LinkName.TrimStart('/') : null;
            if (link is not null && link.StartsWith("./", StringComparison.Ordinal)) link = link[2..];
            list.Add(new EntryView(name, type, (int)e.Mode, e.Uid, e.Gid, link, type == "reg" ? e.Length : 0, type == "reg" ? sha : null,
                e.ModificationTime.ToUnixTimeSeconds()));
        }
        list.Sort((a, b) => string.CompareOrdinal(a.Path, b.Path));
        return list;
    }

    public static string Sha256(byte[] data) => "sha256:" + System.Convert.ToHexStringLower(SHA256.HashData(data));
}
