namespace Stargz.Fuse;

/// <summary>
/// The mount itself, apart from serving it: mount(2) or fusermount3 for a /dev/fuse fd, umount2, the bdi read-ahead,
/// and finding and clearing mounts whose server is gone.
/// </summary>
internal static class KernelMount
{
    /// <summary>Mounts a FUSE filesystem at <paramref name="mountPoint"/> and returns its /dev/fuse fd.</summary>
    public static int Mount(string mountPoint, FuseMountOptions opt)
    {
        // A server that crashed leaves "Transport endpoint is not connected" behind: clear it so a restart can remount.
        if (IsDeadMount(mountPoint)) CleanupDeadMount(mountPoint);
        if (!Directory.Exists(mountPoint)) throw new DirectoryNotFoundException(mountPoint);
        // Both end up inside a comma-separated option string.
        foreach (var v in new[] { opt.FsName, opt.Subtype ?? "" })
            if (v.AsSpan().IndexOfAny(", \t\n\\") >= 0) throw new ArgumentException($"'{v}' may not contain commas, blanks or backslashes");
        if (ViaFusermount(opt)) return Fusermount.Mount(mountPoint, FusermountOptions(opt));
        int fd = Native.Open("/dev/fuse", Native.O_RDWR | Native.O_CLOEXEC, 0);
        if (fd < 0) throw new IOException($"open /dev/fuse: errno {Native.LastErrno}");
        var data = $"fd={fd},rootmode=40000,user_id={Native.GetUid()},group_id={Native.GetGid()}" +
                   (opt.AllowOther ? ",allow_other" : "") + (opt.DefaultPermissions ? ",default_permissions" : "") +
                   $",max_read={opt.MaxReadBytes}";
        ulong flags = Native.MS_NOSUID | Native.MS_NODEV | (opt.ReadOnly ? Native.MS_RDONLY : 0);
        var type = opt.Subtype is { Length: > 0 } st ? "fuse." + st : "fuse";
        if (Native.Mount(opt.FsName, mountPoint, type, flags, data) != 0)
        {
            int e = Native.LastErrno;
            Native.Close(fd);
            throw new IOException($"mount {mountPoint}: errno {e}");
        }
        return fd;
    }

    /// <summary>Non-root mounts, and root ones that ask for it, go through fusermount3.</summary>
    private static bool ViaFusermount(FuseMountOptions opt) => opt.UseFusermount || Native.GetUid() != 0;

    private static string FusermountOptions(FuseMountOptions opt)
    {
        var s = $"rootmode=40000,user_id={Native.GetUid()},group_id={Native.GetGid()},fsname={opt.FsName},nosuid,nodev";
        if (opt.Subtype is { Length: > 0 }) s += ",subtype=" + opt.Subtype;
        if (opt.ReadOnly) s += ",ro";
        if (opt.AllowOther) s += ",allow_other";
        if (opt.DefaultPermissions) s += ",default_permissions";
        return s + $",max_read={opt.MaxReadBytes}";
    }

    /// <summary>See <see cref="FuseServer.Unmount"/>; waiting for the readers is the caller's.</summary>
    public static void Unmount(string mountPoint, FuseMountOptions opt, bool lazy)
    {
        if (ViaFusermount(opt))
        {
            Fusermount.Unmount(mountPoint, lazy);
        }
        else if (lazy)
        {
            Native.Umount2(mountPoint, Native.MNT_DETACH);
        }
        else if (Native.Umount2(mountPoint, 0) != 0 && Native.LastErrno == Native.EBUSY)
        {
            // fuse's umount_begin aborts the connection, which wakes every reader and every waiting caller.
            if (Native.Umount2(mountPoint, Native.MNT_FORCE) != 0)
                Native.Umount2(mountPoint, Native.MNT_DETACH);
        }
    }

    public static void SetReadAhead(string mountPoint, int kb, Action<string>? log)
    {
        var dev = MountInfo.Find(mountPoint)?.DeviceId;
        if (dev == null) return;
        try { File.WriteAllText($"/sys/class/bdi/{dev}/read_ahead_kb", kb.ToString()); }
        catch (IOException e) { log?.Invoke($"read_ahead_kb: {e.Message}"); }
        catch (UnauthorizedAccessException e) { log?.Invoke($"read_ahead_kb: {e.Message}"); }
    }

    /// <summary>See <see cref="FuseServer.IsDeadMount"/>.</summary>
    public static bool IsDeadMount(string path, TimeSpan? timeout = null)
    {
        if (timeout is not TimeSpan t) return Native.StatErrno(path) is Native.ENOTCONN or Native.ECONNABORTED;
        var probe = Task.Factory.StartNew(() => Native.StatErrno(path), CancellationToken.None,
            TaskCreationOptions.LongRunning, TaskScheduler.Default);
        if (!probe.Wait(t)) return true;
        return probe.Result is Native.ENOTCONN or Native.ECONNABORTED;
    }

    /// <summary>See <see cref="FuseServer.CleanupDeadMount"/>.</summary>
    public static bool CleanupDeadMount(string path, TimeSpan? timeout = null)
    {
        path = Path.GetFullPath(path);
        if (!IsDeadMount(path, timeout)) return false;
        if (Native.Umount2(path, Native.MNT_FORCE) == 0) return true;
        int e = Native.LastErrno;
        if (e == Native.EINVAL) return false; // not a mount point
        if (Native.Umount2(path, Native.MNT_DETACH) != 0)
            throw new IOException($"umount2 {path} (detach): errno {Native.LastErrno}");
        return true;
    }
}
