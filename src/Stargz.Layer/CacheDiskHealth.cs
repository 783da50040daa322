using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Layer;

/// <summary>
/// How the cache disk is doing. A failed write (ENOSPC, EIO, ...) or read of the chunk cache, the stored TOCs or the
/// whole-file copies never fails a read the registry can serve: the caller serves from memory or fetches again, and
/// reports it here. Failures are counted and logged at most once per <see cref="LogInterval"/> per kind (with how many
/// were left out). A full disk (ENOSPC, EDQUOT) holds background additions back: one batch may try again every
/// <see cref="FullRetryInterval"/>, and the first write that works again ends it (logged), so the daemon recovers by
/// itself when space returns.
/// </summary>
public sealed class CacheDiskHealth
{
    public static readonly TimeSpan LogInterval = TimeSpan.FromSeconds(30);
    public static readonly TimeSpan FullRetryInterval = TimeSpan.FromSeconds(10);

    private const int ENOSPC = 28, EDQUOT = 122;

    private long _writeErrors, _readErrors, _noSpace;
    private long _fullAt;          // TickCount64 of the last "no space" failure; 0 = not full
    private long _lastFullProbe;   // when a background batch last went ahead while full
    private readonly RateLimitedLog _writeLog = new(), _readLog = new();

    public ILogger Logger { get; set; } = NullLogger.Instance;

    /// <summary>Writes to the cache disk that failed (chunks, TOCs, whole-file copies), since the start.</summary>
    public long WriteErrors => Interlocked.Read(ref _writeErrors);

    /// <summary>Reads of cached files that failed for another reason than the file being absent (it is fetched again).</summary>
    public long ReadErrors => Interlocked.Read(ref _readErrors);

    /// <summary>Of <see cref="WriteErrors"/>, those for want of space (ENOSPC, EDQUOT).</summary>
    public long NoSpaceErrors => Interlocked.Read(ref _noSpace);

    /// <summary>The last write found the disk full and none has worked since.</summary>
    public bool IsFull => Volatile.Read(ref _fullAt) != 0;

    public static bool IsNoSpace(Exception e) => e is IOException io && (io.HResult == ENOSPC || io.HResult == EDQUOT);

    /// <summary>A write of <paramref name="what"/> failed; nothing partial of it is left visible.</summary>
    public void WriteFailed(string what, Exception e)
    {
        Interlocked.Increment(ref _writeErrors);
        var full = IsNoSpace(e);
        if (full)
        {
            Interlocked.Increment(ref _noSpace);
            Volatile.Write(ref _fullAt, Math.Max(1, Environment.TickCount64));
        }
        if (_writeLog.TryTake(out var skipped))
            Logger.LogWarning("cache disk: cannot write {What}: {Error}{Full} ({Skipped} more write failures since the last such message; reads are served from the registry and memory)",
                what, e.Message, full ? " — the disk is full: background fetch waits for space" : "", skipped);
    }

    /// <summary>A read of a cached file failed (not "absent"); it is fetched again.</summary>
    public void ReadFailed(string what, Exception e)
    {
        Interlocked.Increment(ref _readErrors);
        if (_readLog.TryTake(out var skipped))
            Logger.LogWarning("cache disk: cannot read {What}: {Error} ({Skipped} more read failures since the last such message; it is fetched again)",
                what, e.Message, skipped);
    }

    /// <summary>A write worked: a full disk has room again.</summary>
    public void WriteSucceeded()
    {
        if (Volatile.Read(ref _fullAt) == 0) return;
        if (Interlocked.Exchange(ref _fullAt, 0) != 0)
            Logger.LogInformation("cache disk: writes work again ({NoSpace} failed for want of space so far); background fetch resumes", NoSpaceErrors);
    }

    /// <summary>
    /// Whether a background batch may add to the cache now: always unless the disk is full; while full, one batch per
    /// <see cref="FullRetryInterval"/> goes ahead as a probe.
    /// </summary>
    public bool MayAddInBackground()
    {
        var full = Volatile.Read(ref _fullAt);
        if (full == 0) return true;
        var now = Environment.TickCount64;
        var last = Volatile.Read(ref _lastFullProbe);
        if (now - Math.Max(full, last) < (long)FullRetryInterval.TotalMilliseconds) return false;
        return Interlocked.CompareExchange(ref _lastFullProbe, now, last) == last;
    }

    /// <summary>At most one message per <see cref="LogInterval"/>; counts what it held back.</summary>
    private sealed class RateLimitedLog
    {
        private long _last = long.MinValue / 2;
        private long _skipped;

        public bool TryTake(out long skipped)
        {
            var now = Environment.TickCount64;
            var last = Volatile.Read(ref _last);
            if (now - last < (long)LogInterval.TotalMilliseconds || Interlocked.CompareExchange(ref _last, now, last) != last)
            {
                Interlocked.Increment(ref _skipped);
                skipped = 0;
                return false;
            }
            skipped = Interlocked.Exchange(ref _skipped, 0);
            return true;
        }
    }
}
