using System.IO.Compression;
using Stargz.Layer;

namespace Stargz.Layer.Tests.Unit;

/// <summary>An in-memory layer blob that counts what is asked of it and can be slowed, cut off or tampered with.</summary>
internal sealed class MemoryBlob : IRangeFetcher
{
    private readonly object _lock = new();
    private TaskCompletionSource _open = NewOpen(true);
    public byte[] Bytes;
    public int Calls;
    public int Ranges;
    public readonly List<(long Offset, int Length)> Log = [];
    public TimeSpan Delay;
    /// <summary>A slow registry that keeps moving: each fetch receives a byte every <see cref="DribbleStep"/>, this many times.</summary>
    public int DribbleSteps;
    public TimeSpan DribbleStep;

    public MemoryBlob(byte[] bytes) => Bytes = bytes;

    public long Size => Bytes.Length;

    public long ReceivedBytes => Interlocked.Read(ref _received);
    private long _received;

    private static TaskCompletionSource NewOpen(bool open)
    {
        var t = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (open) t.SetResult();
        return t;
    }

    /// <summary>While down, every request hangs until its caller gives up (a registry that stopped answering).</summary>
    public void GoDown() { lock (_lock) if (_open.Task.IsCompleted) _open = NewOpen(false); }

    public void ComeBack() { lock (_lock) _open.TrySetResult(); }

    /// <summary>
    /// When set, a single-range fetch delivers its first <see cref="HoldAfterBytes"/> bytes (reporting them as arrived),
    /// then waits for <see cref="ReleaseHeld"/> before the rest: a big range whose tail is still on the wire.
    /// </summary>
    public int HoldAfterBytes;
    private readonly TaskCompletionSource _held = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _holding = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>Completes when a fetch has delivered its first <see cref="HoldAfterBytes"/> bytes and waits.</summary>
    public Task Holding => _holding.Task;

    public void ReleaseHeld() => _held.TrySetResult();

    public async Task FetchAsync(IReadOnlyList<FetchRange> ranges, CancellationToken cancellationToken, Action<int>? arrived = null)
    {
        Interlocked.Increment(ref Calls);
        Interlocked.Add(ref Ranges, ranges.Count);
        lock (_lock) foreach (var r in ranges) Log.Add((r.Offset, r.Destination.Length));
        Task open;
        lock (_lock) open = _open.Task;
        await open.WaitAsync(cancellationToken);
        if (Delay > TimeSpan.Zero) await Task.Delay(Delay, cancellationToken);
        for (var i = 0; i < DribbleSteps; i++)
        {
            await Task.Delay(DribbleStep, cancellationToken);
            Interlocked.Increment(ref _received);
        }
        if (ranges.Count == 1 && HoldAfterBytes > 0 && HoldAfterBytes < ranges[0].Destination.Length)
        {
            var r = ranges[0];
            if (r.Offset + r.Destination.Length > Bytes.Length) throw new IOException("range beyond blob");
            Bytes.AsMemory((int)r.Offset, HoldAfterBytes).CopyTo(r.Destination);
            Interlocked.Add(ref _received, HoldAfterBytes);
            arrived?.Invoke(HoldAfterBytes);
            _holding.TrySetResult();
            await _held.Task.WaitAsync(cancellationToken);
            Bytes.AsMemory((int)r.Offset + HoldAfterBytes, r.Destination.Length - HoldAfterBytes).CopyTo(r.Destination[HoldAfterBytes..]);
            Interlocked.Add(ref _received, r.Destination.Length - HoldAfterBytes);
            arrived?.Invoke(r.Destination.Length);
            return;
        }
        foreach (var r in ranges)
        {
            if (r.Offset + r.Destination.Length > Bytes.Length) throw new IOException("range beyond blob");
            Bytes.AsMemory((int)r.Offset, r.Destination.Length).CopyTo(r.Destination);
            Interlocked.Add(ref _received, r.Destination.Length);
        }
        if (ranges.Count == 1) arrived?.Invoke(ranges[0].Destination.Length);
    }
}

internal sealed class GzipTestDecoder : IChunkDecoder
{
    public void Decode(ReadOnlySpan<byte> compressed, long innerOffset, Span<byte> destination)
    {
        using var gz = new GZipStream(new MemoryStream(compressed.ToArray()), CompressionMode.Decompress);
        var skip = new byte[4096];
        while (innerOffset > 0)
        {
            var n = gz.Read(skip, 0, (int)Math.Min(skip.Length, innerOffset));
            if (n == 0) throw new InvalidDataException("member shorter than inner offset");
            innerOffset -= n;
        }
        gz.ReadExactly(destination);
    }
}

/// <summary>Builds a blob of gzip members, one per chunk, the way eStargz lays out regular files.</summary>
internal sealed class BlobBuilder
{
    private readonly MemoryStream _blob = new();
    public readonly Dictionary<string, (byte[] Content, LayerChunk[] Chunks)> Files = new();

    public BlobBuilder()
    {
        // Something before the first file, as a tar header would be.
        WriteMember(new byte[512]);
    }

    /// <summary>Stored (uncompressed) deflate blocks: member length depends on data length only.</summary>
    public bool Stored;

