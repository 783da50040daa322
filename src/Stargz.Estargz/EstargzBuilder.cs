using System.Buffers;
using System.IO.Compression;
using System.Security.Cryptography;
using System.Threading.Channels;
using ZstdSharp;

namespace Stargz.Estargz;

public sealed record BuildOptions
{
    /// <summary>Largest uncompressed chunk of a regular file (default 4 MiB, as the reference).</summary>
    public int ChunkSize { get; init; } = 4 << 20;
    /// <summary>gzip 0-9 (default 9 as the reference's builder) or zstd 1-22 (default 3).</summary>
    public int? CompressionLevel { get; init; }
    /// <summary>Paths placed first (with their parents and hardlink targets), followed by <c>.prefetch.landmark</c>.
    /// Empty: <c>.no.prefetch.landmark</c> is written first instead.</summary>
    public IReadOnlyList<string> Prioritized { get; init; } = Array.Empty<string>();
    /// <summary>Skip prioritized paths missing from the input instead of failing.</summary>
    public bool AllowPrioritizedNotFound { get; init; }
    public BlobCompression Compression { get; init; } = BlobCompression.Gzip;
    /// <summary>Members compressed at once (default: processor count).</summary>
    public int Parallelism { get; init; } = Environment.ProcessorCount;
    /// <summary>Where to spool a compressed or unseekable input tar (default: the system temp dir).</summary>
    public string? TempDirectory { get; init; }
}

public sealed record BuildResult(string TocDigest, string DiffId, long Size, long UncompressedSize)
{
    public Toc Toc { get; init; } = new();
    public long TocOffset { get; init; }
    /// <summary>zstd:chunked only: value of io.containers.zstd-chunked.manifest-checksum.</summary>
    public string? ZstdManifestChecksum { get; init; }
    /// <summary>zstd:chunked only: value of io.containers.zstd-chunked.manifest-position.</summary>
    public string? ZstdManifestPosition { get; init; }
    /// <summary>Prioritized paths that were not in the input (with AllowPrioritizedNotFound).</summary>
    public IReadOnlyList<string> MissedPrioritized { get; init; } = Array.Empty<string>();
}

/// <summary>
/// tar / tar.gz / tar.zst in, eStargz (or zstd:chunked) out. Every regular file's payload starts a new gzip member
/// (zstd frame), files larger than the chunk size are split into one member per chunk, members are compressed in
/// parallel and written in order, then the TOC and the footer. The uncompressed stream is the (reordered) tar, so the
/// output stays a valid tar.gz. The same input and options give the same bytes.
/// </summary>
public static class EstargzBuilder
{
    private sealed class SrcEntry
    {
        public required TarMeta Meta;
        public required string Clean;
        public long DataOffset;
        public bool Removed;
        public byte[]? InlineData;
    }

    private sealed class Job
    {
        public required byte[] Data;
        public int Length;
        public List<TocEntry>? Chunks; // entries whose Offset is this member's start
        public Task<(byte[] Buf, int Len)>? Compressed;
    }

