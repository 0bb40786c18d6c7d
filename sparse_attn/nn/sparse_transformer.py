"""Sparse Transformer attention (Child et al. 2019): strided and fixed patterns.

Both kinds combine their two patterns as `combine="merged"` (union),
`"alternate"` (by layer parity) or `"split"` (half the heads each); see
`sparse_attn.kinds.patterns` for the masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sparse_attn.kinds.patterns import (
  check_pattern,
  sparse_transformer_attention,
  sparse_transformer_keys_per_query,
)
from sparse_attn.nn.base import AttentionLayer
from sparse_attn.nn.kind import AttentionKind, pure_form


@dataclasses.dataclass(frozen=True)
class StridedParams:
  """stride l: local band of l + 1 keys (i - l .. i) + every l-th key back."""

  stride: int = 16
  combine: str = "merged"
  pattern = "strided"
  summary = 1

  def __post_init__(self):
    check_pattern(self.pattern, self.stride, self.summary, self.combine)


@dataclasses.dataclass(frozen=True)
class FixedParams:
  """stride l: own block of l keys + the last `summary` keys of each block."""

  stride: int = 16
  summary: int = 2
  combine: str = "merged"
  pattern = "fixed"

  def __post_init__(self):
    check_pattern(self.pattern, self.stride, self.summary, self.combine)


def counted_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: StridedParams | FixedParams,
  *,
  q_offset=None,
  kv_lengths=None,
  layer_index: int = 0,
  **_: Any,
) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, H, Dv], keys per query f32[B, T]) of the pattern."""
  return sparse_transformer_attention(
    q,
    k,
    v,
    pattern=params.pattern,
    stride=params.stride,
    summary=params.summary,
    combine=params.combine,
    layer_index=layer_index,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    return_counts=True,
  )


class StridedAttention(AttentionLayer):
  """Sparse Transformer, strided pattern: local band of l + 1 keys + every
  l-th key."""

  counted_attention = staticmethod(counted_attention)

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    stride: int = StridedParams.stride,
    combine: str = StridedParams.combine,
    **kw: Any,
  ):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.params = StridedParams(stride, combine)


class FixedAttention(AttentionLayer):
  """Sparse Transformer, fixed pattern: own block of l + last c of each block."""

  counted_attention = staticmethod(counted_attention)

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    stride: int = FixedParams.stride,
    summary: int = FixedParams.summary,
    combine: str = FixedParams.combine,
    **kw: Any,
  ):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.params = FixedParams(stride, summary, combine)


def keys_per_query(
  seq_len: int,
  params: StridedParams | FixedParams,
  *,
  num_heads: int | None = None,
  layer_index: int | None = None,
  **_: Any,
) -> np.ndarray:
  return sparse_transformer_keys_per_query(
    seq_len,
    pattern=params.pattern,
    stride=params.stride,
    summary=params.summary,
    combine=params.combine,
    layer_index=layer_index,
    num_heads=num_heads,
  )


STRIDED = AttentionKind(
  name="strided",
  layer=StridedAttention,
  params=StridedParams,
  keys_per_query=keys_per_query,
  attention=pure_form(counted_attention),
  budget_param="stride",
  reference="Child et al. 2019 (Sparse Transformer)",
)

FIXED = AttentionKind(
  name="fixed",
  layer=FixedAttention,
  params=FixedParams,
  keys_per_query=keys_per_query,
  attention=pure_form(counted_attention),
  budget_param="stride",
  reference="Child et al. 2019 (Sparse Transformer)",
)
