namespace Stargz.Layer;

/// <summary>
/// The single-flight claim on one chunk being loaded or fetched (<see cref="ChunkCache.Inflight"/>), completed with its
/// verified bytes or an error. The background fetch with a disk cache decodes into a pooled buffer and writes it to
/// disk, so it has no array to hand out: a waiter that keeps the bytes (a reader) marks the claim joined before it
/// waits (<see cref="TryJoin"/>); once the chunk is on disk the fetcher closes a claim nobody joined
/// (<see cref="TryClose"/>) and completes it with <see cref="NoBytes"/>, and completes a joined one with a copy. A
/// waiter that finds the claim closed goes back through the cache, where the chunk is on disk now.
/// </summary>
internal sealed class ChunkClaim() : TaskCompletionSource<byte[]>(TaskCreationOptions.RunContinuationsAsynchronously)
{
    private const int Open = 0, Joined = 1, Closed = 2;
    private int _state;

    /// <summary>
    /// What a closed claim completes with: not the chunk's bytes, only "it is on disk now". Only waiters that never
    /// joined (they keep no bytes: the background fetch's own wait, a prefetch) can see it. Its own instance, so no
    /// zero-length chunk is ever mistaken for it.
    /// </summary>
    public static readonly byte[] NoBytes = new byte[0];

    /// <summary>
    /// A waiter that will keep the bytes joins: true when the claim will complete with the bytes (or an error), false
    /// when it is closed (nobody joined in time; the chunk is on disk, not in this claim).
    /// </summary>
    public bool TryJoin() => Interlocked.CompareExchange(ref _state, Joined, Open) != Closed;

    public bool IsJoined => Volatile.Read(ref _state) == Joined;

    /// <summary>The fetcher, with the chunk on disk: true when nobody joined, and nobody can from now on.</summary>
    public bool TryClose() => Interlocked.CompareExchange(ref _state, Closed, Open) == Open;
}
