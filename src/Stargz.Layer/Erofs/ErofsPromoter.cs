using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using Microsoft.Extensions.Logging;

namespace Stargz.Layer.Erofs;

/// <summary>
/// Turns a fully fetched, verified layer into a kernel EROFS image so that its reads no longer cross FUSE. Lives in
/// ROOT/stargz/erofs beside the chunk cache and the stored TOCs: HEX.erofs (the image), HEX.promoted (the record: the
/// TOC digest the image was checked against and its size; written last, so an image without it is never used) and
/// mnt/HEX (the one file-backed read-only mount of the image, shared by every snapshot of the layer). Images count in
/// the disk budget and are evicted last (<see cref="CacheFileKind.Image"/>): the record goes first, then the image —
/// deleted at once when nothing holds it, or renamed HEX.evicted-N and still counted while a running container's
/// overlay (or an open file) keeps the kernel's mount of it alive, until that ends (<see cref="FreeHeld"/>).
/// </summary>
public sealed class ErofsPromoter : IDisposable
{
    private readonly ILogger _log;
    private readonly DiskBudget _budget;
    private readonly SemaphoreSlim _one = new(1, 1); // one image is built at a time: it is background work
    private readonly ConcurrentDictionary<string, int> _mountRefs = new(StringComparer.Ordinal);
    private readonly object _mountLock = new();
    private readonly List<string> _held = []; // evicted images the kernel still holds (guarded by _held)
    private long _promoted, _failures, _bytes, _evicted;

    internal ErofsPromoter(string directory, DiskBudget budget, ILogger log)
    {
        Directory = directory;
        _budget = budget;
        _log = log;
    }

    public string Directory { get; }

    /// <summary>Layers promoted by this process.</summary>
    public long Promoted => Interlocked.Read(ref _promoted);

    /// <summary>Promotions that failed (build, mount or check): those layers stay on FUSE.</summary>
    public long Failures => Interlocked.Read(ref _failures);

    /// <summary>Bytes of the images built by this process.</summary>
    public long Bytes => Interlocked.Read(ref _bytes);

    /// <summary>Images evicted by this process to make room (their layers went back to lazy FUSE).</summary>
    public long Evicted => Interlocked.Read(ref _evicted);

