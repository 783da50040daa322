using System.Text;
using Microsoft.Extensions.Logging;

namespace Stargz.Cli;

/// <summary>
/// logfmt lines on stderr (<c>time=… level=… msg="…" Key=value…</c>): structured like the daemon's logs without
/// pulling a logging framework into a short-lived command. stdout stays for the command's own output.
/// </summary>
internal sealed class StderrLogger(string category, LogLevel minimum, TextWriter? writer = null) : ILogger
{
    private readonly TextWriter _out = writer ?? Console.Error;

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => logLevel != LogLevel.None && logLevel >= minimum;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (!IsEnabled(logLevel)) return;
        var sb = new StringBuilder();
        sb.Append("time=").Append(DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ss.fffZ", System.Globalization.CultureInfo.InvariantCulture));
        sb.Append(" level=").Append(logLevel switch
        {
            LogLevel.Trace => "trace", LogLevel.Debug => "debug", LogLevel.Information => "info",
            LogLevel.Warning => "warn", LogLevel.Error => "error", _ => "fatal",
        });
        sb.Append(" logger=").Append(category);
        sb.Append(" msg=").Append(Quote(formatter(state, exception)));
        if (state is IReadOnlyList<KeyValuePair<string, object?>> fields)
            foreach (var (k, v) in fields)
                if (k != "{OriginalFormat}")
                    sb.Append(' ').Append(k).Append('=').Append(Quote(Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture) ?? ""));
        if (exception is not null) sb.Append(" error=").Append(Quote(exception.Message));
        lock (_out) _out.WriteLine(sb.ToString());
    }

    private static string Quote(string s) =>
        s.Length > 0 && s.All(c => c > ' ' && c != '"' && c != '=' && c < 127) ? s : "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"").Replace("\n", "\\n") + "\"";
}
