namespace Stargz.Daemon;

public static class Program
{
    public static int Main(string[] args)
    {
        Console.Error.WriteLine("stargz-snapshotter: not implemented yet");
        return 2;
    }
}
