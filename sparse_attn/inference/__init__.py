"""Decoding: the host-side driver (chunked prefill, decode steps, generation).

The cache lives in the layers (`AttentionLayer.init_cache`) and the model's
one forward serves decoding (`Transformer.__call__(tokens, cache=...)`);
this package drives it from the host.
"""

from sparse_attn.inference.decoder import (
  Decoder,
  Generation,
  cache_shapes,
  generate,
  init_cache,
)
from sparse_attn.inference.sampling import sample_logits
from sparse_attn.models.cache import Cache, cache_shardings
from sparse_attn.ops.quantize import (
  INDEX_DTYPES,
  dequantize_index_keys,
  quantize_index_keys,
)

__all__ = [
  "Cache",
  "Decoder",
  "Generation",
  "INDEX_DTYPES",
  "cache_shapes",
  "cache_shardings",
  "dequantize_index_keys",
  "generate",
  "init_cache",
  "quantize_index_keys",
  "sample_logits",
]
