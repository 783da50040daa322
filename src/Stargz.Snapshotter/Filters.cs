using System.Text;
using System.Text.RegularExpressions;

namespace Stargz.Snapshotter;

/// <summary>
/// containerd's filter syntax as List receives it: several filters are OR-ed, each is comma-separated selectors
/// AND-ed; a selector is a field path (`name`, `parent`, `kind`, `labels.KEY`, segments optionally quoted with " or `)
/// followed by nothing (present), `==`, `!=` or `~=` (regexp) and a value (quoted or bare up to the next comma).
/// </summary>
public sealed class SnapshotFilter
{
    private sealed record Selector(string[] Path, string? Op, string? Value, Regex? Re);

    private readonly List<List<Selector>> _any;

    private SnapshotFilter(List<List<Selector>> any) => _any = any;

    public static SnapshotFilter Parse(IEnumerable<string> filters)
    {
        var any = new List<List<Selector>>();
        foreach (var f in filters)
        {
            if (string.IsNullOrWhiteSpace(f)) continue;
            any.Add(ParseOne(f));
        }
        return new SnapshotFilter(any);
    }

    public bool Match(SnapshotRecord r) => _any.Count == 0 || _any.Any(all => all.All(s => MatchOne(s, r)));

    private static bool MatchOne(Selector s, SnapshotRecord r)
    {
        string? v = s.Path[0] switch
        {
            "name" when s.Path.Length == 1 => r.Key,
            "parent" when s.Path.Length == 1 => r.Parent,
            "kind" when s.Path.Length == 1 => r.Kind.ToString().ToLowerInvariant(),
            "labels" when s.Path.Length == 1 => r.Labels.Count > 0 ? "" : null,
            "labels" => r.Labels.TryGetValue(string.Join('.', s.Path.Skip(1)), out var lv) ? lv : null,
            _ => null,
        };
        return s.Op switch
        {
            null => v != null,
            "==" => v != null && v == s.Value,
            "!=" => v == null || v != s.Value,
            "~=" => v != null && s.Re!.IsMatch(v),
            _ => false,
        };
    }

    private static List<Selector> ParseOne(string f)
    {
        var sels = new List<Selector>();
        int i = 0;
        while (true)
        {
            SkipWs(f, ref i);
            var path = new List<string>();
            while (true)
            {
                path.Add(ReadSegment(f, ref i));
                if (i < f.Length && f[i] == '.') { i++; continue; }
                break;
            }
            SkipWs(f, ref i);
            string? op = null, value = null;
            if (i + 1 < f.Length && (f[i] == '=' || f[i] == '!' || f[i] == '~') && f[i + 1] == '=')
            {
                op = f.Substring(i, 2);
                i += 2;
                SkipWs(f, ref i);
                value = ReadValue(f, ref i);
            }
            Regex? re = null;
            if (op == "~=")
            {
                try { re = new Regex(value!, RegexOptions.CultureInvariant, TimeSpan.FromSeconds(1)); }
                catch (ArgumentException e) { throw SnapshotterException.InvalidArgument($"filter {f}: bad regexp {value}: {e.Message}"); }
            }
            sels.Add(new Selector(path.ToArray(), op, value, re));
            SkipWs(f, ref i);
            if (i >= f.Length) break;
            if (f[i] != ',') throw SnapshotterException.InvalidArgument($"filter {f}: unexpected '{f[i]}' at {i}");
            i++;
        }
        return sels;
    }

    private static void SkipWs(string s, ref int i) { while (i < s.Length && char.IsWhiteSpace(s[i])) i++; }

    private static string ReadSegment(string f, ref int i)
    {
        if (i < f.Length && (f[i] == '"' || f[i] == '`')) return ReadQuoted(f, ref i);
        int start = i;
        while (i < f.Length && (char.IsLetterOrDigit(f[i]) || f[i] == '_' || f[i] == '-' || f[i] == '/')) i++;
        if (i == start) throw SnapshotterException.InvalidArgument($"filter {f}: expected a field name at {start}");
        return f[start..i];
    }

    private static string ReadValue(string f, ref int i)
    {
        if (i < f.Length && (f[i] == '"' || f[i] == '`')) return ReadQuoted(f, ref i);
        int start = i;
        while (i < f.Length && f[i] != ',') i++;
        var v = f[start..i].TrimEnd();
        if (v.Length == 0) throw SnapshotterException.InvalidArgument($"filter {f}: missing value at {start}");
        return v;
    }

    private static string ReadQuoted(string f, ref int i)
    {
        var q = f[i++];
        var sb = new StringBuilder();
        while (i < f.Length && f[i] != q)
        {
            if (q == '"' && f[i] == '\\' && i + 1 < f.Length)
            {
                i++;
                sb.Append(f[i] switch { 'n' => '\n', 't' => '\t', 'r' => '\r', _ => f[i] });
                i++;
                continue;
            }
            sb.Append(f[i++]);
        }
        if (i >= f.Length) throw SnapshotterException.InvalidArgument($"filter {f}: unterminated quote");
        i++;
        return sb.ToString();
    }
}
