using System.Runtime.InteropServices;

namespace Stargz.Fuse;

/// <summary>Opcodes of the FUSE kernel protocol (include/uapi/linux/fuse.h).</summary>
internal enum Opcode : uint
{
    Lookup = 1, Forget = 2, GetAttr = 3, SetAttr = 4, ReadLink = 5, Symlink = 6, MkNod = 8, MkDir = 9,
    Unlink = 10, RmDir = 11, Rename = 12, Link = 13, Open = 14, Read = 15, Write = 16, StatFs = 17,
    Release = 18, FSync = 20, SetXattr = 21, GetXattr = 22, ListXattr = 23, RemoveXattr = 24, Flush = 25,
    Init = 26, OpenDir = 27, ReadDir = 28, ReleaseDir = 29, FSyncDir = 30, GetLk = 31, SetLk = 32,
    SetLkW = 33, Access = 34, Create = 35, Interrupt = 36, BMap = 37, Destroy = 38, Ioctl = 39, Poll = 40,
    NotifyReply = 41, BatchForget = 42, FAllocate = 43, ReadDirPlus = 44, Rename2 = 45, LSeek = 46,
    CopyFileRange = 47, SetupMapping = 48, RemoveMapping = 49, SyncFs = 50, TmpFile = 51, Statx = 52,
    MaxKnown = 64,
}

internal static class InitFlags
{
    public const ulong AsyncRead = 1UL << 0, AtomicOTrunc = 1UL << 3, ExportSupport = 1UL << 4, BigWrites = 1UL << 5,
        SpliceRead = 1UL << 9, AutoInvalData = 1UL << 12, DoReaddirplus = 1UL << 13, ReaddirplusAuto = 1UL << 14,
        AsyncDio = 1UL << 15, ParallelDirops = 1UL << 18, MaxPages = 1UL << 22, CacheSymlinks = 1UL << 23,
        InitExt = 1UL << 30, Passthrough = 1UL << 37, NoExportSupport = 1UL << 38,
        // 7.39 (Linux 6.6; named FUSE_DIRECT_IO_RELAX there, renamed in 6.7). Not in Debian 12's 7.38 header.
        DirectIoAllowMmap = 1UL << 36;
}

internal static class OpenFlags
{
    public const uint DirectIo = 1 << 0, KeepCache = 1 << 1, CacheDir = 1 << 3, Passthrough = 1 << 7;
}

[StructLayout(LayoutKind.Sequential)]
internal struct InHeader
{
    public uint Len; public uint Opcode; public ulong Unique; public ulong NodeId;
    public uint Uid; public uint Gid; public uint Pid; public ushort TotalExtLen; public ushort Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct OutHeader { public uint Len; public int Error; public ulong Unique; }

[StructLayout(LayoutKind.Sequential)]
internal struct InitIn
{
    public uint Major; public uint Minor; public uint MaxReadahead; public uint Flags; public uint Flags2;
}

[StructLayout(LayoutKind.Sequential)]
internal unsafe struct InitOut
{
    public uint Major; public uint Minor; public uint MaxReadahead; public uint Flags;
    public ushort MaxBackground; public ushort CongestionThreshold; public uint MaxWrite; public uint TimeGran;
    public ushort MaxPages; public ushort MapAlignment; public uint Flags2; public uint MaxStackDepth;
    public fixed uint Unused[6];
}

[StructLayout(LayoutKind.Sequential)]
internal struct EntryOut
{
    public ulong NodeId; public ulong Generation; public ulong EntryValid; public ulong AttrValid;
    public uint EntryValidNsec; public uint AttrValidNsec; public FuseAttr Attr;

    /// <summary>A lookup answer on the wire: the entry's own cache timeouts, else the mount's.</summary>
    public static EntryOut From(in FuseEntry e, FuseMountOptions opt)
    {
        var et = e.EntryTimeout ?? opt.EntryTimeout;
        var at = e.AttrTimeout ?? opt.AttrTimeout;
        var eo = new EntryOut
        {
            NodeId = e.Ino,
            Generation = e.Generation,
            EntryValid = (ulong)(et.Ticks / TimeSpan.TicksPerSecond),
            EntryValidNsec = (uint)(et.Ticks % TimeSpan.TicksPerSecond * 100),
            AttrValid = (ulong)(at.Ticks / TimeSpan.TicksPerSecond),
            AttrValidNsec = (uint)(at.Ticks % TimeSpan.TicksPerSecond * 100),
            Attr = e.Attr,
        };
        if (eo.Attr.Ino == 0) eo.Attr.Ino = e.Ino;
        if (eo.Attr.BlkSize == 0) eo.Attr.BlkSize = 4096;
        return eo;
    }
}

[StructLayout(LayoutKind.Sequential)]
internal struct AttrOut { public ulong AttrValid; public uint AttrValidNsec; public uint Dummy; public FuseAttr Attr; }

[StructLayout(LayoutKind.Sequential)]
internal struct OpenIn { public uint Flags; public uint OpenFlags; }

[StructLayout(LayoutKind.Sequential)]
internal struct OpenOut { public ulong Fh; public uint OpenFlags; public int BackingId; }

[StructLayout(LayoutKind.Sequential)]
internal struct ReadIn
{
    public ulong Fh; public ulong Offset; public uint Size; public uint ReadFlags; public ulong LockOwner;
    public uint Flags; public uint Padding;
}

[StructLayout(LayoutKind.Sequential)]
internal struct ReleaseIn { public ulong Fh; public uint Flags; public uint ReleaseFlags; public ulong LockOwner; }

[StructLayout(LayoutKind.Sequential)]
internal struct ForgetIn { public ulong NLookup; }

[StructLayout(LayoutKind.Sequential)]
internal struct BatchForgetIn { public uint Count; public uint Dummy; }

[StructLayout(LayoutKind.Sequential)]
internal struct ForgetOne { public ulong NodeId; public ulong NLookup; }

[StructLayout(LayoutKind.Sequential)]
internal struct GetXattrIn { public uint Size; public uint Padding; }

[StructLayout(LayoutKind.Sequential)]
internal struct GetXattrOut { public uint Size; public uint Padding; }

[StructLayout(LayoutKind.Sequential)]
internal struct InterruptIn { public ulong Unique; }

[StructLayout(LayoutKind.Sequential)]
internal struct AccessIn { public uint Mask; public uint Padding; }

[StructLayout(LayoutKind.Sequential)]
internal struct LSeekIn { public ulong Fh; public ulong Offset; public uint Whence; public uint Padding; }

[StructLayout(LayoutKind.Sequential)]
internal struct LSeekOut { public ulong Offset; }

[StructLayout(LayoutKind.Sequential)]
internal struct KStatFs
{
    public ulong Blocks; public ulong BFree; public ulong BAvail; public ulong Files; public ulong FFree;
    public uint BSize; public uint NameLen; public uint FrSize; public uint Padding;
    public ulong Spare0; public ulong Spare1; public ulong Spare2;
}

[StructLayout(LayoutKind.Sequential)]
internal struct DirentHeader { public ulong Ino; public ulong Off; public uint NameLen; public uint Type; }

[StructLayout(LayoutKind.Sequential)]
internal struct BackingMap { public int Fd; public uint Flags; public ulong Padding; }
