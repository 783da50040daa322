namespace Stargz.Fuse;

// Async continuations live outside the unsafe part of the class (C# forbids await in unsafe contexts).
public sealed partial class FuseServer
{
    private async Task CompleteReadAsync(int fd, byte[] buf, ulong unique, int size, ValueTask<int> vt, CancellationTokenSource cts)
    {
        int r;
        try { r = await vt.ConfigureAwait(false); }
        catch (Exception ex) { r = -ErrnoOf(ex); }
        // Reply before leaving the in-flight table: fds are closed only once that table is empty.
        FinishRead(fd, buf, unique, r, size);
        _inflight.TryRemove(unique, out _);
        DataBuffers.Return(buf); // small per-thread buffers are not pooled: Return ignores them
        cts.Dispose();
    }

    private async Task DrainThenCloseAsync()
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (!_inflight.IsEmpty && DateTime.UtcNow < deadline) await Task.Delay(10).ConfigureAwait(false);
        if (_inflight.IsEmpty) CloseFds();
        else _opt.Log?.Invoke($"{_inflight.Count} FUSE reads did not finish after the connection ended; leaving fds open");
        _completion.TrySetResult();
    }
}