    /// <summary>Whether this kernel mounts erofs (/proc/filesystems).</summary>
    public static bool KernelSupportsErofs()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/filesystems"))
                if (line.AsSpan().Trim().SequenceEqual("erofs")) return true;
        }
        catch (IOException) { }
        return false;
    }

    /// <summary>Whether mkfs.erofs (erofs-utils) is on the PATH.</summary>
    public static bool MkfsAvailable()
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "/usr/sbin:/usr/bin:/sbin:/bin").Split(':', StringSplitOptions.RemoveEmptyEntries))
            if (File.Exists(Path.Combine(dir, "mkfs.erofs"))) return true;
        return false;
    }

    private static string Hex(string layerDigest) => layerDigest.Replace(':', '-');
    public string ImagePath(string layerDigest) => Path.Combine(Directory, Hex(layerDigest) + ".erofs");
    private string RecordPath(string layerDigest) => Path.Combine(Directory, Hex(layerDigest) + ".promoted");
    public string MountPath(string layerDigest) => Path.Combine(Directory, "mnt", Hex(layerDigest));

    /// <summary>Counts the recorded images found at start in the budget.</summary>
    public void ScanAtStart()
    {
        if (!System.IO.Directory.Exists(Directory)) return;
        foreach (var f in new DirectoryInfo(Directory).EnumerateFiles("*.erofs"))
            if (DigestOf(f.Name) is { } digest) _budget.Added(CacheFileKind.Image, digest, f.FullName, f.Length, f.LastWriteTimeUtc.Ticks);
        // Evicted by an earlier run while a container still read them: counted until nothing holds them.
        foreach (var f in new DirectoryInfo(Directory).EnumerateFiles("*.evicted-*"))
        {
            _budget.Added(CacheFileKind.Toc, f.FullName, f.FullName, f.Length, f.LastWriteTimeUtc.Ticks);
            lock (_held) _held.Add(f.FullName);
        }
        FreeHeld();
        // Leftovers of a build cut short (a crash): never recorded, never used.
        foreach (var f in new DirectoryInfo(Directory).EnumerateFiles("*.tmp-*"))
            try { f.Delete(); } catch (IOException) { }
    }

    /// <summary>Deletes every image and record under <paramref name="directory"/> (promotion is off; nothing mounts them).</summary>
    public static void DropAll(string directory, ILogger log)
    {
        if (!System.IO.Directory.Exists(directory)) return;
        var mounts = Path.Combine(directory, "mnt");
        if (System.IO.Directory.Exists(mounts))
            foreach (var d in System.IO.Directory.EnumerateDirectories(mounts))
            {
                try
                {
                    ErofsNative.Detach(d); // left mounted by a crash
                    System.IO.Directory.Delete(d);
                }
                catch (IOException e) { log.LogWarning("cannot remove the EROFS mount {Dir}: {Error}", d, e.Message); }
            }
        var n = 0;
        foreach (var f in System.IO.Directory.EnumerateFiles(directory))
        {
            if (!f.EndsWith(".erofs", StringComparison.Ordinal) && !f.EndsWith(".promoted", StringComparison.Ordinal) && !f.Contains(".tmp-", StringComparison.Ordinal)
                && !f.Contains(".evicted-", StringComparison.Ordinal))
                continue;
            try
            {
                File.Delete(f);
                n++;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { log.LogWarning("cannot delete {Path}: {Error}", f, e.Message); }
        }
        if (n > 0) log.LogInformation("[erofs] promote is off: {Count} EROFS image files of an earlier run deleted from {Dir}", n, directory);
    }

    /// <summary>The checked image of the layer, if it was promoted against this TOC (null otherwise).</summary>
    public string? Lookup(string layerDigest, string tocDigest)
    {
        try
        {
            var lines = File.ReadAllLines(RecordPath(layerDigest));
            var image = ImagePath(layerDigest);
            if (lines.Length >= 2 && lines[0] == "toc=" + tocDigest && lines[1].StartsWith("size=", StringComparison.Ordinal)
                && long.TryParse(lines[1].AsSpan("size=".Length), NumberStyles.None, CultureInfo.InvariantCulture, out var size)
                && new FileInfo(image).Length == size)
                return image;
            _log.LogWarning("promotion record of layer {Digest} does not match TOC {TocDigest} or its image; the layer is served through FUSE",
                layerDigest, tocDigest);
        }
        catch (FileNotFoundException) { }
        catch (DirectoryNotFoundException) { }
        catch (IOException e) { _log.LogWarning("promotion record of layer {Digest} cannot be read: {Error}", layerDigest, e.Message); }
        return null;
    }

    /// <summary>
    /// Builds the image from <paramref name="source"/> (the layer's FUSE mount, every chunk verified on disk: mkfs.erofs
    /// reads what the kernel sees through it — whiteouts, opaque xattrs, hard links, owners, modes, times), mounts it and
    /// checks it against the TOC (<see cref="ErofsImageCheck"/>), then records it. Returns the image's mount dir, or null
    /// when the promotion failed (logged and counted; the layer stays on FUSE).
    /// </summary>
    /// <param name="mayEvictImages">older images may make room for this one (not for a layer whose own image was evicted:
    /// two layers whose images do not both fit would otherwise take turns).</param>
    internal async Task<string?> PromoteAsync(string layerDigest, string tocDigest, string source, LayerFileSystem fs, long uncompressedBytes,
        bool mayEvictImages, CancellationToken ct)
    {
        await _one.WaitAsync(ct).ConfigureAwait(false);
        var image = ImagePath(layerDigest);
        var tmp = image + ".tmp-" + Environment.ProcessId;
        var mounted = false;
        try
        {
            if (Lookup(layerDigest, tocDigest) != null) return Acquire(layerDigest); // another snapshot of the layer did it
            // The image is about as big as the layer's files; it replaces their chunks, but both exist while it is built.
            // Older images make room for it (least recently mounted first): chunks do not, they are being read.
            if (mayEvictImages ? !_budget.MakeRoomForImage(uncompressedBytes) : !_budget.HasRoom(uncompressedBytes))
                throw new IOException($"no room in max_disk_mb for a {uncompressedBytes >> 20} MiB image next to the chunks");
            System.IO.Directory.CreateDirectory(Directory);
            var sw = Stopwatch.StartNew();
            await RunMkfsAsync(tmp, source, ct).ConfigureAwait(false);
            File.Move(tmp, image, overwrite: true);
            var size = new FileInfo(image).Length;
            var mnt = MountPath(layerDigest);
            System.IO.Directory.CreateDirectory(mnt);
            lock (_mountLock)
            {
                ErofsNative.Detach(mnt); // a mount left by a crash
                ErofsNative.MountErofs(image, mnt);
                mounted = true;
            }
            var summary = await Task.Run(() => ErofsImageCheck.Verify(fs, mnt, ct), ct).ConfigureAwait(false);
            WriteRecord(layerDigest, tocDigest, size);
            _budget.Added(CacheFileKind.Image, layerDigest, image, size);
            lock (_mountLock) _mountRefs[layerDigest] = 1;
            Interlocked.Increment(ref _promoted);
            Interlocked.Add(ref _bytes, size);
            _log.LogInformation("layer {Digest} promoted to EROFS {Image} ({Size} bytes) in {Ms} ms: {Names} names, {Files} files, {Hashed} bytes checked against TOC {TocDigest}",
                layerDigest, image, size, sw.ElapsedMilliseconds, summary.Names, summary.Files, summary.HashedBytes, tocDigest);
            return mnt;
        }
        catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException or System.ComponentModel.Win32Exception
                                       || (e is OperationCanceledException && !ct.IsCancellationRequested))
        {
            Interlocked.Increment(ref _failures);
            _log.LogWarning("layer {Digest}: promotion to EROFS failed, it stays on FUSE: {Error}", layerDigest, e.Message);
            if (mounted) lock (_mountLock) ErofsNative.Detach(MountPath(layerDigest));
            DeleteQuietly(image);
            DeleteQuietly(RecordPath(layerDigest));
            return null;
        }
        catch
        {
            if (mounted) lock (_mountLock) ErofsNative.Detach(MountPath(layerDigest));
            DeleteQuietly(image);
            throw;
        }
        finally
        {
            DeleteQuietly(tmp);
            _one.Release();
        }
    }

    private static async Task RunMkfsAsync(string image, string source, CancellationToken ct)
    {
        // Uncompressed (reads at page-cache speed); per-file mtimes kept exactly; xattrs kept (the default tolerance).
        var psi = new ProcessStartInfo("mkfs.erofs") { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
        foreach (var a in new[] { "--quiet", "--preserve-mtime", image, source }) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi) ?? throw new IOException("mkfs.erofs did not start");
        // Background work: the lowest CPU priority, so containers' reads go first.
        try { p.PriorityClass = ProcessPriorityClass.Idle; } catch (Exception e) when (e is InvalidOperationException or System.ComponentModel.Win32Exception) { }
        var stderr = p.StandardError.ReadToEndAsync(ct);
        _ = p.StandardOutput.ReadToEndAsync(ct);
        try { await p.WaitForExitAsync(ct).ConfigureAwait(false); }
        catch (OperationCanceledException)
        {
            try { p.Kill(); } catch (InvalidOperationException) { }
            throw;
        }
        if (p.ExitCode != 0) throw new IOException($"mkfs.erofs exited with {p.ExitCode}: {(await stderr.ConfigureAwait(false)).Trim()}");
    }

    private void WriteRecord(string layerDigest, string tocDigest, long size)
    {
        var path = RecordPath(layerDigest);
        var tmp = path + ".tmp-" + Environment.ProcessId;
        using (var f = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 0))
        {
            f.Write(System.Text.Encoding.ASCII.GetBytes($"toc={tocDigest}\nsize={size.ToString(CultureInfo.InvariantCulture)}\n"));
            f.Flush(flushToDisk: true);
        }
        File.Move(tmp, path, overwrite: true);
        ChunkCache.FsyncDirectory(Directory);
    }

    /// <summary>The image's mount dir, mounting it on first use (a restart); one more user until <see cref="Release"/>.</summary>
    public string Acquire(string layerDigest)
    {
        var mnt = MountPath(layerDigest);
        lock (_mountLock)
        {
            _budget.TouchImage(layerDigest);
            if (_mountRefs.TryGetValue(layerDigest, out var n) && n > 0)
            {
                _mountRefs[layerDigest] = n + 1;
                return mnt;
            }
            System.IO.Directory.CreateDirectory(mnt);
            ErofsNative.Detach(mnt); // left by a previous run
            ErofsNative.MountErofs(ImagePath(layerDigest), mnt);
            _mountRefs[layerDigest] = 1;
            return mnt;
        }
    }

    /// <summary>One user less; the last one unmounts the image (and with <paramref name="drop"/> deletes it and its record).</summary>
    public void Release(string layerDigest, bool drop)
    {
        lock (_mountLock)
        {
            if (_mountRefs.TryGetValue(layerDigest, out var n) && n > 1)
            {
                _mountRefs[layerDigest] = n - 1;
                return;
            }
            _mountRefs.TryRemove(layerDigest, out _);
            try
            {
                ErofsNative.Detach(MountPath(layerDigest));
                System.IO.Directory.Delete(MountPath(layerDigest));
            }
            catch (IOException e) { _log.LogWarning("cannot unmount the EROFS image of layer {Digest}: {Error}", layerDigest, e.Message); }
        }
        if (drop) Drop(layerDigest);
    }

    /// <summary>Deletes the layer's image and record (the layer was released, or no snapshot refers to it).</summary>
    public void Drop(string layerDigest)
    {
        var image = ImagePath(layerDigest);
        DeleteQuietly(RecordPath(layerDigest));
        if (DeleteQuietly(image)) _budget.Removed(CacheFileKind.Image, layerDigest);
    }

    /// <summary>Whether this process still mounts the layer's image (a mount of the layer is bound to it).</summary>
    public bool InUse(string layerDigest)
    {
        lock (_mountLock) return _mountRefs.TryGetValue(layerDigest, out var n) && n > 0;
    }

    /// <summary>Removes the layer's promotion record (eviction, first step): new mounts and a restart no longer use the image.
    /// Returns the record's text, to put back if the eviction cannot go on.</summary>
    internal string? Unrecord(string layerDigest)
    {
        var path = RecordPath(layerDigest);
        try
        {
            var text = File.ReadAllText(path);
            File.Delete(path);
            ChunkCache.FsyncDirectory(Directory);
            return text;
        }
        catch (FileNotFoundException) { return null; }
        catch (DirectoryNotFoundException) { return null; }
    }

    internal void Rerecord(string layerDigest, string text)
    {
        var path = RecordPath(layerDigest);
        File.WriteAllText(path + ".tmp-" + Environment.ProcessId, text);
        File.Move(path + ".tmp-" + Environment.ProcessId, path, overwrite: true);
    }

    /// <summary>
    /// The last step of an eviction (record gone, no mount of this process on the image): deletes the image when
    /// nothing holds it, else renames it HEX.evicted-N and keeps counting it until <see cref="FreeHeld"/> finds it free.
    /// Returns whether its bytes were freed.
    /// </summary>
    internal bool FreeOrHold(string layerDigest)
    {
        var image = ImagePath(layerDigest);
        var size = _budget.SizeOf(CacheFileKind.Image, layerDigest);
        Interlocked.Increment(ref _evicted);
        if (!File.Exists(image))
        {
            _budget.Removed(CacheFileKind.Image, layerDigest);
            return true;
        }
        bool? open;
        try { open = ErofsNative.IsOpenElsewhere(image); }
        catch (IOException e)
        {
            _log.LogWarning("evicted EROFS image {Image}: cannot tell whether it is still in use ({Error}); deleted", image, e.Message);
            open = null;
        }
        if (open != true)
        {
            if (DeleteQuietly(image)) _budget.Removed(CacheFileKind.Image, layerDigest);
            _log.LogInformation("layer {Digest}: EROFS image evicted to make room, {Size} bytes freed; the layer is served lazily through FUSE",
                layerDigest, size);
            return true;
        }
        var held = image[..^".erofs".Length] + ".evicted-" + DateTime.UtcNow.Ticks.ToString(CultureInfo.InvariantCulture);
        try { File.Move(image, held); }
        catch (IOException e)
        {
            _log.LogWarning("evicted EROFS image {Image} cannot be renamed ({Error}); deleted while still in use", image, e.Message);
            if (DeleteQuietly(image)) _budget.Removed(CacheFileKind.Image, layerDigest);
            return true;
        }
        _budget.Removed(CacheFileKind.Image, layerDigest);
        _budget.Added(CacheFileKind.Toc, held, held, size);
        lock (_held) _held.Add(held);
        _log.LogInformation("layer {Digest}: EROFS image evicted, served lazily through FUSE; its {Size} bytes stay (counted) until the containers that read it end",
            layerDigest, size);
        return false;
    }

    /// <summary>Deletes the evicted images nothing holds any more; true when one is still held.</summary>
    internal bool FreeHeld()
    {
        lock (_held)
        {
            for (var i = _held.Count - 1; i >= 0; i--)
            {
                var path = _held[i];
                bool? open;
                try { open = File.Exists(path) ? ErofsNative.IsOpenElsewhere(path) : false; }
                catch (IOException) { open = false; }
                if (open == true) continue;
                DeleteQuietly(path);
                _budget.Removed(CacheFileKind.Toc, path);
                _held.RemoveAt(i);
                _log.LogInformation("evicted EROFS image {Image} is no longer in use: deleted", path);
            }
            return _held.Count > 0;
        }
    }

    private static string? DigestOf(string fileName)
    {
        var name = fileName.EndsWith(".erofs", StringComparison.Ordinal) ? fileName[..^".erofs".Length] : fileName;
        var dash = name.IndexOf('-');
        return dash > 0 ? name[..dash] + ":" + name[(dash + 1)..] : null;
    }

    /// <summary>Layer digests that have an image on disk (the start-up sweep).</summary>
    public IEnumerable<string> ImageDigests()
    {
        if (!System.IO.Directory.Exists(Directory)) yield break;
        foreach (var f in System.IO.Directory.EnumerateFiles(Directory, "*.erofs"))
        {
            var name = Path.GetFileNameWithoutExtension(f);
            var dash = name.IndexOf('-');
            if (dash > 0) yield return name[..dash] + ":" + name[(dash + 1)..];
        }
    }

    private bool DeleteQuietly(string path)
    {
        try
        {
            if (!File.Exists(path)) return false;
            File.Delete(path);
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.LogWarning("cannot delete {Path}: {Error}", path, e.Message);
            return false;
        }
    }

    /// <summary>Unmounts every image this process mounted (shutdown); images and records stay for the next start.</summary>
    public void Dispose()
    {
        lock (_mountLock)
        {
            foreach (var d in _mountRefs.Keys)
            {
                try { ErofsNative.Detach(MountPath(d)); } catch (IOException) { }
            }
            _mountRefs.Clear();
        }
        _one.Dispose();
    }
}
