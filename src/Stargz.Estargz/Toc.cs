using System.Buffers;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;

namespace Stargz.Estargz;

/// <summary>Bounds applied while reading untrusted TOCs, so hostile input cannot exhaust memory.</summary>
public sealed record TocLimits
{
    /// <summary>Largest TOC JSON accepted (uncompressed bytes).</summary>
    public long MaxTocJsonBytes { get; init; } = 256L << 20;
    /// <summary>Largest compressed TOC accepted (bytes fetched from the blob).</summary>
    public long MaxTocCompressedBytes { get; init; } = 128L << 20;
    /// <summary>Most entries (including chunk entries) accepted.</summary>
    public int MaxEntries { get; init; } = 2_000_000;
    /// <summary>Longest entry name / link name in bytes.</summary>
    public int MaxNameLength { get; init; } = 4096;
    /// <summary>Most xattrs on one entry.</summary>
    public int MaxXattrsPerEntry { get; init; } = 1024;
    /// <summary>Largest regular file size accepted.</summary>
    public long MaxFileSize { get; init; } = 1L << 46;
    /// <summary>Largest single chunk (uncompressed) accepted; bounds per-read buffers.</summary>
    public long MaxChunkSize { get; init; } = 256L << 20;

    public static TocLimits Default { get; } = new();
}

/// <summary>The table of contents: <c>{"version":1,"entries":[...]}</c>.</summary>
public sealed class Toc
{
    public int Version { get; set; } = 1;
    public IReadOnlyList<TocEntry> Entries { get; set; } = Array.Empty<TocEntry>();

