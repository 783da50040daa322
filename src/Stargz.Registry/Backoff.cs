namespace Stargz.Registry;

/// <summary>
/// Waits between tries that grow: the n-th (from 0) is <see cref="First"/>·2ⁿ, at most <see cref="Max"/>. With
/// <see cref="Jitter"/> each wait is drawn from the upper half of that, [d/2, d]: many readers retrying one host spread
/// out, and none comes back sooner than half. A wait the server suggested (Retry-After) is taken instead when it is
/// longer, up to <see cref="Max"/>. A value without state: a loop keeps its own count of tries (and sets it back to 0
/// after a success).
/// </summary>
public readonly record struct Backoff(TimeSpan First, TimeSpan Max, bool Jitter = false)
{
    /// <summary>The wait before try <paramref name="attempt"/> + 1, <paramref name="attempt"/> counting failures from 0.</summary>
    public TimeSpan Delay(int attempt, TimeSpan? suggested = null)
    {
        // In doubles: First·2^30 does not overflow, and the cap applies before anything is rounded.
        var ticks = Math.Min(Max.Ticks, First.Ticks * Math.Pow(2, Math.Clamp(attempt, 0, 30)));
        if (Jitter) ticks = ticks / 2 + Random.Shared.NextDouble() * ticks / 2;
        if (suggested is { } s && s.Ticks > ticks) ticks = Math.Min(s.Ticks, Max.Ticks);
        return TimeSpan.FromTicks((long)ticks);
    }
}