    public byte[] Gzip(ReadOnlySpan<byte> data)
    {
        var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, Stored ? CompressionLevel.NoCompression : CompressionLevel.Optimal, leaveOpen: true)) gz.Write(data);
        return ms.ToArray();
    }

    private long WriteMember(ReadOnlySpan<byte> data)
    {
        var off = _blob.Position;
        _blob.Write(Gzip(data));
        return off;
    }

    public BlobBuilder AddFile(string name, byte[] content, int chunkSize)
    {
        var chunks = new List<LayerChunk>();
        for (long o = 0; o < content.Length; o += chunkSize)
        {
            var len = (int)Math.Min(chunkSize, content.Length - o);
            var part = content.AsSpan((int)o, len);
            var off = WriteMember(part);
            chunks.Add(new LayerChunk(o, len, off, _blob.Position - off, 0, Digest.Sha256Of(part).ToString()));
        }
        Files[name] = (content, chunks.ToArray());
        return this;
    }

    /// <summary>Two chunks in one gzip member, addressed by inner offset (newer eStargz).</summary>
    public BlobBuilder AddFileOneMember(string name, byte[] content, int chunkSize)
    {
        var off = WriteMember(content);
        var blen = _blob.Position - off;
        var chunks = new List<LayerChunk>();
        for (long o = 0; o < content.Length; o += chunkSize)
        {
            var len = (int)Math.Min(chunkSize, content.Length - o);
            chunks.Add(new LayerChunk(o, len, off, blen, o, Digest.Sha256Of(content.AsSpan((int)o, len)).ToString()));
        }
        Files[name] = (content, chunks.ToArray());
        return this;
    }

    /// <summary>Every file's chunks by blob offset, as the layer hands them to its fetcher.</summary>
    public LayerChunk[] ByBlobOffset()
    {
        var all = new List<LayerChunk>();
        foreach (var f in Files.Values) all.AddRange(f.Chunks);
        all.Sort(static (a, b) => a.BlobOffset != b.BlobOffset ? a.BlobOffset.CompareTo(b.BlobOffset) : a.InnerOffset.CompareTo(b.InnerOffset));
        return [.. all];
    }

    public byte[] Build()
    {
        WriteMember(new byte[1024]); // end-of-archive, TOC and footer would follow
        return _blob.ToArray();
    }

    public static byte[] Random(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        // Half compressible so members differ in size.
        for (var i = 0; i < b.Length; i += 2) b[i] = (byte)(i / 1000);
        return b;
    }
}

/// <summary>A ChunkFetcher with its blob, cache and stats, disposed together.</summary>
internal sealed class FetcherRig : IDisposable
{
    public readonly MemoryBlob Blob;
    public readonly ChunkCache Cache;
    public readonly FetchGate Gate;
    public readonly LayerStats Stats = new();
    public readonly ChunkFetcher Fetcher;
    private readonly bool _ownCache;

    public FetcherRig(byte[] blob, LayerOptions? options = null, ChunkCache? cache = null, string layer = "sha256:layer",
        LayerChunk[]? byBlobOffset = null, IChunkDecoder? decoder = null)
    {
        options ??= new LayerOptions();
        Blob = new MemoryBlob(blob);
        _ownCache = cache == null;
        Cache = cache ?? new ChunkCache(options.CacheDirectory, options.MemoryCacheBytes, options.DurableDiskWrites, options.EffectiveMemoryEntries);
        Gate = new FetchGate(options.MaxConcurrency, options.BackgroundQuietPeriod);
        Fetcher = new ChunkFetcher(Blob, decoder ?? new GzipTestDecoder(), Cache, Gate, Stats, layer, options, byBlobOffset);
    }

    /// <summary>
    /// A daemon's first life: reads the whole file through a fresh rig over <paramref name="options"/>' cache directory
    /// (asserting the bytes) and waits until every chunk is on disk, so a second rig over the same directory is a restart.
    /// Returns where each chunk's file is.
    /// </summary>
    public static async Task<string[]> FillCacheAsync(byte[] blob, LayerOptions options, LayerChunk[] chunks, byte[] content, int bufferSize,
        CancellationToken ct)
    {
        using var first = new FetcherRig(blob, options);
        Assert.Equal(content, await first.ReadAllAsync(chunks, content.Length, bufferSize, ct));
        await first.Fetcher.DrainAsync();
        var paths = new string[chunks.Length];
        for (var i = 0; i < chunks.Length; i++) paths[i] = first.Cache.PathOf(chunks[i].Digest!);
        return paths;
    }

    public async Task<byte[]> ReadAllAsync(LayerChunk[] chunks, long size, int bufferSize, CancellationToken ct)
    {
        var result = new byte[size];
        long off = 0;
        while (off < size)
        {
            var n = await Fetcher.ReadAsync(chunks, size, off, result.AsMemory((int)off, (int)Math.Min(bufferSize, size - off)), ct);
            Assert.True(n > 0);
            off += n;
        }
        return result;
    }

    public void Dispose()
    {
        Fetcher.Dispose();
        Fetcher.DrainAsync().GetAwaiter().GetResult();
        Gate.Dispose();
        if (_ownCache) Cache.Dispose();
    }
}
