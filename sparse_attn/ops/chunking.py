"""Query chunking: bound peak memory by processing queries a block at a time.

`map_query_chunks` runs `fn` over blocks of `chunk` queries with `lax.map`, so
only one block's [chunk, S] intermediates are live at once. Each block is
rematerialised under autodiff (jax.checkpoint), so the backward pass keeps
only the block inputs, not the [chunk, S] intermediates of every block.

`map_causal_segments` is the same for a causal mask: where the mask is known
when tracing and one block would hold every query, it splits the queries
into `causal_segments` that each see only a prefix of the keys, so the
masked upper triangle is mostly never computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.ops import masking

# A static causal mask splits the queries into up to this many segments,
# each over only the keys it can see: the pairs computed fall from T*S to
# about (n+1)/(2n) of that at T = S (0.56 at 8), and each segment is a
# separate static shape in the program.
CAUSAL_SEGMENTS = 8
# Shorter segments would add per-op overhead for a small saving.
MIN_CAUSAL_SEGMENT = 64


def auto_chunk(
  num_queries: int, per_query_elems: int, budget_elems: int = 1 << 24
) -> int:
  """Largest power-of-two query chunk whose intermediates fit `budget_elems`."""
  chunk = max(1, budget_elems // max(per_query_elems, 1))
  chunk = 1 << (chunk.bit_length() - 1)
  return max(1, min(chunk, num_queries))


def check_chunk(chunk: Any) -> None:
  """A query chunk must be a positive int (an op's `query_chunk`)."""
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)):
    raise ValueError(f"query_chunk must be a positive int, got {chunk!r}")
  if chunk < 1:
    raise ValueError(f"query_chunk must be >= 1, got {chunk}")


def map_query_chunks(
  fn: Callable[..., Any], chunk: int, *arrays: jnp.ndarray | None
) -> Any:
  """Applies fn(start, *blocks) to query blocks; arrays carry T on axis 1.

  fn gets `start` (int32 scalar, the index of the block's first query) and
  the arrays sliced to [B, chunk, ...]; it returns a pytree of arrays with
  the block's queries on axis 1. Results are stitched back to length T.
  Arrays may be None (passed through as None).
  """
  check_chunk(chunk)
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


# Defined beside the offset's other rules; re-exported for existing callers.
static_q_offset = masking.static_q_offset


def causal_segments(num_q: int) -> list[tuple[int, int]]:
  """[start, stop) of the query segments of a static causal mask: at most
  CAUSAL_SEGMENTS of equal length (the last may be shorter), about
  MIN_CAUSAL_SEGMENT queries or more each; one segment below that."""
  if num_q == 0:
    return [(0, 0)]
  n = max(1, min(CAUSAL_SEGMENTS, num_q // MIN_CAUSAL_SEGMENT))
  size = -(-num_q // n)
  return [(a, min(num_q, a + size)) for a in range(0, num_q, size)]


def map_causal_segments(
  fn: Callable[..., Any],
  chunk: int,
  q_offset: Any,
  num_keys: int,
  *arrays: jnp.ndarray | None,
) -> Any:
  """Applies fn(start, seen, *blocks) to the queries of a causal mask.

  Like `map_query_chunks` (arrays carry T on axis 1, None passes through,
  fn returns a pytree with the block's queries on axis 1), with `seen`, a
  Python int: the block's queries see no key at or past it (positions
  q_offset + start + i, i < block length), so fn may slice keys [0, seen).

  With q_offset known when tracing (None or an int, `static_q_offset`) and
  `chunk` >= T, the queries go in `causal_segments` and `seen` is each
  segment's own prefix (at least 1, so no key axis is empty unless S = 0).
  Otherwise (a traced or per-row offset, or T past one chunk) this is
  `map_query_chunks` with seen = num_keys: unrolled segments past the
  memory budget would let XLA keep several blocks' intermediates live at
  once (3x the temp memory of dense attention's gradient at T = S = 8192).
  """
  check_chunk(chunk)
  present = [a for a in arrays if a is not None]
  num_q = present[0].shape[1]
  static = static_q_offset(q_offset, num_q, num_keys)
  if static is None or chunk < num_q:
    return map_query_chunks(
      lambda start, *blocks: fn(start, num_keys, *blocks), chunk, *arrays
    )
  outs = [
    fn(
      a,
      min(num_keys, max(1, static + b)),
      *(None if x is None else x[:, a:b] for x in arrays),
    )
    for a, b in causal_segments(num_q)
  ]
  if len(outs) == 1:
    return outs[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *outs)
