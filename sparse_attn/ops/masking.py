"""Causal visibility shared by every attention kind.

Convention (docs/api.md): query i of a block of T queries sits at absolute
position q_offset + i; q_offset defaults to S - T, so T == S is ordinary causal
self-attention and T == 1 is one decode step. Key s is visible to the query at
position p iff s <= p and s < kv_lengths[b] (keys past kv_lengths are padding).
q_offset may be an int or an int array of shape [B] (one offset per sequence,
for batched decoding of prompts with different lengths).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def query_positions(
  batch: int,
  num_queries: int,
  num_keys: int,
  q_offset: Any = None,
  start: Any = 0,
) -> jnp.ndarray:
  """Absolute positions int32[B, T] of queries start .. start+T-1 of the block.

  `num_queries` here is the number of positions wanted; `q_offset` defaults to
  `num_keys - total_queries` and must therefore be resolved by the caller when
  only a chunk of the queries is requested (see `resolve_q_offset`).
  """
  offset = resolve_q_offset(q_offset, batch, num_queries, num_keys)
  idx = jnp.arange(num_queries, dtype=jnp.int32) + jnp.asarray(start, jnp.int32)
  return offset[:, None] + idx[None, :]


def static_q_offset(
  q_offset: Any, num_queries: int, num_keys: int
) -> int | None:
  """q_offset as a Python int when it is known when tracing (None, i.e. the
  default S - T, or an int: the same for every row), else None (a traced or
  per-row offset)."""
  if q_offset is None:
    return num_keys - num_queries
  if isinstance(q_offset, (int, np.integer)):
    return int(q_offset)
  return None


def resolve_q_offset(
  q_offset: Any, batch: int, num_queries: int, num_keys: int
) -> jnp.ndarray:
  """q_offset as int32[B] (default S - T)."""
  static = static_q_offset(q_offset, num_queries, num_keys)
  if static is not None:
    q_offset = static
  return jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))


def visible(
  q_pos: jnp.ndarray, num_keys: int, kv_lengths: Any = None
) -> jnp.ndarray:
  """bool[B, T, S]: key s visible to the query at absolute position q_pos[b, t]."""
  s = jnp.arange(num_keys, dtype=jnp.int32)
  mask = s[None, None, :] <= q_pos[:, :, None]
  if kv_lengths is not None:
    kv = jnp.asarray(kv_lengths, jnp.int32)
    mask = mask & (s[None, None, :] < kv[:, None, None])
  return mask


def num_visible(
  q_pos: jnp.ndarray, num_keys: int, kv_lengths: Any = None
) -> jnp.ndarray:
  """int32[B, T]: how many keys each query sees, without building [T, S]."""
  limit = jnp.clip(q_pos + 1, 0, num_keys)
  if kv_lengths is not None:
    kv = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, num_keys)
    limit = jnp.minimum(limit, kv[:, None])
  return limit


def window_indices(
  q_pos: jnp.ndarray, window: int, num_keys: int, kv_lengths: Any = None
) -> jnp.ndarray:
  """int32[B, T, min(window, S)]: the keys q_pos, q_pos - 1, ... of each
  query's sliding window (the query's own position first), -1 where that
  is no key (before 0, at or past S, or past kv_lengths)."""
  w = min(window, num_keys)
  idx = q_pos[:, :, None] - jnp.arange(w, dtype=jnp.int32)
  ok = (idx >= 0) & (idx < num_keys)
  if kv_lengths is not None:
    ok = ok & (idx < jnp.asarray(kv_lengths, jnp.int32)[:, None, None])
  return jnp.where(ok, idx, -1).astype(jnp.int32)
