using System.Formats.Tar;
using System.Security.Cryptography;
using System.Text;

namespace Stargz.Estargz.Tests;

/// <summary>An in-memory file tree used as the "original" that blobs are compared against.</summary>
public sealed class ModelEntry
{
    public required string Path;          // clean, no leading "./" or trailing "/"
    public required TarEntryType Type;
    public byte[] Content = [];
    public UnixFileMode Mode = (UnixFileMode)0x1a4;
    public int Uid, Gid;
    public string? UserName, GroupName;
    public DateTimeOffset MTime = DateTimeOffset.FromUnixTimeSeconds(1_600_000_000);
    public string? Link;
    public int DevMajor, DevMinor;
    public Dictionary<string, string>? Xattrs;
}

public static class TreeModel
{
    /// <summary>A random tree: nested dirs, files of assorted sizes around <paramref name="chunkSize"/>, symlinks,
    /// hardlinks, fifos, char devices, xattrs, long and non-ASCII names, assorted owners, modes and times.</summary>
    public static List<ModelEntry> Random(Random rng, int chunkSize, int files = 30)
    {
        var list = new List<ModelEntry>();
        var dirs = new List<string> { "" };
        int nd = rng.Next(1, 8);
        for (int i = 0; i < nd; i++)
        {
            var parent = dirs[rng.Next(dirs.Count)];
            var name = Join(parent, rng.Next(5) == 0 ? $"dír-{i}-ü" : $"d{i}");
            dirs.Add(name);
            list.Add(new ModelEntry { Path = name, Type = TarEntryType.Directory, Mode = (UnixFileMode)(rng.Next(2) == 0 ? 0x1ed : 0x1c0), MTime = Time(rng), Uid = rng.Next(3) * 1000, Gid = rng.Next(3) * 100 });
        }
        var regs = new List<ModelEntry>();
        for (int i = 0; i < files; i++)
        {
            var parent = dirs[rng.Next(dirs.Count)];
            string baseName = rng.Next(8) == 0 ? new string('L', 120) + i : rng.Next(10) == 0 ? $"fïlé-{i}.txt" : $"f{i}";
            var path = Join(parent, baseName);
            int kind = rng.Next(20);
            if (kind < 13 || regs.Count == 0)
            {
                int size = rng.Next(6) switch
                {
                    0 => 0,
                    1 => rng.Next(1, 100),
                    2 => chunkSize,
                    3 => chunkSize * rng.Next(2, 4) + rng.Next(-1, 2),
                    4 => rng.Next(1, chunkSize * 3),
                    _ => rng.Next(1, 5000),
                };
                var content = new byte[Math.Max(0, size)];
                if (rng.Next(3) == 0) Array.Fill(content, (byte)'a'); else rng.NextBytes(content);
                var e = new ModelEntry
                {
                    Path = path, Type = TarEntryType.RegularFile, Content = content, MTime = Time(rng),
                    Mode = (UnixFileMode)(rng.Next(4) switch { 0 => 0x1ed, 1 => 0x124, 2 => 0x9ed /*04755*/, _ => 0x1a4 }),
                    Uid = rng.Next(3) * 1000, Gid = rng.Next(3) * 100,
                };
                if (rng.Next(4) == 0) e.Xattrs = new() { ["user.k" + rng.Next(3)] = "v" + rng.Next(1000) };
                list.Add(e);
                regs.Add(e);
            }
            else if (kind < 16)
                list.Add(new ModelEntry { Path = path, Type = TarEntryType.SymbolicLink, Link = rng.Next(2) == 0 ? regs[rng.Next(regs.Count)].Path : "../nowhere/" + i, Mode = (UnixFileMode)0x1ff, MTime = Time(rng) });
            else if (kind < 18)
                list.Add(new ModelEntry { Path = path, Type = TarEntryType.HardLink, Link = regs[rng.Next(regs.Count)].Path, MTime = Time(rng) });
            else if (kind < 19)
                list.Add(new ModelEntry { Path = path, Type = TarEntryType.Fifo, Mode = (UnixFileMode)0x1a4, MTime = Time(rng) });
            else
                list.Add(new ModelEntry { Path = path, Type = TarEntryType.CharacterDevice, DevMajor = rng.Next(1, 300), DevMinor = rng.Next(0, 70000), Mode = (UnixFileMode)0x1b6, MTime = Time(rng) });
        }
        // Whiteouts as stored in an upper layer.
        if (rng.Next(3) == 0) list.Add(new ModelEntry { Path = Join(dirs[rng.Next(dirs.Count)], ".wh.gone"), Type = TarEntryType.RegularFile });
        // Later entries of the same name replace earlier ones; keep names unique here.
        var seen = new HashSet<string>();
        list.RemoveAll(e => !seen.Add(e.Path));
        // Hardlinks must point at a surviving regular file.
        list.RemoveAll(e => e.Type == TarEntryType.HardLink && !list.Exists(r => r.Path == e.Link && r.Type == TarEntryType.RegularFile));
        return list;
    }

    private static DateTimeOffset Time(Random rng) => DateTimeOffset.FromUnixTimeSeconds(rng.NextInt64(1, 2_000_000_000));

    private static string Join(string parent, string name) => parent.Length == 0 ? name : parent + "/" + name;

    /// <summary>Writes the model as a PAX tar (dirs with a trailing "/", as tar does).</summary>
    public static byte[] ToTar(IEnumerable<ModelEntry> entries, bool dotSlash = false)
    {
        var ms = new MemoryStream();
        using (var w = new TarWriter(ms, TarEntryFormat.Pax, leaveOpen: true))
        {
            foreach (var m in entries)
            {
                var name = (dotSlash ? "./" : "") + m.Path + (m.Type == TarEntryType.Directory ? "/" : "");
                var ext = new Dictionary<string, string>();
                if (m.Xattrs != null) foreach (var kv in m.Xattrs) ext["SCHILY.xattr." + kv.Key] = kv.Value;
                var e = new PaxTarEntry(m.Type, name, ext)
                {
                    Mode = m.Mode, Uid = m.Uid, Gid = m.Gid, ModificationTime = m.MTime,
                    UserName = m.UserName ?? (m.Uid == 0 ? "root" : ""), GroupName = m.GroupName ?? "",
                };
                if (m.Link != null) e.LinkName = m.Link;
                if (m.Type is TarEntryType.CharacterDevice or TarEntryType.BlockDevice) { e.DeviceMajor = m.DevMajor; e.DeviceMinor = m.DevMinor; }
                if (m.Type == TarEntryType.RegularFile) e.DataStream = new MemoryStream(m.Content);
                w.WriteEntry(e);
            }
        }
        return ms.ToArray();
    }

    public static string Sha256(ReadOnlySpan<byte> data) => "sha256:" + Convert.ToHexStringLower(SHA256.HashData(data));

    public static string Utf8(byte[] b) => Encoding.UTF8.GetString(b);
}
