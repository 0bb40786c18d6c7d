"""IndexCache as a kind: DSA whose layers share top-k selections (Bai et al. 2026).

The layer is DSA's (`sparse_attn.nn.dsa.DSAAttention`) with the
cross-layer reuse on: one layer in `indexer_every` (from layer 0) keeps its
lightning indexer, each of the others attends the keys the nearest
preceding full layer selected and has no indexer or indexer key cache
(`sparse_attn.nn.index_share`). `indexer_layers` sets the full layers
explicitly (e.g. the result of the training-free greedy search,
`sparse_attn.training.index_share.greedy_index_share`), and
`index_share_distill` (default on) trains each full indexer against the
attention of every layer it serves (the multi-layer distillation loss).
The same options exist on `dsa` and `mla_dsa`, off by default.

The default, one indexer every 2 layers, suits the CPU experiments'
2-layer models; the IndexCache paper's fixed pattern keeps one in 4.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attn.nn.dsa import DSAAttention, DSAParams, dsa_kind


@dataclasses.dataclass(frozen=True)
class IndexCacheParams(DSAParams):
  """DSA's parameters (`DSAParams`) with one indexer every 2 layers."""

  indexer_every: int = 2


class IndexCacheAttention(DSAAttention):
  """DSA with top-k reuse across layers (no context parallelism: a reusing
  layer's gathered attention runs on the whole sequence)."""

  supports_context_parallel = False

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    indexer_every: int = IndexCacheParams.indexer_every,
    **kw: Any,
  ):
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      indexer_every=indexer_every,
      **kw,
    )


KIND = dsa_kind(
  "indexcache",
  IndexCacheAttention,
  IndexCacheParams,
  "Bai et al. 2026 (IndexCache), arXiv:2603.12201",
)
