"""Pure functions of DSA (no Flax): masking, chunking, RoPE, attention,
the lightning indexer's scores and top-k, the losses, index-key
quantisation, and kernel calls under a mesh. Shapes and conventions:
docs/api.md."""
