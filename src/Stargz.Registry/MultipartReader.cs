using System.Buffers;
using System.Globalization;

namespace Stargz.Registry;

/// <summary>
/// Reads a <c>multipart/byteranges</c> body (RFC 9110 §14.6) part by part with one pooled buffer: each part's
/// Content-Range, then its bytes. With a null boundary the whole stream is one part (a plain 206). Every read that
/// receives bytes counts as progress for the attempt's stall watchdog.
/// </summary>
internal sealed class MultipartReader : IDisposable
{
    private readonly Stream _s;
    private readonly string? _boundary;
    private readonly Attempt _attempt;
    private byte[] _buf = ArrayPool<byte>.Shared.Rent(65536);
    private int _start, _end;

    public MultipartReader(Stream s, string? boundary, Attempt attempt) { _s = s; _boundary = boundary; _attempt = attempt; }

    private async ValueTask<bool> FillAsync(CancellationToken ct)
    {
        if (_start > 0 && _start == _end) { _start = _end = 0; }
        if (_end == _buf.Length)
        {
            if (_start == 0) throw new FormatException("multipart line longer than 64 KiB");
            Buffer.BlockCopy(_buf, _start, _buf, 0, _end - _start);
            _end -= _start; _start = 0;
        }
        var n = await _s.ReadAsync(_buf.AsMemory(_end), ct).ConfigureAwait(false);
        if (n > 0) _attempt.Progress();
        _end += n;
        return n > 0;
    }

    private async ValueTask<string?> ReadLineAsync(CancellationToken ct)
    {
        while (true)
        {
            var idx = Array.IndexOf(_buf, (byte)'\n', _start, _end - _start);
            if (idx >= 0)
            {
                var len = idx - _start;
                if (len > 0 && _buf[idx - 1] == '\r') len--;
                var line = System.Text.Encoding.ASCII.GetString(_buf, _start, len);
                _start = idx + 1;
                return line;
            }
            if (!await FillAsync(ct).ConfigureAwait(false)) return null;
        }
    }

    /// <summary>Advances to the next part and returns its Content-Range, or null at the closing boundary.</summary>
    public async ValueTask<(long From, long To)?> NextPartAsync(CancellationToken ct)
    {
        var open = "--" + _boundary;
        string? line;
        do
        {
            line = await ReadLineAsync(ct).ConfigureAwait(false);
            if (line is null) throw new IOException("multipart body ended before its closing boundary");
        } while (line.TrimEnd() != open && line.TrimEnd() != open + "--");
        if (line.TrimEnd() == open + "--") return null;
        long? from = null, to = null;
        while ((line = await ReadLineAsync(ct).ConfigureAwait(false)) is { Length: > 0 })
        {
            var colon = line.IndexOf(':');
            if (colon <= 0 || !line.AsSpan(0, colon).Trim().Equals("Content-Range", StringComparison.OrdinalIgnoreCase)) continue;
            // bytes FROM-TO/TOTAL
            var v = line[(colon + 1)..].Trim();
            if (v.StartsWith("bytes ", StringComparison.OrdinalIgnoreCase)) v = v[6..].Trim();
            var dash = v.IndexOf('-');
            var slash = v.IndexOf('/');
            if (dash > 0 && slash > dash
                && long.TryParse(v.AsSpan(0, dash), NumberStyles.None, CultureInfo.InvariantCulture, out var f)
                && long.TryParse(v.AsSpan(dash + 1, slash - dash - 1), NumberStyles.None, CultureInfo.InvariantCulture, out var t))
            {
                from = f; to = t;
            }
        }
        if (line is null) throw new IOException("multipart body ended inside part headers");
        if (from is null || to is null || to < from) throw new FormatException("multipart part without a valid Content-Range");
        return (from.Value, to.Value);
    }

    /// <summary>Up to <paramref name="max"/> body bytes from the buffer (refilling it when empty); empty at end of stream.</summary>
    public async ValueTask<ReadOnlyMemory<byte>> ReadBodyAsync(int max, CancellationToken ct)
    {
        if (_start == _end && !await FillAsync(ct).ConfigureAwait(false)) return ReadOnlyMemory<byte>.Empty;
        var n = Math.Min(max, _end - _start);
        var m = new ReadOnlyMemory<byte>(_buf, _start, n);
        _start += n;
        return m;
    }

    public void Dispose()
    {
        var b = _buf;
        _buf = [];
        if (b.Length > 0) ArrayPool<byte>.Shared.Return(b);
    }
}
