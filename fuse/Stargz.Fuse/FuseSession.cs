using Stargz.Fuse.Handover;

namespace Stargz.Fuse;

/// <summary>
/// What INIT agreed with the kernel for one connection: the protocol minor, the features both sides use and the
/// request sizes. Kept apart from the connection's fds and threads, so the agreement is one value to read (and,
/// later, to carry over when a restarted server adopts an existing connection).
/// </summary>
internal sealed class FuseSession(FuseMountOptions opt)
{
    /// <summary>The newest minor we speak: 7.40 adds backing_id and max_stack_depth (passthrough).</summary>
    public const uint OurMinor = 40;
    /// <summary>Largest WRITE we accept (writes are refused anyway; small keeps request buffers small).</summary>
    public const int MaxWrite = 32 * 1024;
    /// <summary>One request must fit: header + write header + max_write, and never below the kernel's 8 KiB minimum.</summary>
    public const int RequestBufferSize = MaxWrite + 8192;

    private readonly TaskCompletionSource _agreed = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>Largest READ, from the options (INIT announces it as max_pages), or as an adopted connection agreed.</summary>
    public int MaxRead { get; private set; } = opt.MaxReadBytes;
    public uint ProtocolMinor { get; private set; }
    public bool Passthrough { get; private set; }
    public bool DirectIoAllowMmap { get; private set; }
    /// <summary>Completes when INIT is answered; faults when the kernel's protocol is refused or the connection ends first.</summary>
    public Task Agreed => _agreed.Task;

    public enum Outcome { Accepted, AskAgain, Refused }

    /// <summary>
    /// Answers the kernel's INIT. <see cref="Outcome.Accepted"/>: <paramref name="reply"/> is the full answer and
    /// this session holds what was agreed. <see cref="Outcome.AskAgain"/>: a newer major; send the first 8 bytes of
    /// <paramref name="reply"/> and the kernel sends INIT again with ours. <see cref="Outcome.Refused"/>: too old;
    /// answer EPROTO.
    /// </summary>
    public Outcome Negotiate(in InitIn init, out InitOut reply)
    {
        if (init.Major != 7 || init.Minor < 31)
        {
            // Newer majors re-send INIT after our answer; older minors lack what we rely on.
            reply = new InitOut { Major = 7, Minor = OurMinor };
            return init.Major > 7 ? Outcome.AskAgain : Outcome.Refused;
        }
        ulong kernelFlags = init.Flags;
        if ((kernelFlags & InitFlags.InitExt) != 0) kernelFlags |= (ulong)init.Flags2 << 32;
        // Readdirplus always (not "auto"): listings of a layer are almost always followed by stats of every entry.
        ulong want = InitFlags.AsyncRead | InitFlags.BigWrites | InitFlags.DoReaddirplus |
                     InitFlags.ParallelDirops | InitFlags.MaxPages | InitFlags.CacheSymlinks | InitFlags.AsyncDio |
                     InitFlags.InitExt | InitFlags.NoExportSupport;
        uint minor = Math.Min(init.Minor, OurMinor);
        if (opt.Passthrough && minor >= 40) want |= InitFlags.Passthrough;
        if (opt.DirectIoAllowMmap && minor >= 39) want |= InitFlags.DirectIoAllowMmap;
        ulong flags = kernelFlags & want;
        reply = new InitOut
        {
            Major = 7,
            Minor = minor,
            MaxReadahead = init.MaxReadahead,
            Flags = (uint)flags,
            Flags2 = (uint)(flags >> 32),
            MaxBackground = 64,
            CongestionThreshold = 48,
            MaxWrite = MaxWrite,
            TimeGran = 1,
            MaxPages = (ushort)(MaxRead / 4096),
            // Backing files live on ordinary filesystems (depth 0); depth 1 leaves room for overlayfs on top of us.
            MaxStackDepth = (flags & InitFlags.Passthrough) != 0 ? 1u : 0u,
        };
        ProtocolMinor = minor;
        Passthrough = (flags & InitFlags.Passthrough) != 0;
        DirectIoAllowMmap = (flags & InitFlags.DirectIoAllowMmap) != 0;
        if (opt.Passthrough && !Passthrough)
            opt.Log?.Invoke($"kernel did not accept FUSE passthrough (protocol 7.{init.Minor}); reads go through user space");
        if (opt.DirectIoAllowMmap && !DirectIoAllowMmap)
            opt.Log?.Invoke($"kernel did not accept FUSE_DIRECT_IO_ALLOW_MMAP (protocol 7.{init.Minor}); shared mmap of direct-I/O files fails with ENODEV");
        return Outcome.Accepted;
    }

    /// <summary>What was agreed, to store beside the connection's fds.</summary>
    public FuseAgreement Agreement => new(ProtocolMinor, Passthrough, DirectIoAllowMmap, MaxRead);

    /// <summary>
    /// Takes over what an earlier server agreed on this connection: the kernel sends INIT once per connection, so an
    /// adopting server answers with the sizes and features the kernel already holds.
    /// </summary>
    public void Restore(FuseAgreement a)
    {
        ProtocolMinor = a.ProtocolMinor;
        Passthrough = a.Passthrough;
        DirectIoAllowMmap = a.DirectIoAllowMmap;
        MaxRead = a.MaxRead;
        _agreed.TrySetResult();
    }

    /// <summary>INIT's answer has been sent: the connection is ready.</summary>
    public void Answered() => _agreed.TrySetResult();

    /// <summary>INIT was refused (<see cref="Outcome.Refused"/>) and the kernel told so.</summary>
    public void Refuse(in InitIn init) =>
        _agreed.TrySetException(new IOException($"kernel FUSE protocol {init.Major}.{init.Minor} is too old (need 7.31)"));

    /// <summary>The connection ended before INIT.</summary>
    public void Ended() => _agreed.TrySetException(new IOException("FUSE connection ended before INIT"));
}
