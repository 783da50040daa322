using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Stargz.Daemon;

namespace Stargz.Daemon.Tests;

public class JsonLineLoggingTests
{
    private static (JsonLineLoggerFactory Factory, MemoryStream Output) Create(LogLevel level)
    {
        var output = new MemoryStream();
        return (new JsonLineLoggerFactory(level, output), output);
    }

    private static List<JsonElement> Lines(MemoryStream output)
    {
        var text = Encoding.UTF8.GetString(output.ToArray());
        Assert.EndsWith("\n", text);
        var lines = new List<JsonElement>();
        foreach (var line in text.TrimEnd('\n').Split('\n'))
            lines.Add(JsonDocument.Parse(line).RootElement.Clone());
        return lines;
    }

    [Fact]
    public void AStructuredMessageIsOneJsonLineWithItsFieldsInState()
    {
        var (factory, output) = Create(LogLevel.Information);
        var digest = "sha256:" + new string('a', 64);
        factory.CreateLogger("stargz.layer").LogWarning("layer {Digest} falls back: {Error} after {Tries} tries", digest, "TOC \"bad\"\nline 2", 3);

        var line = Assert.Single(Lines(output));
        Assert.Equal("Warning", line.GetProperty("LogLevel").GetString());
        Assert.Equal("stargz.layer", line.GetProperty("Category").GetString());
        Assert.Equal($"layer {digest} falls back: TOC \"bad\"\nline 2 after 3 tries", line.GetProperty("Message").GetString());
        var state = line.GetProperty("State");
        Assert.Equal(digest, state.GetProperty("Digest").GetString());
        Assert.Equal(3, state.GetProperty("Tries").GetInt32());
        Assert.Equal("layer {Digest} falls back: {Error} after {Tries} tries", state.GetProperty("{OriginalFormat}").GetString());
        Assert.True(DateTime.TryParse(line.GetProperty("Timestamp").GetString(), out _));
    }

    [Fact]
    public void ExceptionsAreWrittenWithTheirMessage()
    {
        var (factory, output) = Create(LogLevel.Information);
        factory.CreateLogger("x").LogError(new IOException("disk on fire"), "write failed for {Key}", "k1");
        var line = Assert.Single(Lines(output));
        Assert.Contains("disk on fire", line.GetProperty("Exception").GetString());
        Assert.Equal("write failed for k1", line.GetProperty("Message").GetString());
    }

    [Fact]
    public void LevelsFilterByCategory()
    {
        var (factory, output) = Create(LogLevel.Information);
        factory.CreateLogger("stargz.layer").LogDebug("hidden at info");
        factory.CreateLogger("stargz.layer").LogInformation("shown");
        factory.CreateLogger("Microsoft.AspNetCore.Hosting").LogInformation("framework chatter hidden");
        factory.CreateLogger("Microsoft.AspNetCore.Hosting").LogWarning("framework warning shown");
        factory.CreateLogger("Grpc.AspNetCore.Server").LogInformation("grpc chatter hidden");
        var messages = Lines(output).Select(l => l.GetProperty("Message").GetString()).ToList();
        Assert.Equal(["shown", "framework warning shown"], messages);

        var (debug, _) = Create(LogLevel.Debug);
        Assert.True(debug.CreateLogger("stargz.layer").IsEnabled(LogLevel.Debug));
        Assert.True(debug.CreateLogger("Microsoft.AspNetCore.Hosting").IsEnabled(LogLevel.Information));
        Assert.False(debug.CreateLogger("Microsoft.AspNetCore.Hosting").IsEnabled(LogLevel.Debug));
        Assert.False(debug.CreateLogger("Grpc.Net").IsEnabled(LogLevel.Information));
        var (errorOnly, _) = Create(LogLevel.Error);
        Assert.False(errorOnly.CreateLogger("Microsoft.AspNetCore.Hosting").IsEnabled(LogLevel.Warning));
    }

    [Fact]
    public void ConcurrentWritersNeverInterleaveWithinALine()
    {
        var (factory, output) = Create(LogLevel.Information);
        var logger = factory.CreateLogger("stargz.fuse");
        Parallel.For(0, 400, i => logger.LogInformation("read {Index} of {Payload}", i, new string('x', 2000)));
        var lines = Lines(output);
        Assert.Equal(400, lines.Count);
        Assert.Equal(400, lines.Select(l => l.GetProperty("State").GetProperty("Index").GetInt32()).Distinct().Count());
    }
}
