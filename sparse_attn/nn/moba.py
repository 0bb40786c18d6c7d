"""MoBA layer (Lu et al. 2025): per-head top-k key blocks, own block forced."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sparse_attn.kinds.moba import moba_attention, moba_keys_per_query
from sparse_attn.nn.base import AttentionLayer
from sparse_attn.nn.kind import AttentionKind, pure_form
from sparse_attn.ops import checks


@dataclasses.dataclass(frozen=True)
class MoBAParams:
  """block_size b; top_k blocks per query head (its own block included)."""

  block_size: int = 16
  top_k: int = 3

  def __post_init__(self):
    checks.check_positive_int("block_size", self.block_size)
    checks.check_positive_int("top_k", self.top_k)


def counted_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: MoBAParams,
  *,
  q_offset=None,
  kv_lengths=None,
  **_: Any,
) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, H, Dv], keys per query f32[B, T], mean over heads) of MoBA."""
  return moba_attention(
    q,
    k,
    v,
    block_size=params.block_size,
    top_k=params.top_k,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    return_counts=True,
  )


class MoBAAttention(AttentionLayer):
  """MoBA: per-head top-k key blocks by q . mean(block keys), own block forced."""

  counted_attention = staticmethod(counted_attention)

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
    self.params = MoBAParams(block_size, top_k)


def keys_per_query(seq_len: int, params: MoBAParams, **_: Any) -> np.ndarray:
  return moba_keys_per_query(
    seq_len, block_size=params.block_size, top_k=params.top_k
  )


KIND = AttentionKind(
  name="moba",
  layer=MoBAAttention,
  params=MoBAParams,
  keys_per_query=keys_per_query,
  attention=pure_form(counted_attention),
  budget_param="top_k",
  reference="Lu et al. 2025 (MoBA)",
)
