"""Task families: what a batch is, what models output, how outputs are scored."""
