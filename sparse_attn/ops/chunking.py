"""Query chunking: bound peak memory by processing queries a block at a time.

`map_query_chunks` runs `fn` over blocks of `chunk` queries with `lax.map`, so
only one block's [chunk, S] intermediates are live at once. Each block is
rematerialised under autodiff (jax.checkpoint), so the backward pass keeps
only the block inputs, not the [chunk, S] intermediates of every block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def auto_chunk(
  num_queries: int, per_query_elems: int, budget_elems: int = 1 << 24
) -> int:
  """Largest power-of-two query chunk whose intermediates fit `budget_elems`."""
  chunk = max(1, budget_elems // max(per_query_elems, 1))
  chunk = 1 << (chunk.bit_length() - 1)
  return max(1, min(chunk, num_queries))


def map_query_chunks(
  fn: Callable[..., Any], chunk: int, *arrays: jnp.ndarray | None
) -> Any:
  """Applies fn(start, *blocks) to query blocks; arrays carry T on axis 1.

  fn gets `start` (int32 scalar, the index of the block's first query) and
  the arrays sliced to [B, chunk, ...]; it returns a pytree of arrays with
  the block's queries on axis 1. Results are stitched back to length T.
  Arrays may be None (passed through as None).
  """
  present = [a for a in arrays if a is not None]
  num_queries = present[0].shape[1]
  if chunk >= num_queries:
    return fn(jnp.int32(0), *arrays)
  num_chunks = -(-num_queries // chunk)
  padded = num_chunks * chunk

  def split(a):
    if a is None:
      return None
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, padded - num_queries)
    a = jnp.pad(a, pad)
    a = a.reshape(a.shape[0], num_chunks, chunk, *a.shape[2:])
    return jnp.moveaxis(a, 1, 0)

  blocks = [split(a) for a in arrays]
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
  body = jax.checkpoint(lambda xs: fn(xs[0], *xs[1]))
  out = jax.lax.map(body, (starts, blocks))

  def stitch(o):
    o = jnp.moveaxis(o, 0, 1)
    o = o.reshape(o.shape[0], padded, *o.shape[3:])
    return o[:, :num_queries]

  return jax.tree.map(stitch, out)
