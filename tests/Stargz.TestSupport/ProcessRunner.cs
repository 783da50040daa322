using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;

namespace Stargz.TestSupport;

public sealed record ProcessResult(int ExitCode, string StdOut, string StdErr)
{
    public ProcessResult EnsureSuccess(string what)
    {
        if (ExitCode != 0)
            throw new InvalidOperationException($"{what} exited {ExitCode}\nstdout: {Printable(StdOut)}\nstderr: {Printable(StdErr)}");
        return this;
    }

    /// <summary>
    /// <paramref name="text"/> without control characters other than line breaks and tabs (a tool's progress bars and
    /// colours): in a failure message they would cut the test report short, its XML writer refusing them.
    /// </summary>
    public static string Printable(string text)
    {
        var sb = new System.Text.StringBuilder(text.Length);
        for (var i = 0; i < text.Length; i++)
        {
            var ch = text[i];
            if (ch == '\u001b' && i + 1 < text.Length && text[i + 1] == '[')
            {
                // An ANSI sequence: ESC [ parameters final-letter.
                i += 2;
                while (i < text.Length && !char.IsAsciiLetter(text[i])) i++;
                continue;
            }
            if (char.IsControl(ch) && ch is not ('\n' or '\r' or '\t')) continue;
            sb.Append(ch);
        }
        return sb.ToString();
    }
}

/// <summary>Runs real tools (ctr, ctr-remote, skopeo, umoci, stat...) with a bounded time.</summary>
public static class ProcessRunner
{
    public static async Task<ProcessResult> RunAsync(string file, IEnumerable<string> args, TimeSpan? timeout = null,
        string? workDir = null, IDictionary<string, string>? env = null, string? stdin = null)
    {
        var psi = new ProcessStartInfo(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = stdin != null,
            UseShellExecute = false,
            WorkingDirectory = workDir ?? Environment.CurrentDirectory,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        if (env != null) foreach (var kv in env) psi.Environment[kv.Key] = kv.Value;
        using var p = Process.Start(psi) ?? throw new InvalidOperationException($"cannot start {file}");
        var so = new StringBuilder();
        var se = new StringBuilder();
        p.OutputDataReceived += (_, e) => { if (e.Data != null) lock (so) so.AppendLine(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data != null) lock (se) se.AppendLine(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        if (stdin != null)
        {
            await p.StandardInput.WriteAsync(stdin);
            p.StandardInput.Close();
        }
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromMinutes(5));
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            try { p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
            throw new TimeoutException($"{file} {string.Join(' ', args)} did not finish within {timeout ?? TimeSpan.FromMinutes(5)}");
        }
        p.WaitForExit();
        lock (so) lock (se) return new ProcessResult(p.ExitCode, so.ToString(), se.ToString());
    }

    public static Task<ProcessResult> RunAsync(string file, params string[] args) => RunAsync(file, args, null);

    public static async Task<string> CheckAsync(string file, params string[] args)
        => (await RunAsync(file, args, null)).EnsureSuccess($"{file} {string.Join(' ', args)}").StdOut;

    /// <summary>
    /// Ends a long-running child as a service manager would: SIGTERM, then SIGKILL if it has not exited within
    /// <paramref name="grace"/>. A process that has already exited (or was never started) is left alone.
    /// </summary>
    public static async Task TerminateAsync(Process p, TimeSpan grace)
    {
        try
        {
            if (p.HasExited) return;
            kill(p.Id, 15);
            using var cts = new CancellationTokenSource(grace);
            try { await p.WaitForExitAsync(cts.Token); }
            catch (OperationCanceledException) { p.Kill(); await p.WaitForExitAsync(); }
        }
        catch (InvalidOperationException) { }
    }

    [DllImport("libc", SetLastError = true)]
    private static extern int kill(int pid, int sig);
}
