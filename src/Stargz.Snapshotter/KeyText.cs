namespace Stargz.Snapshotter;

/// <summary>
/// Keys as errors and logs quote them: at most the first <see cref="MaxChars"/> characters. Keys are opaque and may be
/// megabytes long; a status message repeating one overflows the client's header limits (HTTP/2 PROTOCOL_ERROR instead
/// of a gRPC status) and a log line repeating one floods the log.
/// </summary>
public static class KeyText
{
    public const int MaxChars = 200;

    /// <summary>Longest status message sent to a client or logged for a failed call.</summary>
    public const int MaxMessageChars = 1024;

    /// <summary>The key itself, or its first <see cref="MaxChars"/> characters and its length.</summary>
    public static string Short(string? key)
    {
        if (key == null || key.Length <= MaxChars) return key ?? "";
        var n = MaxChars;
        if (char.IsHighSurrogate(key[n - 1])) n--; // never split a surrogate pair
        return string.Concat(key.AsSpan(0, n), $"…({key.Length} chars)");
    }

    /// <summary>
    /// A message with every long occurrence of <paramref name="keys"/> shortened, then cut to
    /// <see cref="MaxMessageChars"/> (labels and other long strings in it).
    /// </summary>
    public static string Bound(string message, params ReadOnlySpan<string?> keys)
    {
        // Longest first: a key may hold a shorter one (a parent named by a prefix of the key).
        var sorted = keys.ToArray();
        Array.Sort(sorted, static (a, b) => (b?.Length ?? 0).CompareTo(a?.Length ?? 0));
        foreach (var k in sorted)
            if (k != null && k.Length > MaxChars && message.Contains(k, StringComparison.Ordinal))
                message = message.Replace(k, Short(k), StringComparison.Ordinal);
        if (message.Length <= MaxMessageChars) return message;
        var n = MaxMessageChars;
        if (char.IsHighSurrogate(message[n - 1])) n--;
        return string.Concat(message.AsSpan(0, n), $"…({message.Length} chars)");
    }
}
