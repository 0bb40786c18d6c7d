"""Sliding-window attention: each query attends its last `window` keys."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sparse_attn.kinds.patterns import (
  sliding_window_attention,
  sliding_window_keys_per_query,
)
from sparse_attn.nn.base import AttentionLayer
from sparse_attn.nn.kind import AttentionKind, pure_form
from sparse_attn.ops import checks


@dataclasses.dataclass(frozen=True)
class SlidingWindowParams:
  """window: keys per query (the query itself included)."""

  window: int = 64

  def __post_init__(self):
    checks.check_positive_int("window", self.window)


def counted_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: SlidingWindowParams,
  *,
  q_offset=None,
  kv_lengths=None,
  implementation=None,
  block_sizes=None,
  **_: Any,
) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, H, Dv], keys per query f32[B, T]) of the sliding window."""
  return sliding_window_attention(
    q,
    k,
    v,
    window=params.window,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    implementation=implementation,
    block_sizes=block_sizes,
    return_counts=True,
  )


class SlidingWindowAttention(AttentionLayer):
  """Local causal attention over the last `window` keys (gathered)."""

  counted_attention = staticmethod(counted_attention)

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    window: int = SlidingWindowParams.window,
    **kw: Any,
  ):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.params = SlidingWindowParams(window)


def keys_per_query(
  seq_len: int, params: SlidingWindowParams, **_: Any
) -> np.ndarray:
  return sliding_window_keys_per_query(seq_len, params.window)


KIND = AttentionKind(
  name="sliding_window",
  layer=SlidingWindowAttention,
  params=SlidingWindowParams,
  keys_per_query=keys_per_query,
  attention=pure_form(counted_attention),
  budget_param="window",
  reference="Beltagy et al. 2020 (Longformer)",
)
