using System.Net;

namespace Stargz.Registry;

/// <summary>Base of every failure the registry client reports. Carries what it was about.</summary>
public class RegistryException : Exception
{
    /// <summary>HTTP status when the registry answered, null for transport failures.</summary>
    public HttpStatusCode? StatusCode { get; }
    /// <summary>Registry host (host[:port]) the failure is about, if known.</summary>
    public string? Host { get; }
    /// <summary>Image reference or blob digest the failure is about, if known.</summary>
    public string? Subject { get; }

    public RegistryException(string message, HttpStatusCode? status = null, string? host = null, string? subject = null,
        Exception? inner = null) : base(message, inner)
    {
        StatusCode = status;
        Host = host;
        Subject = subject;
    }
}

/// <summary>The registry answered 404 for a manifest, tag or blob.</summary>
public sealed class NotFoundException : RegistryException
{
    public NotFoundException(string message, string? host, string? subject)
        : base(message, HttpStatusCode.NotFound, host, subject) { }
}

/// <summary>The registry refused our credentials (401/403) or none were available for its challenge.</summary>
public sealed class UnauthorizedException : RegistryException
{
    public UnauthorizedException(string message, HttpStatusCode status, string? host, string? subject)
        : base(message, status, host, subject) { }
}

/// <summary>A string that is not a valid image reference.</summary>
public sealed class InvalidReferenceException : FormatException
{
    public string Input { get; }
    public InvalidReferenceException(string input, string why)
        : base($"invalid image reference \"{input}\": {why}") => Input = input;
}

/// <summary>Bytes received do not match the digest or size they were asked for.</summary>
public sealed class DigestMismatchException : RegistryException
{
    public DigestMismatchException(string message, string? host, string? subject)
        : base(message, null, host, subject) { }
}

/// <summary>A failure worth retrying (5xx, 429, a short body); surfaces as <see cref="RegistryException"/> when retries run out.</summary>
public sealed class TransientRegistryException(string message, HttpStatusCode? status, string? host, string? subject, TimeSpan? retryAfter = null)
    : RegistryException(message, status, host, subject)
{
    public TimeSpan? RetryAfter { get; } = retryAfter;
}