    public static async Task<BuildResult> BuildAsync(Stream tarOrTarGz, Stream output, BuildOptions o, CancellationToken ct)
    {
        if (o.ChunkSize <= 0) throw new ArgumentOutOfRangeException(nameof(o), "chunk size must be positive");
        int level = o.CompressionLevel ?? (o.Compression == BlobCompression.Gzip ? 9 : 3);
        if (o.Compression == BlobCompression.Gzip && (level < 0 || level > 9)) throw new ArgumentOutOfRangeException(nameof(o), "gzip level must be 0-9");
        if (o.Compression == BlobCompression.Zstd && (level < 1 || level > 22)) throw new ArgumentOutOfRangeException(nameof(o), "zstd level must be 1-22");

        Stream source = tarOrTarGz;
        try
        {
            // 1. A seekable raw tar to read payloads from by offset.
            var head = new byte[4];
            int got = await ReadUpTo(tarOrTarGz, head, ct).ConfigureAwait(false);
            bool gz = got >= 3 && head[0] == 0x1f && head[1] == 0x8b && head[2] == 8;
            bool zst = got >= 4 && head[0] == 0x28 && head[1] == 0xb5 && head[2] == 0x2f && head[3] == 0xfd;
            if (tarOrTarGz.CanSeek && !gz && !zst)
            {
                tarOrTarGz.Seek(-got, SeekOrigin.Current);
            }
            else
            {
                var spoolPath = Path.Combine(o.TempDirectory ?? Path.GetTempPath(), $"stargz-build-{Guid.NewGuid():N}.tar");
                var spool = new FileStream(spoolPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, 1 << 16, FileOptions.DeleteOnClose);
                var all = new PrefixedStream(head.AsMemory(0, got), tarOrTarGz);
                Stream dec = gz ? new GZipStream(all, CompressionMode.Decompress) : zst ? new DecompressionStream(all) : all;
                try { await dec.CopyToAsync(spool, 1 << 20, ct).ConfigureAwait(false); }
                catch (InvalidDataException e) { throw new EstargzFormatException($"input is not a valid compressed tar: {e.Message}", e); }
                finally { await dec.DisposeAsync().ConfigureAwait(false); }
                spool.Position = 0;
                source = spool;
            }

            // 2. Entries (last of a name wins; old TOC and landmarks dropped).
            var entries = ReadEntries(source, ct);

            // 3. Order: prioritized (with parents and hardlink targets), landmark, the rest.
            var missed = new List<string>();
            var ordered = Order(entries, o, missed);

            // 4. Members, compressed in parallel, written in order.
            var (toc, diffId, uncompressed, written, tocOffset, tocDigest, zChecksum, zPos) =
                await WriteAsync(ordered, source, output, o, level, ct).ConfigureAwait(false);
            return new BuildResult(tocDigest, diffId, written, uncompressed)
            {
                Toc = toc, TocOffset = tocOffset, ZstdManifestChecksum = zChecksum, ZstdManifestPosition = zPos, MissedPrioritized = missed,
            };
        }
        finally
        {
            if (!ReferenceEquals(source, tarOrTarGz)) await source.DisposeAsync().ConfigureAwait(false);
        }
    }

    private static async Task<int> ReadUpTo(Stream s, byte[] buf, CancellationToken ct)
    {
        int n = 0;
        while (n < buf.Length)
        {
            int r = await s.ReadAsync(buf.AsMemory(n), ct).ConfigureAwait(false);
            if (r == 0) break;
            n += r;
        }
        return n;
    }

    private static List<SrcEntry> ReadEntries(Stream source, CancellationToken ct)
    {
        var list = new List<SrcEntry>();
        var byName = new Dictionary<string, SrcEntry>(StringComparer.Ordinal);
        var tr = new TarStreamReader(source);
        while (tr.Next() is var (m, dataOffset))
        {
            ct.ThrowIfCancellationRequested();
            var clean = TocTree.CleanName(m.Name);
            if (clean == LayerLabels.TocTarName || clean == LayerLabels.PrefetchLandmark || clean == LayerLabels.NoPrefetchLandmark) continue;
            var se = new SrcEntry { Meta = m, Clean = clean, DataOffset = m.TypeFlag == (byte)'0' && m.Size > 0 ? dataOffset : 0 };
            if (byName.TryGetValue(clean, out var old)) old.Removed = true;
            byName[clean] = se;
            list.Add(se);
        }
        list.RemoveAll(x => x.Removed);
        return list;
    }

    private static List<SrcEntry> Order(List<SrcEntry> entries, BuildOptions o, List<string> missed)
    {
        var byName = new Dictionary<string, SrcEntry>(StringComparer.Ordinal);
        foreach (var e in entries) byName[e.Clean] = e;
        var moved = new HashSet<SrcEntry>();
        var first = new List<SrcEntry>();

        void Move(string clean, int depth)
        {
            if (depth > 4096) throw new EstargzFormatException("prioritized path nesting too deep (hardlink loop?)");
            if (clean.Length > 0)
            {
                int slash = clean.LastIndexOf('/');
                Move(slash < 0 ? "" : clean[..slash], depth + 1);
            }
            if (!byName.TryGetValue(clean, out var e) || moved.Contains(e)) return;
            if (e.Meta.TypeFlag == (byte)'1' && e.Meta.LinkName is { } ln) Move(TocTree.CleanName(ln), depth + 1);
            if (moved.Add(e)) first.Add(e);
        }

        foreach (var p in o.Prioritized)
        {
            var clean = TocTree.CleanName(p);
            if (!byName.ContainsKey(clean))
            {
                if (o.AllowPrioritizedNotFound) { missed.Add(p); continue; }
                throw new EstargzFormatException($"prioritized file \"{p}\" is not in the input tar");
            }
            Move(clean, 0);
        }
        var landmark = new SrcEntry
        {
            // Nothing prioritized (or none of it found): the layer says "do not prefetch".
            Meta = new TarMeta { Name = first.Count > 0 ? LayerLabels.PrefetchLandmark : LayerLabels.NoPrefetchLandmark, TypeFlag = (byte)'0', Size = 1, Mode = 0x1a4 },
            Clean = "",
            InlineData = [LayerLabels.LandmarkContents],
        };
        var result = new List<SrcEntry>(entries.Count + 1);
        result.AddRange(first);
        result.Add(landmark);
        foreach (var e in entries) if (!moved.Contains(e)) result.Add(e);
        return result;
    }

