using Tomlyn;
using Tomlyn.Model;
using Tomlyn.Serialization;

namespace Stargz.Registry;

/// <summary>
/// Parses TOML into Tomlyn's untyped model. Source-generated so the native (AOT) daemon needs no reflection: the
/// daemon's config.toml and containerd's hosts.toml are both read as <see cref="TomlTable"/> trees and checked key by key.
/// </summary>
public static class TomlModel
{
    /// <summary>Parses <paramref name="toml"/>; throws <see cref="TomlException"/> when it is not valid TOML.</summary>
    public static TomlTable Parse(string toml) => TomlSerializer.Deserialize(toml, TomlModelContext.Default.TomlTable) ?? new TomlTable();
}

[TomlSerializable(typeof(TomlTable))]
internal sealed partial class TomlModelContext : TomlSerializerContext;
