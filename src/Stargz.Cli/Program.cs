namespace Stargz.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        Console.Error.WriteLine("usage: stargz blob build|toc|verify|extract ...");
        return 2;
    }
}
