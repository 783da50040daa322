using System.Diagnostics;
using System.Security.Cryptography;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Stargz.Containerd;

/// <summary>One file the workload opened: its path in the image, its size, and the layer (index in the manifest)
/// whose copy it read — the topmost layer that has it.</summary>
public sealed record RecordedFile(string Path, long Size, int Layer);

/// <summary>What <see cref="WorkloadRecorder.RecordAsync"/> saw: the files in first-open order; the workload's exit
/// code (ctr's: 128+signal when killed); whether the period ran out first; whether the kernel dropped events.</summary>
public sealed record WorkloadRecord(IReadOnlyList<RecordedFile> Files, int ExitCode, bool TimedOut, bool Overflowed);

public sealed record RecordOptions
{
    /// <summary>The snapshotter the image was unpacked into (its rootfs chain is prepared there).</summary>
    public required string Snapshotter { get; init; }
    /// <summary>Chain ID of the image's top layer (<see cref="RpullResult.TopChainId"/>).</summary>
    public required string TopChainId { get; init; }
    public required int LayerCount { get; init; }
    public required ReadOnlyMemory<byte> ImageConfig { get; init; }
    /// <summary>Replaces the image's Entrypoint+Cmd when not empty.</summary>
    public IReadOnlyList<string> Command { get; init; } = [];
    /// <summary>The workload is killed after this long.</summary>
    public TimeSpan Period { get; init; } = TimeSpan.FromSeconds(10);
    /// <summary>containerd's own CLI, which runs the container (Containers + Tasks API through containerd's client).</summary>
    public string Ctr { get; init; } = "ctr";
    /// <summary>runc's state root for <c>ctr run --runc-root</c>; null: runc's default.</summary>
    public string? RuncRoot { get; init; }
    /// <summary>Where the rootfs is mounted and the spec written (a private subdirectory, removed at the end).</summary>
    public string WorkDirectory { get; init; } = Path.GetTempPath();
    /// <summary>The container's stdout and stderr go here (not to the caller's stdout, which carries the report).</summary>
    public TextWriter? Output { get; init; }
}

/// <summary>
/// Runs an image's workload once and records the files it opens, in order — the first half of
/// <c>stargz image optimize</c>. Like the reference's analyzer, containerd is not left to mount the rootfs: we
/// Prepare an active snapshot on the image's top chain ID, mount it ourselves, put a fanotify mark on that
/// filesystem (<see cref="FanotifyRecorder"/>) and only then start the container with the spec's root pointing at
/// our mount, so nothing it opens is missed. The container is run by containerd's own <c>ctr run --config</c>
/// (containerd's Containers and Tasks API through its client library, stdio through the shim's FIFOs); the spec is
/// containerd's default with the image config's process (<see cref="WorkloadSpec"/>). Stops at the workload's exit or
/// after <see cref="RecordOptions.Period"/> (SIGKILL through <c>ctr task kill</c>). Everything it creates — the
/// container, the mount, the snapshot, the directory — is removed again, on failure and on cancellation too.
/// </summary>
public sealed class WorkloadRecorder(ContainerdClient containerd, ILogger? logger = null)
{
    private readonly ILogger _log = logger ?? NullLogger.Instance;

