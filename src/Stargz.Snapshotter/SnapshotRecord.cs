using Stargz.Estargz;

namespace Stargz.Snapshotter;

public enum SnapshotKind { Unknown = 0, View = 1, Active = 2, Committed = 3 }

/// <summary>One snapshot as the metadata store holds it. <see cref="Key"/> is the name within its namespace.</summary>
public sealed class SnapshotRecord
{
    public long Id { get; set; }
    public string Namespace { get; set; } = "";
    public string Key { get; set; } = "";
    public string Parent { get; set; } = "";
    public SnapshotKind Kind { get; set; }
    public DateTime Created { get; set; }
    public DateTime Updated { get; set; }
    public Dictionary<string, string> Labels { get; set; } = new(StringComparer.Ordinal);
    public long Size { get; set; }
    public long Inodes { get; set; }

    public bool IsRemote => Labels.TryGetValue(SnapshotLabels.RemoteSnapshot, out var v) && v == SnapshotLabels.RemoteSnapshotValue;

    public SnapshotRecord Clone() => new()
    {
        Id = Id, Namespace = Namespace, Key = Key, Parent = Parent, Kind = Kind, Created = Created, Updated = Updated,
        Labels = new Dictionary<string, string>(Labels, StringComparer.Ordinal), Size = Size, Inodes = Inodes,
    };
}
