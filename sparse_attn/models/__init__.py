"""Models built from the layers: the decoder-only Transformer and its cache."""

from sparse_attn.models.cache import Cache, cache_shardings
from sparse_attn.models.transformer import (
  INDEXER,
  MAIN,
  Block,
  Transformer,
  build_model,
  count_params,
)

__all__ = [
  "Block",
  "Cache",
  "INDEXER",
  "MAIN",
  "Transformer",
  "build_model",
  "cache_shardings",
  "count_params",
]
