namespace Stargz.Fuse;

// Async continuations live outside the unsafe part of the class (C# forbids await in unsafe contexts).
public sealed partial class FuseServer
{
    private async Task CompleteReadAsync(int fd, byte[] buf, ulong unique, int size, ValueTask<int> vt, CancellationTokenSource cts)
    {
        int r;
        try { r = await vt.ConfigureAwait(false); }
        catch (Exception ex) { r = -ErrnoOf(ex); }
        _inflight.TryRemove(unique, out _);
        FinishRead(fd, buf, unique, r, size);
        ReturnReply(buf);
        cts.Dispose();
    }

}
