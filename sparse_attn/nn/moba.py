"""MoBA layer (Lu et al. 2025): per-head top-k key blocks, own block forced."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sparse_attn.kinds.moba import moba_attention, moba_keys_per_query
from sparse_attn.nn.base import AttentionLayer, Context, counts_aux
from sparse_attn.nn.kind import AttentionKind
from sparse_attn.ops import checks


@dataclasses.dataclass(frozen=True)
class MoBAParams:
  """block_size b; top_k blocks per query head (its own block included)."""

  block_size: int = 16
  top_k: int = 3

  def __post_init__(self):
    checks.check_positive_int("block_size", self.block_size)
    checks.check_positive_int("top_k", self.top_k)


class MoBAAttention(AttentionLayer):
  """MoBA: per-head top-k key blocks by q . mean(block keys), own block forced."""

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    block_size: int = MoBAParams.block_size,
    top_k: int = MoBAParams.top_k,
    **kw: Any,
  ):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    p = MoBAParams(block_size, top_k)
    self.block_size, self.top_k = int(p.block_size), int(p.top_k)

  def attend(self, q, k, v, ctx: Context):
    o, counts = moba_attention(
      q,
      k,
      v,
      block_size=self.block_size,
      top_k=self.top_k,
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
      return_counts=True,
    )
    return (
      o,
      counts_aux(counts, ctx.positions, k.shape[1], ctx.kv_lengths),
      ctx.cache,
    )


def keys_per_query(seq_len: int, params: MoBAParams, **_: Any) -> np.ndarray:
  return moba_keys_per_query(
    seq_len, block_size=params.block_size, top_k=params.top_k
  )


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: MoBAParams,
  *,
  q_offset=None,
  kv_lengths=None,
  **_: Any,
) -> jax.Array:
  return moba_attention(
    q,
    k,
    v,
    block_size=params.block_size,
    top_k=params.top_k,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
  )


KIND = AttentionKind(
  name="moba",
  layer=MoBAAttention,
  params=MoBAParams,
  keys_per_query=keys_per_query,
  attention=attention,
  budget_param="top_k",
  reference="Lu et al. 2025 (MoBA)",
)
