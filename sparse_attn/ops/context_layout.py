"""Sequence layouts for context parallelism: which positions each shard holds.

With the sequence split over C context shards, causal attention gives the
shard holding the last positions the most work (its queries see every key).
The zigzag layout (also called the two-chunk or load-balanced layout) cuts
the sequence into 2C equal chunks and gives shard i chunks i and 2C-1-i, so
every shard holds one early and one late chunk and does the same causal
work. The contiguous layout (shard i holds chunk i of C) is kept for
comparison and for chunked prefill, where it needs no reordering.

A layout is a permutation of positions: arrays in *layout order* hold, at
row r of the global sequence axis, the token at natural position
`layout_order(S, C)[r]`; sharding that axis evenly over C devices gives each
device its shard's chunks. Every function here is static in S and C (the
positions are numpy or computed from a traced shard index), so they are
usable inside shard_map.

Shapes: S sequence length, C context shards, L chunk length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  return layout


def chunks_per_shard(layout: str) -> int:
  return 2 if check_layout(layout) == "zigzag" else 1


def chunk_length(seq_len: int, num_shards: int, layout: str = "zigzag") -> int:
  """L: the length of one chunk; raises unless S splits into them evenly."""
  n = num_shards * chunks_per_shard(layout)
  if num_shards < 1 or seq_len % n:
    raise ValueError(
      f"sequence length {seq_len} must divide into {n} equal chunks for "
      f"the {layout!r} layout over {num_shards} context shards."
    )
  return seq_len // n


def shard_chunk_ids(shard: Any, num_shards: int, layout: str = "zigzag"):
  """The chunk ids shard `shard` holds, in its row order (int or traced)."""
  if chunks_per_shard(layout) == 1:
    return (shard,)
  return (shard, 2 * num_shards - 1 - shard)


def layout_order(
  seq_len: int, num_shards: int, layout: str = "zigzag"
) -> np.ndarray:
  """int32[S]: the natural position stored at each row of the layout."""
  length = chunk_length(seq_len, num_shards, layout)
  rows = [
    c * length + np.arange(length)
    for shard in range(num_shards)
    for c in shard_chunk_ids(shard, num_shards, layout)
  ]
  return np.concatenate(rows).astype(np.int32)


def to_layout(
  x: Any, num_shards: int, layout: str = "zigzag", axis: int = 1
) -> Any:
  """Natural order -> layout order along `axis` (numpy or jax arrays)."""
  order = layout_order(np.shape(x)[axis], num_shards, layout)
  return (
    jnp.take(x, order, axis=axis)
    if isinstance(x, jax.Array)
    else (np.take(x, order, axis=axis))
  )


def from_layout(
  x: Any, num_shards: int, layout: str = "zigzag", axis: int = 1
) -> Any:
  """Layout order -> natural order along `axis` (inverse of `to_layout`)."""
  inverse = np.argsort(layout_order(np.shape(x)[axis], num_shards, layout))
  return (
    jnp.take(x, inverse, axis=axis)
    if isinstance(x, jax.Array)
    else (np.take(x, inverse, axis=axis))
  )


def shard_positions(
  shard: Any, seq_len: int, num_shards: int, layout: str = "zigzag"
) -> jax.Array:
  """int32[S/C]: natural positions of a shard's rows (shard may be traced)."""
  length = chunk_length(seq_len, num_shards, layout)
  ar = jnp.arange(length, dtype=jnp.int32)
  return jnp.concatenate(
    [c * length + ar for c in shard_chunk_ids(shard, num_shards, layout)]
  )


def owner_and_row(
  positions: jax.Array, seq_len: int, num_shards: int, layout: str = "zigzag"
) -> tuple[jax.Array, jax.Array]:
  """(shard, row within the shard) holding each natural position."""
  length = chunk_length(seq_len, num_shards, layout)
  chunk, within = positions // length, positions % length
  if chunks_per_shard(layout) == 1:
    return chunk, within
  late = chunk >= num_shards
  owner = jnp.where(late, 2 * num_shards - 1 - chunk, chunk)
  return owner, within + jnp.where(late, length, 0)
