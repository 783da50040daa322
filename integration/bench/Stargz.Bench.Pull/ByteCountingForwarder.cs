using System.Net;
using System.Net.Sockets;

namespace Stargz.Bench.Pull;

/// <summary>A loopback TCP forwarder to one port that counts the bytes sent back to its clients (TCP, not HTTP like
/// TestSupport's CountingProxy, so that it adds no HTTP parsing to the pulls it measures).</summary>
public sealed class ByteCountingForwarder : IAsyncDisposable
{
    private readonly TcpListener _listener;
    private readonly int _target;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accepting;
    private long _toClients;

    private ByteCountingForwarder(int target)
    {
        _target = target;
        _listener = new TcpListener(IPAddress.Loopback, 0);
        _listener.Start();
        _accepting = AcceptAsync();
    }

    public static ByteCountingForwarder Start(int targetPort) => new(targetPort);

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;
    public long BytesToClients => Interlocked.Read(ref _toClients);
    public void Reset() => Interlocked.Exchange(ref _toClients, 0);

    private async Task AcceptAsync()
    {
        try
        {
            while (true)
            {
                var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                _ = ForwardAsync(client);
            }
        }
        catch (OperationCanceledException) { }
    }

    private async Task ForwardAsync(TcpClient client)
    {
        using var c = client;
        using var upstream = new TcpClient();
        try
        {
            await upstream.ConnectAsync(IPAddress.Loopback, _target, _stop.Token);
            var cs = c.GetStream();
            var us = upstream.GetStream();
            await Task.WhenAll(PumpAsync(cs, us, count: false, c.Client, upstream.Client), PumpAsync(us, cs, count: true, upstream.Client, c.Client));
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException) { }
    }

    private async Task PumpAsync(Stream from, Stream to, bool count, Socket fromSocket, Socket toSocket)
    {
        var buf = new byte[64 * 1024];
        try
        {
            int n;
            while ((n = await from.ReadAsync(buf, _stop.Token)) > 0)
            {
                await to.WriteAsync(buf.AsMemory(0, n), _stop.Token);
                if (count) Interlocked.Add(ref _toClients, n);
            }
            toSocket.Shutdown(SocketShutdown.Send);
        }
        catch (Exception e) when (e is IOException or SocketException or OperationCanceledException or ObjectDisposedException)
        {
            // One side went away: close both so the other pump ends too.
            fromSocket.Close();
            toSocket.Close();
        }
    }

    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        _listener.Stop();
        await _accepting;
        _stop.Dispose();
    }
}
