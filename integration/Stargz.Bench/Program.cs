namespace Stargz.Bench;

public static class Program
{
    public static int Main(string[] args)
    {
        Console.Error.WriteLine("usage: Stargz.Bench estargz|fuse ...");
        return 2;
    }
}
