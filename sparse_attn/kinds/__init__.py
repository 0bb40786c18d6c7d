"""Pure functions of the sparse-attention families DSA is compared with:
Sparse Transformer patterns and sliding window (`patterns`), Reformer LSH
(`lsh`), NSA (`nsa`), MoBA (`moba`). Their layers are in sparse_attn.nn."""