    private static async Task<(Toc, string, long, long, long, string, string?, string?)> WriteAsync(
        List<SrcEntry> ordered, Stream source, Stream output, BuildOptions o, int level, CancellationToken ct)
    {
        int parallel = Math.Max(1, o.Parallelism);
        var channel = Channel.CreateBounded<Job>(new BoundedChannelOptions(parallel * 2) { SingleReader = true, SingleWriter = true });
        var compression = o.Compression;
        long written = 0;

        // Consumer: in order, assign member offsets, write.
        var consumer = Task.Run(async () =>
        {
            try
            {
                await foreach (var job in channel.Reader.ReadAllAsync(ct).ConfigureAwait(false))
                {
                    var (buf, len) = await job.Compressed!.ConfigureAwait(false);
                    try
                    {
                        if (job.Chunks is not null) foreach (var te in job.Chunks) te.Offset = written;
                        await output.WriteAsync(buf.AsMemory(0, len), ct).ConfigureAwait(false);
                        written += len;
                    }
                    finally { ArrayPool<byte>.Shared.Return(buf); }
                }
            }
            catch (Exception e)
            {
                // Unblock the producer: its next write to the channel fails instead of waiting forever.
                channel.Writer.TryComplete(e);
                throw;
            }
        }, ct);

        var tocEntries = new List<TocEntry>(ordered.Count + 16);
        using var diff = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        using var fileHash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        long uncompressed = 0;
        var pending = new PooledBuffer(64 << 10);
        List<TocEntry>? pendingChunks = null;
        int flushAt = Math.Max(o.ChunkSize, 1 << 20);

        async Task Flush()
        {
            if (pending.Length == 0) return;
            diff.AppendData(pending.Span);
            uncompressed += pending.Length;
            var job = new Job { Data = pending.Buffer, Length = pending.Length, Chunks = pendingChunks };
            pending.Buffer = Array.Empty<byte>();
            pending.Length = 0;
            pending.Dispose();
            pending = new PooledBuffer(64 << 10);
            pendingChunks = null;
            job.Compressed = Task.Run(() => CompressJob(job, compression, level), ct);
            await channel.Writer.WriteAsync(job, ct).ConfigureAwait(false);
        }

        Exception? failure = null;
        var hashBuf = new byte[32];
        try
        {
            foreach (var e in ordered)
            {
                ct.ThrowIfCancellationRequested();
                var m = e.Meta;
                TarHeaderWriter.Write(pending, m);
                var te = new TocEntry
                {
                    Name = m.Name,
                    Mode = m.Mode,
                    Uid = m.Uid,
                    Gid = m.Gid,
                    UserName = m.UserName,
                    GroupName = m.GroupName,
                    ModTime = m.MTime == 0 ? null : DateTimeOffset.FromUnixTimeSeconds(m.MTime),
                    Xattrs = m.Xattrs,
                };
                switch (m.TypeFlag)
                {
                    case (byte)'1': te.Type = TocEntryType.Hardlink; te.LinkName = m.LinkName; break;
                    case (byte)'2': te.Type = TocEntryType.Symlink; te.LinkName = m.LinkName; break;
                    case (byte)'3': te.Type = TocEntryType.Char; te.DevMajor = m.DevMajor; te.DevMinor = m.DevMinor; break;
                    case (byte)'4': te.Type = TocEntryType.Block; te.DevMajor = m.DevMajor; te.DevMinor = m.DevMinor; break;
                    case (byte)'5': te.Type = TocEntryType.Dir; break;
                    case (byte)'6': te.Type = TocEntryType.Fifo; break;
                    default: te.Type = TocEntryType.Reg; te.Size = m.Size; break;
                }
                if (te.Type != TocEntryType.Reg || m.Size == 0)
                {
                    if (te.Type == TocEntryType.Reg) te.Digest = ChunkDecoder.Sha256Digest(ReadOnlySpan<byte>.Empty);
                    tocEntries.Add(te);
                    if (pending.Length >= flushAt) await Flush().ConfigureAwait(false);
                    continue;
                }
                long done = 0;
                var reg = te;
                while (done < m.Size)
                {
                    await Flush().ConfigureAwait(false);
                    int n = (int)Math.Min(o.ChunkSize, m.Size - done);
                    te.ChunkSize = m.Size - done >= o.ChunkSize ? n : 0; // as the reference: 0 = "to the end of the file"
                    te.ChunkOffset = done;
                    var dst = pending.Reserve(n);
                    if (e.InlineData is not null) e.InlineData.AsSpan((int)done, n).CopyTo(dst);
                    else ReadSource(source, e.DataOffset + done, dst);
                    fileHash.AppendData(dst);
                    te.ChunkDigest = ChunkDecoder.Sha256Digest(dst);
                    (pendingChunks = new List<TocEntry>(1)).Add(te);
                    tocEntries.Add(te);
                    done += n;
                    if (done < m.Size) te = new TocEntry { Name = m.Name, Type = TocEntryType.Chunk };
                }
                fileHash.GetHashAndReset(hashBuf);
                reg.Digest = ChunkDecoder.FormatSha256(hashBuf);
                TarHeaderWriter.Pad(pending, m.Size);
            }
            await Flush().ConfigureAwait(false);
        }
        catch (Exception ex) { failure = ex; }
        finally
        {
            channel.Writer.TryComplete(failure);
        }
        try { await consumer.ConfigureAwait(false); }
        catch (Exception ce) when (failure is null or ChannelClosedException) { failure = ce; }
        catch (Exception) { }
        if (failure is not null) { pending.Dispose(); System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(failure).Throw(); }

        var toc = new Toc { Version = 1, Entries = tocEntries };
        var json = toc.Serialize();
        var tocDigest = ChunkDecoder.Sha256Digest(json);
        long tocOffset;
        string? zChecksum = null, zPos = null;
        if (compression == BlobCompression.Gzip)
        {
            pending.Dispose();
            var tocTar = new PooledBuffer(json.Length + 2048);
            try
            {
                TarHeaderWriter.Write(tocTar, new TarMeta { Name = LayerLabels.TocTarName, TypeFlag = (byte)'0', Size = json.Length });
                tocTar.Append(json);
                TarHeaderWriter.Pad(tocTar, json.Length);
                tocTar.AppendZeros(1024);
                diff.AppendData(tocTar.Span);
                uncompressed += tocTar.Length;
                var (cb, cl) = CompressGzip(tocTar.Span, level);
                tocOffset = written;
                await output.WriteAsync(cb.AsMemory(0, cl), ct).ConfigureAwait(false);
                written += cl;
                ArrayPool<byte>.Shared.Return(cb);
            }
            finally { tocTar.Dispose(); }
            var footer = Footer.BuildGzip(tocOffset);
            await output.WriteAsync(footer, ct).ConfigureAwait(false);
            written += footer.Length;
        }
        else
        {
            // End-of-archive blocks in their own frame, then the TOC in a skippable frame, then the footer.
            pending.Dispose();
            var eof = new byte[1024];
            diff.AppendData(eof);
            uncompressed += eof.Length;
            var (eb, el) = CompressZstd(eof, level);
            await output.WriteAsync(eb.AsMemory(0, el), ct).ConfigureAwait(false);
            written += el;
            ArrayPool<byte>.Shared.Return(eb);
            var (tb, tl) = CompressZstd(json, level);
            var hdr = new byte[8];
            Footer.SkippableMagic.CopyTo(hdr);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(hdr.AsSpan(4), (uint)tl);
            await output.WriteAsync(hdr, ct).ConfigureAwait(false);
            written += 8;
            tocOffset = written;
            await output.WriteAsync(tb.AsMemory(0, tl), ct).ConfigureAwait(false);
            written += tl;
            zChecksum = ChunkDecoder.Sha256Digest(tb.AsSpan(0, tl));
            zPos = $"{tocOffset}:{tl}:{json.Length}:1";
            ArrayPool<byte>.Shared.Return(tb);
            var footer = Footer.BuildZstd(tocOffset, tl, json.Length);
            await output.WriteAsync(footer, ct).ConfigureAwait(false);
            written += footer.Length;
        }
        await output.FlushAsync(ct).ConfigureAwait(false);
        Span<byte> d = stackalloc byte[32];
        diff.GetHashAndReset(d);
        return (toc, ChunkDecoder.FormatSha256(d), uncompressed, written, tocOffset, tocDigest, zChecksum, zPos);
    }

