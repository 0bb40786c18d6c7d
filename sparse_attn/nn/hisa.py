"""HISA as a kind: DSA whose top-k stage is hierarchical (Xu et al. 2026).

The layer is DSA's (`sparse_attn.nn.dsa.DSAAttention`: the same indexer,
stages, losses and indexer key cache) with `hisa_block_size` set, so the
sparse stage selects with `sparse_attn.ops.hisa.hisa_topk`: mean-pooled
key blocks scored by the indexer (the paper's eqs. 4-5), the first and
the query's own block always kept, then token-level top-k inside the kept
blocks. The parameters are DSA's, so a DSA checkpoint runs as HISA
unchanged (the paper's training-free swap); the same option exists on
`dsa` and `mla_dsa` (`hisa_block_size`, `hisa_blocks`).

Defaults are sized for the CPU experiments (blocks of 16 keys, 8 kept);
the paper's are 128 and 64 with top-k 2048 (`ops.hisa.PAPER_BLOCK_SIZE`,
`PAPER_NUM_BLOCKS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attn.nn.dsa import DSAAttention, DSAParams, dsa_kind


@dataclasses.dataclass(frozen=True)
class HISAParams(DSAParams):
  """DSA's parameters with HISA's top-k on (`DSAParams`): hisa_block_size
  keys per block (B_s), hisa_blocks blocks kept per query (m >= 2)."""

  hisa_block_size: int | None = 16
  hisa_blocks: int = 8

  def __post_init__(self):
    if self.hisa_block_size is None:
      raise ValueError(
        "attention kind 'hisa' needs hisa_block_size (an int >= 1); the "
        "flat top-k is attention='dsa'."
      )
    super().__post_init__()


class HISAAttention(DSAAttention):
  """DSA with HISA's hierarchical top-k (whole sequences: no context
  parallelism, the block scan needs every block on one device)."""

  supports_context_parallel = False

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    hisa_block_size: int | None = HISAParams.hisa_block_size,
    hisa_blocks: int = HISAParams.hisa_blocks,
    **kw: Any,
  ):
    HISAParams(top_k=1, hisa_block_size=hisa_block_size)  # refuses None
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      hisa_block_size=hisa_block_size,
      hisa_blocks=hisa_blocks,
      **kw,
    )


KIND = dsa_kind(
  "hisa", HISAAttention, HISAParams, "Xu et al. 2026 (HISA), arXiv:2603.28458"
)
