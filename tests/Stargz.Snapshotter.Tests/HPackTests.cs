using System.Text;

namespace Stargz.Snapshotter.Tests;

/// <summary>HPACK decoding against the examples of RFC 7541 Appendix C (header blocks in sequence sharing one table).</summary>
public class HPackTests
{
    private static byte[] Hex(string s) => Convert.FromHexString(s.Replace(" ", ""));

    private static string[] Decode(HPackDecoder d, string hex)
    {
        var fields = new List<HeaderField>();
        Assert.True(d.TryDecode(Hex(hex), fields));
        return fields.Select(f => Encoding.ASCII.GetString(f.Name) + ": " + Encoding.ASCII.GetString(f.Value)).ToArray();
    }

    [Theory]
    // C.3: plain literals; C.4: the same requests Huffman-coded.
    [InlineData(false)]
    [InlineData(true)]
    public void RequestsShareTheDynamicTable(bool huffman)
    {
        string[] blocks = huffman
            ? ["8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", "8286 84be 5886 a8eb 1064 9cbf",
               "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"]
            : ["8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", "8286 84be 5808 6e6f 2d63 6163 6865",
               "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"];
        var d = new HPackDecoder(4096);
        Assert.Equal([":method: GET", ":scheme: http", ":path: /", ":authority: www.example.com"], Decode(d, blocks[0]));
        Assert.Equal((1, 57), (d.TableCount, d.TableSize));
        Assert.Equal([":method: GET", ":scheme: http", ":path: /", ":authority: www.example.com", "cache-control: no-cache"], Decode(d, blocks[1]));
        Assert.Equal((2, 110), (d.TableCount, d.TableSize));
        Assert.Equal([":method: GET", ":scheme: https", ":path: /index.html", ":authority: www.example.com", "custom-key: custom-value"],
            Decode(d, blocks[2]));
        Assert.Equal((3, 164), (d.TableCount, d.TableSize));
    }

    [Fact]
    public void A256ByteTableEvictsTheOldestEntries()
    {
        // C.6: responses, Huffman-coded, table limited to 256 bytes.
        var d = new HPackDecoder(256);
        Assert.Equal([":status: 302", "cache-control: private", "date: Mon, 21 Oct 2013 20:13:21 GMT", "location: https://www.example.com"],
            Decode(d, "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3"));
        Assert.Equal((4, 222), (d.TableCount, d.TableSize));
        Assert.Equal([":status: 307", "cache-control: private", "date: Mon, 21 Oct 2013 20:13:21 GMT", "location: https://www.example.com"],
            Decode(d, "4883 640e ff c1c0 bf"));
        Assert.Equal((4, 222), (d.TableCount, d.TableSize));
        Assert.Equal([":status: 200", "cache-control: private", "date: Mon, 21 Oct 2013 20:13:22 GMT", "location: https://www.example.com",
                "content-encoding: gzip", "set-cookie: foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"],
            Decode(d, "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07"));
        Assert.Equal((3, 215), (d.TableCount, d.TableSize));
    }

    [Theory]
    [InlineData("be")]                 // dynamic index 62 with an empty table
    [InlineData("80")]                 // index 0
    [InlineData("4108 f1e3")]          // string longer than the block
    [InlineData("4181 18")]            // Huffman "a" (00011) padded with zeros instead of ones
    [InlineData("418d f1e3 c2e5 f23a 6ba0 ab90 f4ff ff")] // Huffman padding of 8 bits or more
    [InlineData("82 3f e1 1f")]        // table size update after a field
    [InlineData("3f e2 1f")]           // table size update above the advertised 4096
    [InlineData("41")]                 // literal cut short
    [InlineData("ff ff ff ff ff 0f")]  // index past 2^28
    public void MalformedBlocksAreRefused(string hex)
        => Assert.False(new HPackDecoder(4096).TryDecode(Hex(hex), []));

    [Fact]
    public void HuffmanPaddingOfOnesIsAccepted()
        => Assert.Equal([":authority: a"], Decode(new HPackDecoder(4096), "4181 1f"));

    [Fact]
    public void ATableSizeUpdateFirstShrinksTheTable()
    {
        var d = new HPackDecoder(4096);
        Decode(d, "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d");
        Assert.Equal(1, d.TableCount);
        Assert.Equal([":method: GET"], Decode(d, "20 82")); // size 0: everything evicted
        Assert.Equal((0, 0), (d.TableCount, d.TableSize));
        Assert.False(d.TryDecode(Hex("be"), []));
    }

    [Fact]
    public void LiteralsWrittenBackDecodeToTheSameFieldsWithoutTouchingTheTable()
    {
        var fields = new List<HeaderField>();
        Assert.True(new HPackDecoder(4096).TryDecode(Hex("8287 85 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf 1003 6b65 7903 7365 63"), fields));
        Assert.True(fields[^1].NeverIndexed);
        var w = new System.Buffers.ArrayBufferWriter<byte>();
        foreach (var f in fields) HPackLiteralEncoder.Write(w, f);
        var d = new HPackDecoder(4096);
        var again = new List<HeaderField>();
        Assert.True(d.TryDecode(w.WrittenSpan, again));
        Assert.Equal(fields.Select(f => (Encoding.ASCII.GetString(f.Name), Encoding.ASCII.GetString(f.Value), f.NeverIndexed)),
            again.Select(f => (Encoding.ASCII.GetString(f.Name), Encoding.ASCII.GetString(f.Value), f.NeverIndexed)));
        Assert.Equal(0, d.TableCount);
    }

    [Theory]
    [InlineData(10, 5)]
    [InlineData(31, 5)]     // exactly the prefix: continuation byte 0
    [InlineData(1337, 5)]   // RFC 7541 C.1.2
    [InlineData(300000, 7)]
    public void IntegersRoundTrip(int value, int prefix)
    {
        var w = new System.Buffers.ArrayBufferWriter<byte>();
        HPackLiteralEncoder.WriteInt(w, 0, prefix, value);
        if (value == 1337) Assert.Equal(Hex("1f9a0a"), w.WrittenSpan.ToArray());
        int i = 0;
        Assert.True(HPackDecoder.TryReadInt(w.WrittenSpan, ref i, prefix, out int back));
        Assert.Equal((value, w.WrittenCount), (back, i));
    }
}