    private static void ReadSource(Stream source, long offset, Span<byte> dst)
    {
        if (source is FileStream fs)
        {
            int done = 0;
            while (done < dst.Length)
            {
                int n = RandomAccess.Read(fs.SafeFileHandle, dst[done..], offset + done);
                if (n == 0) throw new EstargzFormatException("input tar ended inside a file's data");
                done += n;
            }
            return;
        }
        source.Position = offset;
        try { source.ReadExactly(dst); }
        catch (EndOfStreamException e) { throw new EstargzFormatException("input tar ended inside a file's data", e); }
    }

    private static (byte[], int) CompressJob(Job job, BlobCompression c, int level)
    {
        try
        {
            var data = job.Data.AsSpan(0, job.Length);
            return c == BlobCompression.Gzip ? CompressGzip(data, level) : CompressZstd(data, level);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(job.Data);
        }
    }

    private static (byte[], int) CompressGzip(ReadOnlySpan<byte> data, int level)
    {
        var ms = new RentedWriteStream(data.Length / 2 + 1024);
        using (var gz = new GZipStream(ms, new ZLibCompressionOptions { CompressionLevel = level }, leaveOpen: true))
            gz.Write(data);
        return (ms.Buffer, ms.Length32);
    }

    [ThreadStatic] private static Compressor? t_zstd;
    [ThreadStatic] private static int t_zstdLevel;