    public async Task<WorkloadRecord> RecordAsync(RecordOptions o, CancellationToken ct)
    {
        var id = "stargz-optimize-" + Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(6));
        RootfsMount? mount = null;
        bool prepared = false;
        // The active snapshot lives under a lease of its own: containerd's GC removes a snapshot nothing references
        // (seen: the GC that the pull's lease deletion scheduled took the upper dir away under the running container).
        // Expires by itself if we die; deleted (with a last Remove of the snapshot) at the end.
        await containerd.CreateLeaseAsync(id, TimeSpan.FromHours(1) + o.Period, CancellationToken.None).ConfigureAwait(false);
        containerd.LeaseId = id;
        var dir = Path.Combine(Path.GetFullPath(o.WorkDirectory), id);
        try
        {
            var rootfs = Directory.CreateDirectory(Path.Combine(dir, "rootfs")).FullName;
            var mounts = await containerd.PrepareSnapshotAsync(o.Snapshotter, id, o.TopChainId, new Dictionary<string, string>(), ct).ConfigureAwait(false)
                ?? throw new ContainerdException($"prepare snapshot {id} on {o.TopChainId}: snapshotter {o.Snapshotter} says it exists", Grpc.Core.StatusCode.AlreadyExists);
            prepared = true;
            mount = RootfsMount.Mount(mounts, rootfs);
            var process = WorkloadSpec.FromImageConfig(o.ImageConfig.Span, o.Command, rootfs);
            var baseSpec = await RunCtrAsync(o, ["oci", "spec"], ct).ConfigureAwait(false);
            var specPath = Path.Combine(dir, "config.json");
            await File.WriteAllTextAsync(specPath, WorkloadSpec.BuildSpec(baseSpec, process, rootfs, containerd.Namespace, id), ct).ConfigureAwait(false);
            _log.LogInformation("running {Args} in container {Id} (uid {Uid}, cwd {Cwd}) for at most {Period}", string.Join(' ', process.Args), id, process.Uid,
                process.Cwd, o.Period);

            using var recorder = FanotifyRecorder.Start(rootfs);
            var (exit, timedOut) = await RunContainerAsync(o, id, specPath, ct).ConfigureAwait(false);
            var paths = recorder.Stop();
            if (recorder.Overflowed) _log.LogWarning("fanotify queue overflowed: the record of container {Id} misses files", id);
            return new WorkloadRecord(Locate(paths, rootfs, mount.LowerDirs, o.LayerCount), exit, timedOut, recorder.Overflowed);
        }
        finally
        {
            mount?.Dispose();
            if (prepared)
            {
                try { await containerd.RemoveSnapshotAsync(o.Snapshotter, id, CancellationToken.None).ConfigureAwait(false); }
                catch (ContainerdException e) { _log.LogWarning(e, "removing snapshot {Key}", id); }
            }
            containerd.LeaseId = null;
            try { await containerd.DeleteLeaseAsync(id, CancellationToken.None).ConfigureAwait(false); }
            catch (ContainerdException e) { _log.LogWarning(e, "deleting lease {Lease}", id); }
            try { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); }
            catch (IOException e) { _log.LogWarning(e, "removing {Dir}", dir); }
        }
    }

    /// <summary>
    /// The image files among <paramref name="paths"/>: regular files of a layer (not ones the workload created, not
    /// directories or devices), each with the layer that holds it — the first of the overlay's lower directories
    /// (topmost first, so index <c>layerCount - 1 - i</c>) that has it. Without lower directories (a snapshotter that
    /// does not return an overlay) the file is looked up in the mounted rootfs and its layer is unknown (-1).
    /// </summary>
    internal static List<RecordedFile> Locate(IReadOnlyList<string> paths, string rootfs, IReadOnlyList<string> lowerDirs, int layerCount)
    {
        var files = new List<RecordedFile>(paths.Count);
        foreach (var p in paths)
        {
            var rel = p.TrimStart('/');
            if (lowerDirs.Count == 0)
            {
                var fi = new FileInfo(Path.Combine(rootfs, rel));
                if (fi.Exists && fi.LinkTarget is null) files.Add(new RecordedFile(p, fi.Length, -1));
                continue;
            }
            for (int i = 0; i < lowerDirs.Count; i++)
            {
                var full = Path.Combine(lowerDirs[i], rel);
                var fi = new FileInfo(full);
                if (!fi.Exists && !Directory.Exists(full)) continue;
                // The topmost layer with the name decides: a directory or link there hides lower copies. (A whiteout
                // cannot be topmost for a name the workload opened.)
                if (fi.Exists && fi.LinkTarget is null) files.Add(new RecordedFile(p, fi.Length, layerCount - 1 - i));
                break;
            }
        }
        return files;
    }

    private async Task<(int Exit, bool TimedOut)> RunContainerAsync(RecordOptions o, string id, string specPath, CancellationToken ct)
    {
        var args = new List<string> { "run", "--rm", "--config", specPath };
        if (o.RuncRoot is not null) args.InsertRange(1, ["--runc-root", o.RuncRoot]);
        args.Add(id);
        using var p = StartCtr(o, args, redirectOutput: true);
        var output = o.Output ?? TextWriter.Null;
        var copy = Task.WhenAll(CopyAsync(p.StandardOutput, output), CopyAsync(p.StandardError, output));
        bool timedOut = false;
        using (var period = CancellationTokenSource.CreateLinkedTokenSource(ct))
        {
            period.CancelAfter(o.Period);
            try
            {
                await p.WaitForExitAsync(period.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                timedOut = !ct.IsCancellationRequested;
                _log.LogInformation("stopping container {Id}: {Why}", id, timedOut ? $"period of {o.Period} over" : "cancelled");
                // SIGKILL through containerd; ctr run then sees the exit, deletes task and container (--rm) and returns.
                try { await RunCtrAsync(o, ["task", "kill", "--signal", "SIGKILL", id], CancellationToken.None).ConfigureAwait(false); }
                catch (IOException e) { _log.LogWarning(e, "killing task {Id}", id); }
                using var grace = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                try { await p.WaitForExitAsync(grace.Token).ConfigureAwait(false); }
                catch (OperationCanceledException)
                {
                    p.Kill();
                    await p.WaitForExitAsync(CancellationToken.None).ConfigureAwait(false);
                }
            }
        }
        await copy.ConfigureAwait(false);
        // ctr run --rm normally removes the container; after an error or a killed ctr it may still be there.
        try { await RunCtrAsync(o, ["containers", "rm", id], CancellationToken.None, quietNotFound: true).ConfigureAwait(false); }
        catch (IOException) { }
        ct.ThrowIfCancellationRequested();
        if (!timedOut && p.ExitCode != 0) _log.LogInformation("workload of {Id} exited with {Code}", id, p.ExitCode);
        return (p.ExitCode, timedOut);
    }

    private static async Task CopyAsync(StreamReader from, TextWriter to)
    {
        var buf = new char[4096];
        int n;
        while ((n = await from.ReadAsync(buf).ConfigureAwait(false)) > 0)
            lock (to) to.Write(buf, 0, n);
    }

    private Process StartCtr(RecordOptions o, List<string> args, bool redirectOutput)
    {
        var psi = new ProcessStartInfo(o.Ctr)
        {
            RedirectStandardInput = true, RedirectStandardOutput = redirectOutput, RedirectStandardError = redirectOutput, UseShellExecute = false,
        };
        foreach (var a in (string[])["--address", containerd.Socket, "--namespace", containerd.Namespace]) psi.ArgumentList.Add(a);
        foreach (var a in args) psi.ArgumentList.Add(a);
        Process p;
        try { p = Process.Start(psi) ?? throw new IOException($"could not start {o.Ctr}"); }
        catch (System.ComponentModel.Win32Exception e) { throw new IOException($"could not run {o.Ctr} (containerd's CLI; is it installed?): {e.Message}", e); }
        p.StandardInput.Close(); // the workload reads EOF on stdin
        return p;
    }

    /// <summary>Runs a short ctr command; its stdout, or IOException naming the command and its stderr.</summary>
    private async Task<string> RunCtrAsync(RecordOptions o, string[] args, CancellationToken ct, bool quietNotFound = false)
    {
        using var p = StartCtr(o, [.. args], redirectOutput: true);
        var stdout = p.StandardOutput.ReadToEndAsync(ct);
        var stderr = p.StandardError.ReadToEndAsync(ct);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
        deadline.CancelAfter(containerd.Timeouts.Call);
        try { await p.WaitForExitAsync(deadline.Token).ConfigureAwait(false); }
        catch (OperationCanceledException)
        {
            p.Kill();
            throw new IOException($"ctr {string.Join(' ', args)} did not finish in {containerd.Timeouts.Call}");
        }
        var err = await stderr.ConfigureAwait(false);
        if (p.ExitCode != 0)
        {
            if (quietNotFound && err.Contains("not found", StringComparison.OrdinalIgnoreCase)) return "";
            throw new IOException($"ctr {string.Join(' ', args)}: exit {p.ExitCode}: {err.Trim()}");
        }
        return await stdout.ConfigureAwait(false);
    }
}
