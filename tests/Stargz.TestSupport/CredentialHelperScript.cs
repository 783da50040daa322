namespace Stargz.TestSupport;

/// <summary>A docker credential helper for tests: a real executable speaking the helper protocol, written as a shell script.</summary>
public static class CredentialHelperScript
{
    /// <summary>Writes an executable <c>docker-credential-NAME</c> with <paramref name="body"/> after a <c>#!/bin/sh</c> line.</summary>
    public static string Write(string dir, string name, string body)
    {
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, "docker-credential-" + name);
        File.WriteAllText(path, "#!/bin/sh\n" + body.Replace("\r", "") + "\n");
        File.SetUnixFileMode(path, (UnixFileMode)0b111_101_101);
        return path;
    }
}
