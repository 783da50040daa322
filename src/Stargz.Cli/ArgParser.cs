using System.Globalization;

namespace Stargz.Cli;

/// <summary>A command line that does not parse; the message says why. The command prints its usage and exits 2.</summary>
internal sealed class UsageException(string message) : Exception(message);

/// <summary>
/// The one argument parser of every <c>stargz</c> command. Options are declared once, by their names (long ones and
/// a few short aliases, the first name is the key): switches take no value, the others take one, as
/// <c>--name value</c> or <c>--name=value</c> (short aliases only the first way), and may repeat. Anything else
/// starting with '-' is an unknown flag; the rest, "-" (stdin) included, is positional, in order.
/// </summary>
internal sealed class ArgParser
{
    private readonly Dictionary<string, (string Key, bool TakesValue)> _options = new(StringComparer.Ordinal);

    /// <summary>An option without a value; <c>--name=anything</c> also just turns it on.</summary>
    public ArgParser Switch(params string[] names) => Declare(names, takesValue: false);

    /// <summary>An option with a value; given more than once, <see cref="ParsedArgs.Last"/> is the last one.</summary>
    public ArgParser Value(params string[] names) => Declare(names, takesValue: true);

    private ArgParser Declare(string[] names, bool takesValue)
    {
        foreach (var n in names) _options.Add(n, (names[0], takesValue));
        return this;
    }

    public ParsedArgs Parse(IReadOnlyList<string> args)
    {
        var positional = new List<string>();
        var values = new Dictionary<string, List<string>>(StringComparer.Ordinal);
        for (var i = 0; i < args.Count; i++)
        {
            var a = args[i];
            string? inline = null;
            if (a.StartsWith("--", StringComparison.Ordinal) && a.IndexOf('=') is var eq and > 0)
            {
                inline = a[(eq + 1)..];
                a = a[..eq];
            }
            if (!_options.TryGetValue(a, out var o))
            {
                if (a.StartsWith('-') && a.Length > 1) throw new UsageException($"unknown flag {a}");
                positional.Add(a);
                continue;
            }
            string value = "true";
            if (o.TakesValue)
            {
                if (inline is not null) value = inline;
                else if (i + 1 < args.Count) value = args[++i];
                else throw new UsageException($"{a} needs a value");
            }
            if (!values.TryGetValue(o.Key, out var list)) values[o.Key] = list = [];
            list.Add(value);
        }
        return new ParsedArgs(positional, values);
    }
}

/// <summary>What <see cref="ArgParser.Parse"/> found, by each option's first name.</summary>
internal sealed class ParsedArgs(IReadOnlyList<string> positional, Dictionary<string, List<string>> values)
{
    public IReadOnlyList<string> Positional { get; } = positional;

    public bool Has(string key) => values.ContainsKey(key);

    /// <summary>The last value given, or null.</summary>
    public string? Last(string key) => values.TryGetValue(key, out var l) ? l[^1] : null;

    /// <summary>Every value given, in order.</summary>
    public IReadOnlyList<string> All(string key) => values.TryGetValue(key, out var l) ? l : [];

    /// <summary>The last value as an integer of at least <paramref name="min"/>, or null when not given.</summary>
    public int? Int(string key, int min = int.MinValue)
    {
        if (Last(key) is not { } v) return null;
        if (int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) && n >= min) return n;
        throw new UsageException(min == int.MinValue ? $"{key} wants an integer, not \"{v}\"" : $"{key} wants an integer of at least {min}, not \"{v}\"");
    }
}