    /// <summary>Parses TOC JSON (UTF-8). Throws <see cref="EstargzFormatException"/> on malformed JSON and
    /// <see cref="TocValidationException"/> when a limit is exceeded or a field is out of range.</summary>
    public static Toc Parse(ReadOnlySpan<byte> json, TocLimits? limits = null)
    {
        limits ??= TocLimits.Default;
        if (json.Length > limits.MaxTocJsonBytes)
            throw new TocValidationException($"TOC JSON is {json.Length} bytes, more than the limit {limits.MaxTocJsonBytes}");
        var reader = new Utf8JsonReader(json, new JsonReaderOptions { MaxDepth = 16, CommentHandling = JsonCommentHandling.Disallow });
        try
        {
            return ParseRoot(ref reader, limits);
        }
        catch (JsonException e)
        {
            throw new EstargzFormatException($"malformed TOC JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            throw new EstargzFormatException($"malformed TOC JSON: {e.Message}", e);
        }
    }

    private static Toc ParseRoot(ref Utf8JsonReader r, TocLimits limits)
    {
        if (!r.Read() || r.TokenType != JsonTokenType.StartObject)
            throw new EstargzFormatException("malformed TOC JSON: expected an object");
        var toc = new Toc { Version = 0 };
        var entries = new List<TocEntry>();
        while (true)
        {
            Next(ref r);
            if (r.TokenType == JsonTokenType.EndObject) break;
            if (r.TokenType != JsonTokenType.PropertyName) throw new EstargzFormatException("malformed TOC JSON: expected a property");
            if (r.ValueTextEquals("version"u8))
            {
                Next(ref r);
                if (r.TokenType == JsonTokenType.Null) continue;
                if (r.TokenType != JsonTokenType.Number || !r.TryGetInt32(out var v))
                    throw new TocValidationException("TOC version is not an integer");
                toc.Version = v;
            }
            else if (r.ValueTextEquals("entries"u8))
            {
                Next(ref r);
                if (r.TokenType == JsonTokenType.Null) continue;
                if (r.TokenType != JsonTokenType.StartArray) throw new EstargzFormatException("malformed TOC JSON: entries is not an array");
                while (true)
                {
                    Next(ref r);
                    if (r.TokenType == JsonTokenType.EndArray) break;
                    if (entries.Count >= limits.MaxEntries)
                        throw new TocValidationException($"TOC has more than {limits.MaxEntries} entries");
                    entries.Add(ParseEntry(ref r, limits));
                }
            }
            else
            {
                Next(ref r);
                r.Skip();
            }
        }
        toc.Entries = entries;
        return toc;
    }

    private static void Next(ref Utf8JsonReader r)
    {
        if (!r.Read()) throw new EstargzFormatException("malformed TOC JSON: unexpected end");
    }

    private static TocEntry ParseEntry(ref Utf8JsonReader r, TocLimits limits)
    {
        if (r.TokenType != JsonTokenType.StartObject) throw new EstargzFormatException("malformed TOC JSON: entry is not an object");
        var e = new TocEntry();
        bool hasType = false;
        while (true)
        {
            Next(ref r);
            if (r.TokenType == JsonTokenType.EndObject) break;
            if (r.ValueTextEquals("name"u8)) { Next(ref r); e.Name = ReadString(ref r, limits, e, "name") ?? ""; }
            else if (r.ValueTextEquals("type"u8))
            {
                Next(ref r);
                if (r.TokenType != JsonTokenType.String || r.ValueIsEscaped || !TocEntry.TryParseType(r.ValueSpan, out var t))
                    throw new TocValidationException($"unknown entry type {(r.TokenType == JsonTokenType.String ? r.GetString() : r.TokenType.ToString())}", e.Name);
                e.Type = t;
                hasType = true;
            }
            else if (r.ValueTextEquals("size"u8)) { Next(ref r); e.Size = ReadLong(ref r, e, "size"); }
            else if (r.ValueTextEquals("modtime"u8)) { Next(ref r); ReadModTime(ref r, limits, e); }
            else if (r.ValueTextEquals("linkName"u8)) { Next(ref r); e.LinkName = ReadString(ref r, limits, e, "linkName"); }
            else if (r.ValueTextEquals("mode"u8)) { Next(ref r); e.Mode = ReadLong(ref r, e, "mode"); }
            else if (r.ValueTextEquals("uid"u8)) { Next(ref r); e.Uid = ReadInt(ref r, e, "uid"); }
            else if (r.ValueTextEquals("gid"u8)) { Next(ref r); e.Gid = ReadInt(ref r, e, "gid"); }
            else if (r.ValueTextEquals("userName"u8)) { Next(ref r); e.UserName = ReadOwnerName(ref r, limits, e, "userName"); }
            else if (r.ValueTextEquals("groupName"u8)) { Next(ref r); e.GroupName = ReadOwnerName(ref r, limits, e, "groupName"); }
            else if (r.ValueTextEquals("offset"u8)) { Next(ref r); e.Offset = ReadLong(ref r, e, "offset"); }
            else if (r.ValueTextEquals("innerOffset"u8)) { Next(ref r); e.InnerOffset = ReadLong(ref r, e, "innerOffset"); }
            else if (r.ValueTextEquals("devMajor"u8)) { Next(ref r); e.DevMajor = ReadInt(ref r, e, "devMajor"); }
            else if (r.ValueTextEquals("devMinor"u8)) { Next(ref r); e.DevMinor = ReadInt(ref r, e, "devMinor"); }
            else if (r.ValueTextEquals("digest"u8)) { Next(ref r); e.Digest = ReadString(ref r, limits, e, "digest"); }
            else if (r.ValueTextEquals("chunkOffset"u8)) { Next(ref r); e.ChunkOffset = ReadLong(ref r, e, "chunkOffset"); }
            else if (r.ValueTextEquals("chunkSize"u8)) { Next(ref r); e.ChunkSize = ReadLong(ref r, e, "chunkSize"); }
            else if (r.ValueTextEquals("chunkDigest"u8))
            {
                Next(ref r);
                // A file of one chunk has the same digest twice (the writers put "digest" first): one string for both.
                e.ChunkDigest = e.Digest != null && r.TokenType == JsonTokenType.String && r.ValueTextEquals(e.Digest)
                    ? e.Digest
                    : ReadString(ref r, limits, e, "chunkDigest");
            }
            else if (r.ValueTextEquals("xattrs"u8))
            {
                Next(ref r);
                if (r.TokenType == JsonTokenType.Null) continue;
                if (r.TokenType != JsonTokenType.StartObject) throw new TocValidationException("xattrs is not an object", e.Name);
                var x = new Dictionary<string, byte[]>(StringComparer.Ordinal);
                while (true)
                {
                    Next(ref r);
                    if (r.TokenType == JsonTokenType.EndObject) break;
                    if (x.Count >= limits.MaxXattrsPerEntry) throw new TocValidationException($"more than {limits.MaxXattrsPerEntry} xattrs", e.Name);
                    var key = r.GetString()!;
                    Next(ref r);
                    if (r.TokenType == JsonTokenType.Null) { x[key] = Array.Empty<byte>(); continue; }
                    if (r.TokenType != JsonTokenType.String || !r.TryGetBytesFromBase64(out var val))
                        throw new TocValidationException($"xattr {key} is not base64", e.Name);
                    x[key] = val;
                }
                e.Xattrs = x;
            }
            else
            {
                Next(ref r);
                r.Skip();
            }
        }
        if (!hasType) throw new TocValidationException("entry has no type", e.Name);
        return e;
    }

    private static string? ReadString(ref Utf8JsonReader r, TocLimits limits, TocEntry e, string field)
    {
        if (r.TokenType == JsonTokenType.Null) return null;
        if (r.TokenType != JsonTokenType.String) throw new TocValidationException($"{field} is not a string", e.Name);
        int len = r.HasValueSequence ? (int)Math.Min(int.MaxValue, r.ValueSequence.Length) : r.ValueSpan.Length;
        if (len > limits.MaxNameLength * 6L)
            throw new TocValidationException($"{field} is longer than {limits.MaxNameLength} bytes", e.Name.Length > 0 ? e.Name : null);
        var s = r.GetString()!;
        if (System.Text.Encoding.UTF8.GetByteCount(s) > limits.MaxNameLength)
            throw new TocValidationException($"{field} is longer than {limits.MaxNameLength} bytes", e.Name.Length > 0 ? e.Name : null);
        return s;
    }

    /// <summary>
    /// The entry's modification time, parsed from the JSON text without a string in between (every entry has one, and
    /// the string was garbage as soon as parsed). An unparsable time is ignored, as before.
    /// </summary>
    private static void ReadModTime(ref Utf8JsonReader r, TocLimits limits, TocEntry e)
    {
        if (r.TokenType == JsonTokenType.String && !r.HasValueSequence && !r.ValueIsEscaped && r.ValueSpan.Length <= 64)
        {
            Span<char> text = stackalloc char[64];
            var n = System.Text.Encoding.UTF8.GetChars(r.ValueSpan, text);
            if (n > 0 && DateTimeOffset.TryParse(text[..n], CultureInfo.InvariantCulture, DateTimeStyles.AdjustToUniversal, out var t))
                e.ModTime = t;
            return;
        }
        var s = ReadString(ref r, limits, e, "modtime");
        if (!string.IsNullOrEmpty(s) && DateTimeOffset.TryParse(s, CultureInfo.InvariantCulture, DateTimeStyles.AdjustToUniversal, out var mt))
            e.ModTime = mt;
    }

    /// <summary>An owner's name; the usual ones ("root", empty) shared instead of a string per entry kept with the tree.</summary>
    private static string? ReadOwnerName(ref Utf8JsonReader r, TocLimits limits, TocEntry e, string field)
    {
        if (r.TokenType == JsonTokenType.String)
        {
            if (r.ValueTextEquals("root"u8)) return "root";
            if (r.ValueTextEquals(""u8)) return "";
        }
        return ReadString(ref r, limits, e, field);
    }

    private static long ReadLong(ref Utf8JsonReader r, TocEntry e, string field)
    {
        if (r.TokenType == JsonTokenType.Null) return 0;
        if (r.TokenType != JsonTokenType.Number || !r.TryGetInt64(out var v))
            throw new TocValidationException($"{field} is not a 64-bit integer", e.Name);
        return v;
    }

    private static int ReadInt(ref Utf8JsonReader r, TocEntry e, string field)
    {
        if (r.TokenType == JsonTokenType.Null) return 0;
        if (r.TokenType != JsonTokenType.Number || !r.TryGetInt32(out var v))
            throw new TocValidationException($"{field} is not a 32-bit integer", e.Name);
        return v;
    }

    /// <summary>Serializes like the reference (tab-indented, omitempty); the TOC digest is sha256 of these bytes.</summary>
    public byte[] Serialize()
    {
        var buf = new ArrayBufferWriter<byte>(4096 + Entries.Count * 256);
        using (var w = new Utf8JsonWriter(buf, new JsonWriterOptions
        {
            Indented = true,
            IndentCharacter = '\t',
            IndentSize = 1,
            NewLine = "\n",
            Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
            SkipValidation = true,
        }))
        {
            w.WriteStartObject();
            w.WriteNumber("version"u8, Version);
            w.WriteStartArray("entries"u8);
            foreach (var e in Entries) WriteEntry(w, e);
            w.WriteEndArray();
            w.WriteEndObject();
        }
        return buf.WrittenSpan.ToArray();
    }

    private static void WriteEntry(Utf8JsonWriter w, TocEntry e)
    {
        w.WriteStartObject();
        w.WriteString("name"u8, e.Name);
        w.WriteString("type"u8, TocEntry.TypeToString(e.Type));
        if (e.Size != 0) w.WriteNumber("size"u8, e.Size);
        if (e.ModTime is { } mt && mt.ToUnixTimeSeconds() != 0)
            w.WriteString("modtime"u8, mt.UtcDateTime.ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", CultureInfo.InvariantCulture));
        if (!string.IsNullOrEmpty(e.LinkName)) w.WriteString("linkName"u8, e.LinkName);
        if (e.Mode != 0) w.WriteNumber("mode"u8, e.Mode);
        if (e.Uid != 0) w.WriteNumber("uid"u8, e.Uid);
        if (e.Gid != 0) w.WriteNumber("gid"u8, e.Gid);
        if (!string.IsNullOrEmpty(e.UserName)) w.WriteString("userName"u8, e.UserName);
        if (!string.IsNullOrEmpty(e.GroupName)) w.WriteString("groupName"u8, e.GroupName);
        if (e.Offset != 0) w.WriteNumber("offset"u8, e.Offset);
        if (e.InnerOffset != 0) w.WriteNumber("innerOffset"u8, e.InnerOffset);
        if (e.DevMajor != 0) w.WriteNumber("devMajor"u8, e.DevMajor);
        if (e.DevMinor != 0) w.WriteNumber("devMinor"u8, e.DevMinor);
        if (e.Xattrs is { Count: > 0 } x)
        {
            w.WriteStartObject("xattrs"u8);
            var keys = new string[x.Count];
            int i = 0;
            foreach (var k in x.Keys) keys[i++] = k;
            Array.Sort(keys, StringComparer.Ordinal);
            foreach (var k in keys) w.WriteBase64String(k, x[k]);
            w.WriteEndObject();
        }
        if (!string.IsNullOrEmpty(e.Digest)) w.WriteString("digest"u8, e.Digest);
        if (e.ChunkOffset != 0) w.WriteNumber("chunkOffset"u8, e.ChunkOffset);
        if (e.ChunkSize != 0) w.WriteNumber("chunkSize"u8, e.ChunkSize);
        if (!string.IsNullOrEmpty(e.ChunkDigest)) w.WriteString("chunkDigest"u8, e.ChunkDigest);
        w.WriteEndObject();
    }
}
