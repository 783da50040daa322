using System.Security.Cryptography;
using System.Text;
using LiteDB;

namespace Stargz.Snapshotter;

/// <summary>
/// Snapshot metadata in one LiteDB file (root/metadata.db). Not thread-safe by itself: the snapshotter serialises
/// access and wraps every API call in one transaction (<see cref="InTransaction{T}"/>), with no await inside.
/// Labels are stored as an array of {k, v} so label keys with dots and slashes need no escaping.
/// <para>
/// Keys are opaque and may be as long as a request can carry, but LiteDB refuses index keys over 1023 bytes: the
/// indexed fields (nk, np) hold the namespaced key itself when it is short and a fixed-size hash of it when it is long
/// (<see cref="IndexKey"/>); the document keeps the key itself, and a lookup compares it.
/// </para>
/// </summary>
public sealed class MetaStore : IDisposable
{
    private readonly LiteDatabase _db;
    private readonly ILiteCollection<BsonDocument> _snaps;
    private readonly ILiteCollection<BsonDocument> _meta;
    private readonly string _path;
    private bool _wrote;

    /// <summary>
    /// The largest document LiteDB stores is about 16 MB; a bigger one (labels piled up by Update) is refused with
    /// ResourceExhausted before LiteDB fails on it.
    /// </summary>
    public const int MaxDocumentBytes = 16 * 1000 * 1000;

    /// <summary>Namespaced keys up to this many UTF-8 bytes are indexed as they are, longer ones by their hash.</summary>
    public const int MaxPlainIndexKeyBytes = 512;

    // Starts every hashed index key; a plain one never starts with it (such a key is hashed too), so the two never meet.
    private const string HashedPrefix = "\u0001sha256:";

    public MetaStore(string path)
    {
        _path = path;
        _db = new LiteDatabase(new ConnectionString { Filename = path, Connection = ConnectionType.Direct });
        _snaps = _db.GetCollection("snapshots", BsonAutoId.Int64);
        _snaps.EnsureIndex("nk", "$.nk", unique: true);
        _snaps.EnsureIndex("np", "$.np", unique: false);
        _meta = _db.GetCollection("meta");
        Reindex();
    }

    /// <summary>
    /// The indexed form of (namespace, key): the pair itself, or a fixed-size hash when it is too long for a LiteDB
    /// index key (or could be mistaken for a hash).
    /// </summary>
    public static string IndexKey(string ns, string key)
    {
        var nk = ns + "\u0000" + key;
        var fits = nk.Length <= MaxPlainIndexKeyBytes / 3
            || (nk.Length <= MaxPlainIndexKeyBytes && Encoding.UTF8.GetByteCount(nk) <= MaxPlainIndexKeyBytes);
        if (fits && !nk.StartsWith(HashedPrefix, StringComparison.Ordinal)) return nk;
        Span<byte> hash = stackalloc byte[SHA256.HashSizeInBytes];
        SHA256.HashData(Encoding.UTF8.GetBytes(nk), hash);
        return HashedPrefix + Convert.ToHexStringLower(hash);
    }

    private static string Nk(string ns, string key) => IndexKey(ns, key);

    /// <summary>
    /// Brings documents written before long keys were hashed to the current index form (one transaction, and only when
    /// one differs): every stored key fitted LiteDB's limit, but one between the plain limit and LiteDB's is hashed now.
    /// </summary>
    private void Reindex()
    {
        List<BsonDocument>? stale = null;
        foreach (var d in _snaps.FindAll())
        {
            var ns = d["ns"].AsString;
            var nk = Nk(ns, d["key"].AsString);
            var parent = d["parent"].AsString;
            var np = parent.Length == 0 ? BsonValue.Null : new BsonValue(Nk(ns, parent));
            if (d["nk"].AsString == nk && d["np"] == np) continue;
            d["nk"] = nk;
            d["np"] = np;
            (stale ??= []).Add(d);
        }
        if (stale == null) return;
        InTransaction(() =>
        {
            _wrote = true;
            foreach (var d in stale) _snaps.Update(d);
        });
    }

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
        // A hashed index key is compared with the key it stands for.
        if (d == null || d["key"].AsString != key || d["ns"].AsString != ns) return null;
        return FromDoc(d);
    }

    public bool HasChildren(string ns, string key) => _snaps.Exists(Query.EQ("np", Nk(ns, key)));

    public IEnumerable<SnapshotRecord> All() => _snaps.FindAll().Select(FromDoc).ToList();

    public IEnumerable<SnapshotRecord> InNamespace(string ns) => All().Where(r => r.Namespace == ns);

    public void Insert(SnapshotRecord r)
    {
        if (r.Id <= 0) throw new ArgumentException("record needs an id");
        _wrote = true;
        _snaps.Insert(Sized(ToDoc(r), r));
    }

    public void Update(SnapshotRecord r)
    {
        _wrote = true;
        if (!_snaps.Update(Sized(ToDoc(r), r))) throw SnapshotterException.NotFound($"snapshot {r.Key} (id {r.Id}) vanished from metadata");
    }

    public void Delete(SnapshotRecord r)
    {
        _wrote = true;
        _snaps.Delete(r.Id);
    }

    /// <summary>Refuses a document LiteDB could not store (see <see cref="MaxDocumentBytes"/>).</summary>
    private static BsonDocument Sized(BsonDocument d, SnapshotRecord r)
    {
        // Cheap bound first: UTF-16 lengths times three bound the UTF-8 size of every string in it.
        long bound = 256 + 3L * (r.Key.Length + r.Parent.Length + r.Namespace.Length) * 2;
        foreach (var kv in r.Labels) bound += 3L * (kv.Key.Length + kv.Value.Length) + 32;
        if (bound <= MaxDocumentBytes) return d;
        var size = BsonSerializer.Serialize(d).Length;
        if (size > MaxDocumentBytes)
            throw new SnapshotterException(SnapshotterErrorKind.ResourceExhausted,
                $"snapshot {KeyText.Short(r.Key)}: its metadata ({size} bytes: key, parent and {r.Labels.Count} labels) exceeds the store's limit of {MaxDocumentBytes} bytes");
        return d;
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
