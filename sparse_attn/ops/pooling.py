"""Mean pooling of key blocks (MoBA's block keys, HISA's block representatives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mean_pool_blocks(
  x: jax.Array, block_size: int, kv_lengths: jax.Array | None = None
) -> jax.Array:
  """x [B, S, ...] -> [B, ceil(S/bs), ...]: the mean of each block's valid keys.

  Keys at or past kv_lengths[b] (padding) are left out of the mean; a block
  with no valid key pools to zeros. Accumulates in f32, returns x's dtype.
  """
  batch, num_keys = x.shape[:2]
  m = -(-num_keys // block_size)
  pos = jnp.arange(m * block_size, dtype=jnp.int32)
  ok = jnp.broadcast_to(pos < num_keys, (batch, m * block_size))
  if kv_lengths is not None:
    ok = ok & (pos[None] < jnp.asarray(kv_lengths, jnp.int32)[:, None])
  trailing = x.shape[2:]
  pad = [(0, 0), (0, m * block_size - num_keys)] + [(0, 0)] * len(trailing)
  xb = jnp.pad(x, pad).astype(jnp.float32)
  xb = xb.reshape(batch, m, block_size, *trailing)
  w = ok.astype(jnp.float32).reshape(
    batch, m, block_size, *(1,) * len(trailing)
  )
  total = jnp.sum(w * xb, axis=2)
  n = jnp.sum(w, axis=2)
  return (total / jnp.maximum(n, 1.0)).astype(x.dtype)
