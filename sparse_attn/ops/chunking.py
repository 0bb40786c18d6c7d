"""Query chunking: bound peak memory by processing queries a block at a time.

`map_query_chunks` runs `fn` over blocks of `chunk` queries with `lax.map`, so
only one block's [chunk, S] intermediates are live at once. Each block is
rematerialised under autodiff (jax.checkpoint), so the backward pass keeps
only the block inputs, not the [chunk, S] intermediates of every block.

`map_causal_segments` is the same for a causal mask: where the mask is known
when tracing and one block would hold every query, it splits the queries
into `causal_segments` that each see only a prefix of the keys, so the
masked upper triangle is mostly never computed.

`map_causal_pairs` does the same past one block in causal self-attention
(T == S, offset 0): query chunk c sees key blocks 0..c, so chunk c and
chunk n-1-c together see n+1 key blocks, a static shape, and each step of
the map computes one such pair, about half of the T x S pairs in all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
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


def use_causal_pairs(
  q_offset: Any,
  num_q: int,
  num_keys: int,
  chunk: int,
  slot_elems: int,
  budget: int,
) -> bool:
  """Whether `map_causal_pairs` applies: causal self-attention (T == S, the
  offset 0 known when tracing) with T past one step of `chunk` queries,
  and the step's per-slot copies within `budget` elements.

  Each step holds the query side once per slot, J * C ~ S rows of
  `slot_elems` elements each (e.g. the queries' H * D and the partial
  outputs' H * Dv), whatever the chunk; past the budget (wide heads such
  as MLA's absorbed H = 128, D = 576) the op scans all S keys instead.
  """
  check_chunk(chunk)
  return (
    num_q == num_keys
    and static_q_offset(q_offset, num_q, num_keys) == 0
    and chunk < num_q
    and num_keys * slot_elems <= budget
  )


def pair_chunk(chunk: int) -> int:
  """Queries per chunk of `map_causal_pairs` for `chunk` queries per step."""
  return max(1, chunk // 2)


@dataclasses.dataclass(frozen=True)
class CausalPair:
  """One step of `map_causal_pairs`: query chunks c and n-1-c as J = n+1 slots.

  Slot j holds query block `query_block[j]` against key block
  `key_block[j]`, C queries and C keys. The slots with first[j] belong to
  chunk c (key blocks 0..c), the others to chunk n-1-c (key blocks
  0..n-1-c): together every key block either chunk can see, once. An op
  either lays per-slot values [B, C, ..., J, C] (the slot's queries on
  axis 1, its keys last) out as one row per (owner, query) with `rows`
  and reduces each row as it would a row of S keys (the top-k, the KL),
  or reduces each slot and merges the slots per owner with `owners`
  (dense attention's partial softmax results). It returns per-owner
  results [B, 2, C, ...].
  """

  first: jax.Array  # bool[J]: the slot belongs to chunk c (owner 0)
  query_block: jax.Array  # int32[J]
  key_block: jax.Array  # int32[J]
  chunk: int  # C
  num_keys: int  # S: the padded keys at S and past it are never visible

  @property
  def q_pos(self) -> jax.Array:
    """int32[J, C]: positions of each slot's queries."""
    return self.query_block[:, None] * self.chunk + jnp.arange(self.chunk)

  @property
  def k_pos(self) -> jax.Array:
    """int32[J, C]: positions of each slot's keys."""
    return self.key_block[:, None] * self.chunk + jnp.arange(self.chunk)

  def visible(self, batch: int, kv_lengths: Any = None) -> jax.Array:
    """bool[B, C, J, C]: key s of slot j visible to the slot's query t."""
    k_pos = self.k_pos[None]  # [1, J, Cs]
    mask = k_pos <= self.q_pos.T[:, :, None]  # [Ct, J, Cs]
    limit = jnp.full((batch,), self.num_keys, jnp.int32)
    if kv_lengths is not None:
      limit = jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), limit)
    return mask[None] & (k_pos[None] < limit[:, None, None, None])

  def rows(self, x: jax.Array, fill: Any) -> jax.Array:
    """[B, C, ..., J, Cs] per-slot values -> [B, 2, C, ..., J*Cs]: row o of
    a query holds its owner's slots and `fill` in the other owner's."""
    first = self.first[:, None]
    out = jnp.stack(
      [jnp.where(first, x, fill), jnp.where(first, fill, x)], axis=1
    )
    return out.reshape(*out.shape[:-2], -1)

  def owners(self, dtype: Any = jnp.float32) -> jax.Array:
    """[J, 2] one-hot owner of each slot (for einsums over the slots)."""
    return jnp.stack([self.first, ~self.first], axis=-1).astype(dtype)

  def key_index(self, cols: jax.Array) -> jax.Array:
    """Row columns (j * C + s, or -1) -> absolute key positions (or -1)."""
    keys = jnp.take(self.key_block, cols // self.chunk) * self.chunk
    return jnp.where(cols >= 0, keys + cols % self.chunk, -1)


def map_causal_pairs(
  fn: Callable[..., Any],
  chunk: int,
  queries: Sequence[jnp.ndarray | None],
  keys: Sequence[jnp.ndarray | None],
) -> Any:
  """Applies fn(pair, q_slots, k_slots) to the query chunk pairs of a
  causal self-attention (T == S, offset 0; see `use_causal_pairs`).

  `queries` carry T on axis 1 and `keys` S on axis 1 (None passes
  through). The T queries go in n chunks of `chunk` (n even, padded); step
  c of a `lax.map` pairs chunks c and n-1-c: fn gets the `CausalPair` and
  the arrays' blocks per slot, [B, J, C, ...] (queries by
  `pair.query_block`, keys by `pair.key_block`), and returns a pytree of
  per-owner results [B, 2, C, ...], stitched back to [B, T, ...]. Each step
  sees (n+1) C^2 pairs, so the map computes (n+1)/(2n) of T x S; it is
  rematerialised under autodiff like `map_query_chunks`.
  """
  check_chunk(chunk)
  present = [a for a in queries if a is not None]
  batch, num_q = present[0].shape[:2]
  n = -(-num_q // chunk)
  n += n % 2
  padded = n * chunk

  def blocks(a):
    if a is None:
      return None
    a = jnp.pad(a, [(0, 0), (0, padded - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(a.shape[0], n, chunk, *a.shape[2:])

  q_blocks = [blocks(a) for a in queries]
  k_blocks = [blocks(a) for a in keys]
  slots = jnp.arange(n + 1, dtype=jnp.int32)

  def take(arrays, index):
    return [None if a is None else jnp.take(a, index, axis=1) for a in arrays]

  def step(c):
    first = slots <= c
    pair = CausalPair(
      first=first,
      query_block=jnp.where(first, c, n - 1 - c),
      key_block=jnp.where(first, slots, slots - c - 1),
      chunk=chunk,
      num_keys=num_q,
    )
    return fn(
      pair, take(q_blocks, pair.query_block), take(k_blocks, pair.key_block)
    )

  out = jax.lax.map(jax.checkpoint(step), jnp.arange(n // 2, dtype=jnp.int32))

  def stitch(o):  # [n/2, B, 2, C, ...]: chunk c, then chunk n-1-c
    chunks = jnp.concatenate([o[:, :, 0], o[::-1, :, 1]], axis=0)
    chunks = jnp.moveaxis(chunks, 0, 1)  # [B, n, C, ...]
    return chunks.reshape(batch, padded, *chunks.shape[3:])[:, :num_q]

  return jax.tree.map(stitch, out)
