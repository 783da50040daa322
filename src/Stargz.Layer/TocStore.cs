using System.Buffers.Binary;
using System.Text;
using Stargz.Estargz;

namespace Stargz.Layer;

/// <summary>
/// The TOCs of layers, kept on disk next to the chunk cache so a restarted daemon mounts a layer again without the
/// registry: with every chunk cached, a layer survives a restart during a registry outage. One file per layer digest:
/// a fixed header (magic, blob size, TOC offset, compression) then the TOC JSON. The JSON is hashed again on load
/// and must match the TOC digest it is kept under (and the mount still checks it against the layer's label), so a
/// torn or altered file is dropped and the TOC is fetched from the registry as before.
/// </summary>
internal sealed class TocStore(string directory)
{
    private const uint Magic = 0x31434f54; // "TOC1"
    private const int HeaderBytes = 4 + 8 + 8 + 4 + 2;

    public string Directory { get; } = directory;

    /// <summary>The file of the layer's stored TOC.</summary>
    public string PathFor(string layerDigest) => PathOf(layerDigest);

    private string PathOf(string layerDigest) => Path.Combine(Directory, layerDigest.Replace(':', '-') + ".toc");

    /// <summary>Writes the layer's TOC atomically (temp, fsync, rename, fsync dir).</summary>
    public void Save(string layerDigest, long blobSize, EstargzReader reader, ReadOnlySpan<byte> tocJson)
    {
        System.IO.Directory.CreateDirectory(Directory);
        var digest = Encoding.ASCII.GetBytes(reader.TocDigest);
        var path = PathOf(layerDigest);
        var tmp = path + ".tmp-" + Environment.ProcessId;
        try
        {
            WriteFile(tmp, blobSize, reader, digest, tocJson);
            File.Move(tmp, path, overwrite: true);
        }
        catch
        {
            // A full disk: nothing half-written is left (the next start would only delete it).
            try { File.Delete(tmp); } catch (IOException) { }
            throw;
        }
        ChunkCache.FsyncDirectory(Directory);
    }

    private static void WriteFile(string tmp, long blobSize, EstargzReader reader, byte[] digest, ReadOnlySpan<byte> tocJson)
    {
        using (var f = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 0))
        {
            Span<byte> h = stackalloc byte[HeaderBytes];
            BinaryPrimitives.WriteUInt32LittleEndian(h, Magic);
            BinaryPrimitives.WriteInt64LittleEndian(h[4..], blobSize);
            BinaryPrimitives.WriteInt64LittleEndian(h[12..], reader.TocOffset);
            BinaryPrimitives.WriteInt32LittleEndian(h[20..], (int)reader.Compression);
            BinaryPrimitives.WriteUInt16LittleEndian(h[24..], (ushort)digest.Length);
            f.Write(h);
            f.Write(digest);
            f.Write(tocJson);
            f.Flush(flushToDisk: true);
        }
    }

    /// <summary>
    /// The layer's stored TOC, or null when there is none or it is damaged (then it is deleted; the reason goes to
    /// <paramref name="problem"/>).
    /// </summary>
    public (ResolvedToc Toc, long BlobSize)? TryLoad(string layerDigest, out string? problem)
    {
        problem = null;
        var path = PathOf(layerDigest);
        byte[] data;
        try { data = File.ReadAllBytes(path); }
        catch (FileNotFoundException) { return null; }
        catch (DirectoryNotFoundException) { return null; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // An unreadable stored TOC (EIO) is fetched from the registry again, as a damaged one is.
            problem = $"stored TOC of layer {layerDigest} cannot be read ({e.Message}); the registry is asked";
            return null;
        }
        try
        {
            if (data.Length < HeaderBytes || BinaryPrimitives.ReadUInt32LittleEndian(data) != Magic)
                throw new InvalidDataException("bad header");
            var size = BinaryPrimitives.ReadInt64LittleEndian(data.AsSpan(4));
            var tocOffset = BinaryPrimitives.ReadInt64LittleEndian(data.AsSpan(12));
            var compression = (BlobCompression)BinaryPrimitives.ReadInt32LittleEndian(data.AsSpan(20));
            int digestLen = BinaryPrimitives.ReadUInt16LittleEndian(data.AsSpan(24));
            if (HeaderBytes + digestLen > data.Length || size <= 0 || tocOffset < 0 || tocOffset >= size || !Enum.IsDefined(compression))
                throw new InvalidDataException("bad header");
            var expected = Encoding.ASCII.GetString(data, HeaderBytes, digestLen);
            var json = data.AsSpan(HeaderBytes + digestLen);
            var actual = ChunkDecoder.Sha256Digest(json);
            if (!string.Equals(expected, actual, StringComparison.Ordinal))
                throw new InvalidDataException($"TOC JSON hashes to {actual}, stored as {expected}");
            var toc = Toc.Parse(json, TocLimits.Default);
            var reader = EstargzReader.FromToc(toc, tocOffset, compression, blob: null, tocDigest: actual);
            return (new ResolvedToc(reader, actual, Verified: false, RangeRequests: 0), size);
        }
        catch (Exception e) when (e is InvalidDataException or EstargzFormatException or System.Text.Json.JsonException)
        {
            problem = $"stored TOC of layer {layerDigest} is damaged ({e.Message}); dropped";
            Delete(layerDigest);
            return null;
        }
    }

    public void Delete(string layerDigest)
    {
        try { File.Delete(PathOf(layerDigest)); }
        catch (DirectoryNotFoundException) { }
    }
}
