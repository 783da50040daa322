using LiteDB;

namespace Stargz.Snapshotter;

/// <summary>
/// Snapshot metadata in one LiteDB file (root/metadata.db). Not thread-safe by itself: the snapshotter serialises
/// access and wraps every API call in one transaction (<see cref="InTransaction{T}"/>), with no await inside.
/// Labels are stored as an array of {k, v} so label keys with dots and slashes need no escaping.
/// </summary>
public sealed class MetaStore : IDisposable
{
    private readonly LiteDatabase _db;
    private readonly ILiteCollection<BsonDocument> _snaps;
    private readonly ILiteCollection<BsonDocument> _meta;
    private readonly string _path;
    private bool _wrote;

    public MetaStore(string path)
    {
        _path = path;
        _db = new LiteDatabase(new ConnectionString { Filename = path, Connection = ConnectionType.Direct });
        _snaps = _db.GetCollection("snapshots", BsonAutoId.Int64);
        _snaps.EnsureIndex("nk", "$.nk", unique: true);
        _snaps.EnsureIndex("np", "$.np", unique: false);
        _meta = _db.GetCollection("meta");
    }

    private static string Nk(string ns, string key) => ns + "\u0000" + key;

    /// <summary>
    /// Runs <paramref name="body"/> in one transaction: commits when it returns, rolls back when it throws. A commit that
    /// wrote is made durable before returning: LiteDB 5 hands its log writes to the OS but never fsyncs them (a SIGKILL
    /// keeps them, a power loss may not), so a checkpoint folds the log into the data file and we fsync that file.
    /// </summary>
    public T InTransaction<T>(Func<T> body)
    {
        if (!_db.BeginTrans()) throw new InvalidOperationException("metadata transaction already open on this thread");
        _wrote = false;
        T r;
        try
        {
            r = body();
            if (!_db.Commit() && _wrote) throw new IOException("metadata commit failed");
        }
        catch
        {
            _db.Rollback();
            throw;
        }
        if (_wrote)
        {
            _db.Checkpoint();
            Native.FsyncFile(_path);
        }
        return r;
    }

    public void InTransaction(Action body) => InTransaction(() => { body(); return 0; });

    /// <summary>A monotonically increasing id, persisted in the same transaction as its user.</summary>
    public long NextId()
    {
        var doc = _meta.FindById("seq") ?? new BsonDocument { ["_id"] = "seq", ["v"] = 0L };
        var next = doc["v"].AsInt64 + 1;
        doc["v"] = next;
        _wrote = true;
        _meta.Upsert(doc);
        return next;
    }

    public SnapshotRecord? Get(string ns, string key)
    {
        var d = _snaps.FindOne(Query.EQ("nk", Nk(ns, key)));
        return d == null ? null : FromDoc(d);
    }

    public bool HasChildren(string ns, string key) => _snaps.Exists(Query.EQ("np", Nk(ns, key)));

    public IEnumerable<SnapshotRecord> All() => _snaps.FindAll().Select(FromDoc).ToList();

    public IEnumerable<SnapshotRecord> InNamespace(string ns) => All().Where(r => r.Namespace == ns);

    public void Insert(SnapshotRecord r)
    {
        if (r.Id <= 0) throw new ArgumentException("record needs an id");
        _wrote = true;
        _snaps.Insert(ToDoc(r));
    }

    public void Update(SnapshotRecord r)
    {
        _wrote = true;
        if (!_snaps.Update(ToDoc(r))) throw SnapshotterException.NotFound($"snapshot {r.Key} (id {r.Id}) vanished from metadata");
    }

    public void Delete(SnapshotRecord r)
    {
        _wrote = true;
        _snaps.Delete(r.Id);
    }

    private static BsonDocument ToDoc(SnapshotRecord r)
    {
        var labels = new BsonArray();
        foreach (var kv in r.Labels.OrderBy(k => k.Key, StringComparer.Ordinal))
            labels.Add(new BsonDocument { ["k"] = kv.Key, ["v"] = kv.Value });
        return new BsonDocument
        {
            ["_id"] = r.Id,
            ["ns"] = r.Namespace,
            ["key"] = r.Key,
            ["nk"] = Nk(r.Namespace, r.Key),
            ["parent"] = r.Parent,
            ["np"] = r.Parent.Length == 0 ? BsonValue.Null : new BsonValue(Nk(r.Namespace, r.Parent)),
            ["kind"] = (int)r.Kind,
            ["created"] = r.Created.Ticks,
            ["updated"] = r.Updated.Ticks,
            ["labels"] = labels,
            ["size"] = r.Size,
            ["inodes"] = r.Inodes,
        };
    }

    private static SnapshotRecord FromDoc(BsonDocument d)
    {
        var r = new SnapshotRecord
        {
            Id = d["_id"].AsInt64,
            Namespace = d["ns"].AsString,
            Key = d["key"].AsString,
            Parent = d["parent"].AsString,
            Kind = (SnapshotKind)d["kind"].AsInt32,
            Created = new DateTime(d["created"].AsInt64, DateTimeKind.Utc),
            Updated = new DateTime(d["updated"].AsInt64, DateTimeKind.Utc),
            Size = d["size"].AsInt64,
            Inodes = d["inodes"].AsInt64,
        };
        foreach (var l in d["labels"].AsArray) r.Labels[l["k"].AsString] = l["v"].AsString;
        return r;
    }

    public void Dispose() => _db.Dispose();
}
