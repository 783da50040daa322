namespace Stargz.TestSupport;

/// <summary>A scratch directory removed on dispose (best effort: a test's own mounts must be gone first).</summary>
public sealed class TempDir : IDisposable
{
    public string Path { get; }

    public TempDir(string prefix = "stargz-test")
    {
        var root = Environment.GetEnvironmentVariable("STARGZ_TEST_TMP") ?? System.IO.Path.GetTempPath();
        Path = System.IO.Path.Combine(root, $"{prefix}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(Path);
    }

    public string Sub(string name)
    {
        var p = System.IO.Path.Combine(Path, name);
        Directory.CreateDirectory(p);
        return p;
    }

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }
}
