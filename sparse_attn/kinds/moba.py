"""MoBA: Mixture of Block Attention (Lu et al. 2025, Moonshot AI).

Keys are cut into blocks of `block_size`. Every query head scores every
block by the affinity q . mean(k[block]) (the mean over the block's non-padding
keys), and attends the keys of its top-k blocks, where
  - its own (current) block is always selected and causally masked inside
    (keys j <= i only);
  - future blocks are excluded, and so is every block that is not fully in
    the past: the candidates are the blocks strictly before the current one;
  - top_k counts the current block, so a query attends at most top_k blocks.
The selection is per query head (with GQA the keys and values of the head's
kv group are read). The selection is a hard top-k: no gradient flows through
the gating, exactly as in MoBA; gradients reach q, k, v through the attention.

With top_k >= ceil(S / block_size) every past block is selected and MoBA
equals dense causal attention.
"""

from __future__ import annotations

from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.kinds.patterns import block_sparse_attention, topk_blocks
from sparse_attn.ops import checks, chunking, masking
from sparse_attn.ops.attention import ATTN_BUDGET, check_qkv, group_heads
from sparse_attn.ops.pooling import mean_pool_blocks


def moba_select(
  q,
  k,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths=None,
  query_chunk: int | None = None,
):
  """int32[B, T, G, H/G, top_k]: the blocks each query head attends (-1 = none)."""
  qs, ks, _ = check_qkv(q, k, k, q_offset, kv_lengths)
  block_size = checks.check_positive_int("block_size", block_size)
  top_k = checks.check_positive_int("top_k", top_k)
  batch, num_q, num_heads, _ = qs
  num_keys, num_kv = ks[1], ks[2]
  pooled = mean_pool_blocks(k, block_size, kv_lengths)  # [B, M, G, D]
  m = pooled.shape[1]
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(num_q, num_heads * m * 4, ATTN_BUDGET)
  acc = checks.acc_dtype(q)
  blk = jnp.arange(m, dtype=jnp.int32)

  def block(start, qb):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    aff = jnp.einsum(
      "bcgrd,bmgd->bcgrm",
      group_heads(qb, num_kv),
      pooled,
      preferred_element_type=acc,
    )
    cur = (q_pos // block_size)[:, :, None, None, None]
    cand = blk < cur
    if kv_lengths is not None:
      kv = jnp.asarray(kv_lengths, jnp.int32)[:, None, None, None, None]
      cand = cand & (blk * block_size < kv)
    forced = (blk == cur) & (cur < m)
    return topk_blocks(aff, forced, cand, top_k)

  return chunking.map_query_chunks(block, query_chunk, q)


@overload
def moba_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: Literal[False] = False,
  return_blocks: Literal[False] = False,
) -> jax.Array: ...


@overload
def moba_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: Literal[False] = False,
  return_blocks: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def moba_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: Literal[True],
  return_blocks: Literal[False] = False,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def moba_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: Literal[True],
  return_blocks: Literal[True],
) -> tuple[jax.Array, jax.Array, jax.Array]: ...


@overload
def moba_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: bool = False,
  return_blocks: bool = False,
) -> (
  jax.Array
  | tuple[jax.Array, jax.Array]
  | tuple[jax.Array, jax.Array, jax.Array]
): ...


def moba_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  block_size: int,
  top_k: int,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: bool = False,
  return_blocks: bool = False,
) -> (
  jax.Array
  | tuple[jax.Array, jax.Array]
  | tuple[jax.Array, jax.Array, jax.Array]
):
  """MoBA attention [B, T, H, Dv].

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv].
    block_size: keys per block; top_k: blocks per query head, current block
      included.
    q_offset, kv_lengths, scale: as `dense_attention`.
    return_counts: also return f32[B, T] keys attended (mean over heads).
    return_blocks: also return the int32[B, T, G, H/G, top_k] selection.
  """
  blocks = moba_select(
    q,
    k,
    block_size=block_size,
    top_k=top_k,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    query_chunk=query_chunk,
  )
  out, counts = block_sparse_attention(
    q,
    k,
    v,
    jax.lax.stop_gradient(blocks),
    block_size=block_size,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    scale=scale,
    query_chunk=query_chunk,
    return_counts=True,
  )
  if return_counts and return_blocks:
    return out, counts, blocks
  if return_counts:
    return out, counts
  if return_blocks:
    return out, blocks
  return out


def moba_keys_per_query(
  seq_len: int, *, block_size: int, top_k: int
) -> np.ndarray:
  """Keys per query: (i mod b) + 1 + min(top_k - 1, floor(i / b)) * b."""
  i = np.arange(seq_len)
  b = block_size
  return (i % b + 1 + np.minimum(top_k - 1, i // b) * b).astype(np.float64)