    private static (byte[], int) CompressZstd(ReadOnlySpan<byte> data, int level)
    {
        if (t_zstd is null || t_zstdLevel != level)
        {
            t_zstd?.Dispose();
            t_zstd = new Compressor(level);
            t_zstdLevel = level;
        }
        int bound = Compressor.GetCompressBound(data.Length);
        var buf = ArrayPool<byte>.Shared.Rent(bound);
        int n = t_zstd.Wrap(data, buf);
        return (buf, n);
    }

    /// <summary>A write-only stream into a pooled, growing buffer (handed to the caller, who returns it).</summary>
    private sealed class RentedWriteStream : Stream
    {
        public byte[] Buffer;
        private int _len;
        public RentedWriteStream(int capacity) => Buffer = ArrayPool<byte>.Shared.Rent(Math.Max(capacity, 256));
        public int Length32 => _len;
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => _len;
        public override long Position { get => _len; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (_len + buffer.Length > Buffer.Length)
            {
                var nb = ArrayPool<byte>.Shared.Rent(Math.Max(_len + buffer.Length, Buffer.Length * 2));
                Buffer.AsSpan(0, _len).CopyTo(nb);
                ArrayPool<byte>.Shared.Return(Buffer);
                Buffer = nb;
            }
            buffer.CopyTo(Buffer.AsSpan(_len));
            _len += buffer.Length;
        }
    }

    /// <summary>Replays bytes already read from a stream before the rest of it.</summary>
    private sealed class PrefixedStream(ReadOnlyMemory<byte> prefix, Stream rest) : Stream
    {
        private ReadOnlyMemory<byte> _prefix = prefix;
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
        public override int Read(Span<byte> buffer)
        {
            if (_prefix.Length > 0)
            {
                int n = Math.Min(buffer.Length, _prefix.Length);
                _prefix.Span[..n].CopyTo(buffer);
                _prefix = _prefix[n..];
                return n;
            }
            return rest.Read(buffer);
        }
        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            if (_prefix.Length > 0) return Read(buffer.Span);
            return await rest.ReadAsync(buffer, cancellationToken).ConfigureAwait(false);
        }
        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
            => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
