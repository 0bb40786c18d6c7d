"""Dense causal attention: the baseline every kind is compared with."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sparse_attn.nn.base import AttentionLayer, Context, counts_aux
from sparse_attn.nn.kind import AttentionKind
from sparse_attn.ops.attention import dense_attention


@dataclasses.dataclass(frozen=True)
class DenseParams:
  """Dense attention has no parameters of its own."""


class DenseAttention(AttentionLayer):
  """Causal dense softmax attention (GQA/MQA)."""

  supports_context_parallel = True

  def attend(self, q, k, v, ctx: Context):
    if ctx.context_parallel is not None:
      o = ctx.context_parallel.dense_attention(
        q, k, v, q_offset=ctx.q_offset, kv_lengths=ctx.kv_lengths
      )
    else:
      o = dense_attention(
        q, k, v, q_offset=ctx.q_offset, kv_lengths=ctx.kv_lengths
      )
    return (
      o,
      counts_aux(None, ctx.positions, k.shape[1], ctx.kv_lengths),
      ctx.cache,
    )


def keys_per_query(seq_len: int, params: DenseParams, **_: Any) -> np.ndarray:
  del params
  return np.arange(1, seq_len + 1, dtype=np.float64)


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: DenseParams,
  *,
  q_offset=None,
  kv_lengths=None,
  scale: float | None = None,
  **_: Any,
) -> jax.Array:
  """Dense causal attention (scale: None is D**-0.5)."""
  del params
  return dense_attention(
    q, k, v, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale
  )


KIND = AttentionKind(
  name="dense",
  layer=DenseAttention,
  params=DenseParams,
  keys_per_query=keys_per_query,
  attention=attention,
  reference="Vaswani et al. 2017",
)
