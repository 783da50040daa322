global using LayerChunk = Stargz.Estargz.ChunkInfo;
