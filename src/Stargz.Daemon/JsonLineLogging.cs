using System.Buffers;
using System.Globalization;
using System.Text.Encodings.Web;
using System.Text.Json;
using Microsoft.Extensions.Logging;

namespace Stargz.Daemon;

/// <summary>
/// The daemon's logs: one JSON object per line on stderr, in the shape of Microsoft's JSON console formatter
/// (<c>Timestamp, EventId, LogLevel, Category, Message, Exception, State</c>), written by the caller in one
/// write(2). It replaces that formatter and its logger factory because they cost a fifth of the start-up (options,
/// filter rules and formatters bound through DI and the AOT type loader) and a queue thread for good; this factory is
/// also the host's, so the host builds no logging of its own. Filters: a minimum level, and framework categories
/// (<c>Microsoft.*</c>, <c>Grpc.*</c>) at warning unless debugging.
/// </summary>
public sealed class JsonLineLoggerFactory : ILoggerFactory
{
    private readonly LogLevel _minimum;
    private readonly Stream _out;
    private readonly Lock _writeLock = new();
    private readonly Dictionary<string, JsonLineLogger> _loggers = new(StringComparer.Ordinal);

    /// <param name="minimum">the daemon's level (<c>--log-level</c>, or debug with <c>debug = true</c>).</param>
    /// <param name="output">where lines go (stderr when null; tests pass a memory stream).</param>
    public JsonLineLoggerFactory(LogLevel minimum, Stream? output = null)
    {
        _minimum = minimum;
        _out = output ?? Console.OpenStandardError();
    }

    /// <summary>The level a category logs at: framework categories are quieter, as the console setup had them.</summary>
    internal LogLevel LevelOf(string category)
    {
        if (category.StartsWith("Microsoft", StringComparison.Ordinal))
            return _minimum <= LogLevel.Debug ? Max(_minimum, LogLevel.Information) : Max(_minimum, LogLevel.Warning);
        if (category.StartsWith("Grpc", StringComparison.Ordinal)) return Max(_minimum, LogLevel.Warning);
        return _minimum;
    }

    private static LogLevel Max(LogLevel a, LogLevel b) => a > b ? a : b;

    public ILogger CreateLogger(string categoryName)
    {
        lock (_loggers)
        {
            if (!_loggers.TryGetValue(categoryName, out var logger))
                _loggers[categoryName] = logger = new JsonLineLogger(this, categoryName, LevelOf(categoryName));
            return logger;
        }
    }

    /// <summary>Providers are not used: every line goes to this factory's output.</summary>
    public void AddProvider(ILoggerProvider provider) { }

    public void Dispose() { }

    // Not HTML-safe escaping: these lines are read by people and log collectors, never embedded in a page.
    private static readonly JsonWriterOptions WriterOptions = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping, SkipValidation = true };

    internal void Write<TState>(string category, LogLevel level, EventId eventId, TState state, Exception? exception, string message)
    {
        var buffer = new ArrayBufferWriter<byte>(256);
        using (var w = new Utf8JsonWriter(buffer, WriterOptions))
        {
            w.WriteStartObject();
            w.WriteString("Timestamp", DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ss.fffZ", CultureInfo.InvariantCulture));
            w.WriteNumber("EventId", eventId.Id);
            w.WriteString("LogLevel", NameOf(level));
            w.WriteString("Category", category);
            w.WriteString("Message", message);
            if (exception != null) w.WriteString("Exception", exception.ToString());
            if (state is IReadOnlyList<KeyValuePair<string, object?>> fields)
            {
                w.WriteStartObject("State");
                w.WriteString("Message", message);
                for (var i = 0; i < fields.Count; i++)
                {
                    var (key, value) = fields[i];
                    w.WritePropertyName(key);
                    WriteValue(w, value);
                }
                w.WriteEndObject();
            }
            w.WriteEndObject();
        }
        buffer.Write("\n"u8);
        lock (_writeLock)
        {
            try
            {
                _out.Write(buffer.WrittenSpan);
                _out.Flush();
            }
            catch (IOException) { } // stderr gone (a closed pipe): the daemon goes on without its log
            catch (ObjectDisposedException) { }
        }
    }

    private static void WriteValue(Utf8JsonWriter w, object? value)
    {
        switch (value)
        {
            case null: w.WriteNullValue(); break;
            case bool b: w.WriteBooleanValue(b); break;
            case int n: w.WriteNumberValue(n); break;
            case long n: w.WriteNumberValue(n); break;
            case uint n: w.WriteNumberValue(n); break;
            case ulong n: w.WriteNumberValue(n); break;
            case double d when double.IsFinite(d): w.WriteNumberValue(d); break;
            case IFormattable f: w.WriteStringValue(f.ToString(null, CultureInfo.InvariantCulture)); break;
            default: w.WriteStringValue(value.ToString()); break;
        }
    }

    internal static string NameOf(LogLevel level) => level switch
    {
        LogLevel.Trace => "Trace",
        LogLevel.Debug => "Debug",
        LogLevel.Information => "Information",
        LogLevel.Warning => "Warning",
        LogLevel.Error => "Error",
        LogLevel.Critical => "Critical",
        _ => "None",
    };
}

internal sealed class JsonLineLogger(JsonLineLoggerFactory factory, string category, LogLevel minimum) : ILogger
{
    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => logLevel != LogLevel.None && logLevel >= minimum;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (!IsEnabled(logLevel)) return;
        factory.Write(category, logLevel, eventId, state, exception, formatter(state, exception));
    }
}
