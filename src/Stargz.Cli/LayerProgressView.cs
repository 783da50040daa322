using Spectre.Console;
using Stargz.Containerd;
using Stargz.Converter;

namespace Stargz.Cli;

/// <summary>One bar's state: what the layer's row says, how far it is (bytes of <see cref="Max"/>), whether it is over.</summary>
internal readonly record struct LayerBar(string Status, long Value, long Max, bool Done);

/// <summary>
/// Progress bars per layer for <c>image rpull</c> and <c>image convert</c> on a terminal (Spectre.Console); the
/// commands print their plain lines instead when stdout is not a terminal. The mapping from the libraries' progress
/// events to a bar is here, apart from the drawing, so it can be tested.
/// </summary>
internal static class LayerProgressView
{
    /// <summary>Bars only on a terminal: the command writes to the process's own stdout and it is not redirected.</summary>
    public static bool UseBars(TextWriter stdout) => ReferenceEquals(stdout, Console.Out) && !Console.IsOutputRedirected;

    public static LayerBar Describe(LayerPullProgress p) => p.Stage switch
    {
        LayerPullStage.Preparing => new("preparing", 0, p.Size, false),
        LayerPullStage.Existing => new("already unpacked", p.Size, p.Size, true),
        LayerPullStage.Remote => new("remote snapshot (lazy)", p.Size, p.Size, true),
        LayerPullStage.Downloading => new("downloading", Math.Min(p.Bytes, p.Size), p.Size, false),
        LayerPullStage.Applying => new("applying", p.Size, p.Size, false),
        _ => new("applied", p.Size, p.Size, true),
    };

    public static LayerBar Describe(LayerConvertProgress p) => p.Stage switch
    {
        LayerConvertStage.Queued => new("queued", 0, p.Size, false),
        LayerConvertStage.Converting => new("converting", Math.Min(p.Bytes, p.Size), p.Size, false),
        LayerConvertStage.Copying => new("copying (already eStargz)", Math.Min(p.Bytes, p.Size), p.Size, false),
        LayerConvertStage.Pushing => new("pushing", p.Size, p.Size, false),
        _ => new("done", p.Size, p.Size, true),
    };

    /// <summary>
    /// Runs <paramref name="body"/> under a live set of bars; it gets the function to call with (layer digest, bar) from
    /// any thread. Bars appear in the order their layers are first reported and stay when done.
    /// </summary>
    public static async Task<T> RunAsync<T>(Func<Action<string, LayerBar>, Task<T>> body)
    {
        T result = default!;
        await AnsiConsole.Progress()
            .AutoClear(false)
            .HideCompleted(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn())
            .StartAsync(async ctx =>
            {
                var bars = new Dictionary<string, ProgressTask>(StringComparer.Ordinal);
                var gate = new Lock();
                void Update(string digest, LayerBar b)
                {
                    var description = Markup.Escape($"{StatusCommand.ShortDigest(digest)} {b.Status}");
                    lock (gate)
                    {
                        if (!bars.TryGetValue(digest, out var t)) bars[digest] = t = ctx.AddTask(description, maxValue: Math.Max(1, b.Max));
                        t.Description = description;
                        t.MaxValue = Math.Max(1, b.Max);
                        t.Value = b.Max <= 0 && b.Done ? 1 : b.Value;
                        if (b.Done) t.StopTask();
                    }
                }
                result = await body(Update).ConfigureAwait(false);
            }).ConfigureAwait(false);
        return result;
    }
}

/// <summary>An <see cref="IProgress{T}"/> that calls back on the reporting thread (Progress&lt;T&gt; would post to a pool thread, out of order).</summary>
internal sealed class InlineProgress<T>(Action<T> report) : IProgress<T>
{
    public void Report(T value) => report(value);
}
