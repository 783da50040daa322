namespace Stargz.Estargz;

/// <summary>The blob is not a readable eStargz / zstd:chunked layer (truncated, wrong footer, bad compression, bad TOC bytes).</summary>
public class EstargzFormatException : Exception
{
    public EstargzFormatException(string message) : base(message) { }
    public EstargzFormatException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>The TOC parsed but describes something unsafe or inconsistent; <see cref="EntryName"/> names the entry when known.</summary>
public class TocValidationException : EstargzFormatException
{
    public string? EntryName { get; }

    public TocValidationException(string message, string? entryName = null)
        : base(entryName is null ? message : $"{message} (entry \"{Truncate(entryName)}\")")
    {
        EntryName = entryName;
    }

    private static string Truncate(string s) => s.Length <= 256 ? s : string.Concat(s.AsSpan(0, 256), "...");
}

/// <summary>Bytes did not match the digest the TOC (or the caller) promised.</summary>
public class DigestMismatchException : EstargzFormatException
{
    public string? EntryName { get; }
    public string ExpectedDigest { get; }

    public DigestMismatchException(string what, string expectedDigest, string? actualDigest, string? entryName = null)
        : base($"{what}: digest mismatch, expected {expectedDigest}{(actualDigest is null ? "" : ", got " + actualDigest)}{(entryName is null ? "" : $" (entry \"{entryName}\")")}")
    {
        EntryName = entryName;
        ExpectedDigest = expectedDigest;
    }
}
