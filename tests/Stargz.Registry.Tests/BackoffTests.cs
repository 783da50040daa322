namespace Stargz.Registry.Tests;

/// <summary>
/// The one backoff every retry loop uses: registry requests (jitter, Retry-After, min_wait_msec..max_wait_msec), the
/// kubeconfig keychain's resync (1 s doubling to its maximum) and a layer's background fetch after an outage (1 s to 60 s).
/// </summary>
public class BackoffTests
{
    private static TimeSpan Ms(double ms) => TimeSpan.FromMilliseconds(ms);

    [Fact]
    public void Plain_waits_double_from_the_first_and_stop_at_the_maximum()
    {
        var b = new Backoff(TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60));
        var got = new List<double>();
        for (var i = 0; i < 9; i++) got.Add(b.Delay(i).TotalSeconds);
        Assert.Equal([1, 2, 4, 8, 16, 32, 60, 60, 60], got);
        // However many failures: no overflow, still the maximum.
        Assert.Equal(TimeSpan.FromSeconds(60), b.Delay(int.MaxValue));
        Assert.Equal(TimeSpan.FromSeconds(1), b.Delay(-1));
    }

    [Fact]
    public void A_first_wait_above_the_maximum_is_the_maximum()
    {
        // The kubeconfig keychain with max_backoff 200 ms: every wait is 200 ms.
        var b = new Backoff(TimeSpan.FromSeconds(1), Ms(200));
        Assert.Equal(Ms(200), b.Delay(0));
        Assert.Equal(Ms(200), b.Delay(5));
    }

    [Fact]
    public void Jittered_waits_lie_in_the_upper_half_of_the_plain_ones_and_vary()
    {
        var plain = new Backoff(Ms(10), Ms(200));
        var jittered = plain with { Jitter = true };
        for (var attempt = 0; attempt < 8; attempt++)
        {
            var d = plain.Delay(attempt);
            var seen = new HashSet<TimeSpan>();
            for (var k = 0; k < 200; k++)
            {
                var w = jittered.Delay(attempt);
                Assert.InRange(w, d / 2, d);
                seen.Add(w);
            }
            Assert.True(seen.Count > 1, $"200 jittered waits for attempt {attempt} were all {d / 2}..{d} and equal");
        }
    }

    [Fact]
    public void A_longer_suggested_wait_is_taken_up_to_the_maximum()
    {
        var b = new Backoff(Ms(10), TimeSpan.FromSeconds(5), Jitter: true);
        Assert.Equal(TimeSpan.FromSeconds(2), b.Delay(0, TimeSpan.FromSeconds(2)));      // Retry-After: 2
        Assert.Equal(TimeSpan.FromSeconds(5), b.Delay(0, TimeSpan.FromSeconds(120)));    // capped
        Assert.InRange(b.Delay(3, Ms(1)), Ms(40), Ms(80));                               // shorter: ignored
        Assert.InRange(b.Delay(3, TimeSpan.FromSeconds(-3)), Ms(40), Ms(80));            // a date already past
    }

    [Fact]
    public void Without_a_first_wait_only_the_server_can_ask_for_one()
    {
        var b = new Backoff(TimeSpan.Zero, Ms(300), Jitter: true);
        Assert.Equal(TimeSpan.Zero, b.Delay(7));
        Assert.Equal(Ms(300), b.Delay(7, TimeSpan.FromSeconds(1)));
    }
}
