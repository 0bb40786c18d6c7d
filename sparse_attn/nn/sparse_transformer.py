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
from sparse_attn.nn.base import AttentionLayer, Context, counts_aux
from sparse_attn.nn.kind import AttentionKind


@dataclasses.dataclass(frozen=True)
class StridedParams:
  """stride l: local band of l keys + every l-th key back."""

  stride: int = 16
  combine: str = "merged"

  def __post_init__(self):
    check_pattern("strided", self.stride, 1, self.combine)


@dataclasses.dataclass(frozen=True)
class FixedParams:
  """stride l: own block of l keys + the last `summary` keys of each block."""

  stride: int = 16
  summary: int = 2
  combine: str = "merged"

  def __post_init__(self):
    check_pattern("fixed", self.stride, self.summary, self.combine)


class _SparseTransformer(AttentionLayer):
  pattern = ""

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    stride: int,
    summary: int,
    combine: str,
    **kw: Any,
  ):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.stride, self.summary = check_pattern(
      self.pattern, stride, summary, combine
    )
    self.combine = combine

  def attend(self, q, k, v, ctx: Context):
    o, counts = sparse_transformer_attention(
      q,
      k,
      v,
      pattern=self.pattern,
      stride=self.stride,
      summary=self.summary,
      combine=self.combine,
      layer_index=self.layer_index,
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
      return_counts=True,
    )
    return (
      o,
      counts_aux(counts, ctx.positions, k.shape[1], ctx.kv_lengths),
      ctx.cache,
    )


class StridedAttention(_SparseTransformer):
  """Sparse Transformer, strided pattern: local band of l + every l-th key."""

  pattern = "strided"

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
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      stride=stride,
      summary=1,
      combine=combine,
      **kw,
    )


class FixedAttention(_SparseTransformer):
  """Sparse Transformer, fixed pattern: own block of l + last c of each block."""

  pattern = "fixed"

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
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      stride=stride,
      summary=summary,
      combine=combine,
      **kw,
    )


def _keys_per_query(pattern: str):
  def fn(
    seq_len: int,
    params: Any,
    *,
    num_heads: int | None = None,
    layer_index: int | None = None,
    **_: Any,
  ) -> np.ndarray:
    return sparse_transformer_keys_per_query(
      seq_len,
      pattern=pattern,
      stride=params.stride,
      summary=getattr(params, "summary", 1),
      combine=params.combine,
      layer_index=layer_index,
      num_heads=num_heads,
    )

  return fn


def _attention(pattern: str):
  def fn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    params: Any,
    *,
    q_offset=None,
    kv_lengths=None,
    layer_index: int = 0,
    **_: Any,
  ) -> jax.Array:
    return sparse_transformer_attention(
      q,
      k,
      v,
      pattern=pattern,
      stride=params.stride,
      summary=getattr(params, "summary", 1),
      combine=params.combine,
      layer_index=layer_index,
      q_offset=q_offset,
      kv_lengths=kv_lengths,
    )

  return fn


STRIDED = AttentionKind(
  name="strided",
  layer=StridedAttention,
  params=StridedParams,
  keys_per_query=_keys_per_query("strided"),
  attention=_attention("strided"),
  budget_param="stride",
  reference="Child et al. 2019 (Sparse Transformer)",
)

FIXED = AttentionKind(
  name="fixed",
  layer=FixedAttention,
  params=FixedParams,
  keys_per_query=_keys_per_query("fixed"),
  attention=_attention("fixed"),
  budget_param="stride",
  reference="Child et al. 2019 (Sparse Transformer)",
)
