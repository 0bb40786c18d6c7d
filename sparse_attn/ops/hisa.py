"""HISA: hierarchical top-k for the lightning indexer (Xu et al. 2026).

HISA (Hierarchical Indexed Sparse Attention, arXiv:2603.28458) replaces
DSA's flat scan of every past key by a two-stage search with the same
indexer, q_I [B, T, HI, DI], w [B, T, HI], k_I [B, S, DI]:

  1. Block representatives (the paper's eq. 4): the keys are cut into
     blocks of `block_size` (B_s) and block b is represented by the mean of
     its keys, kbar_b = mean_{s in b} k_I[s].
  2. Coarse filter (eq. 5): query t scores every block it can see with the
     indexer's own score on the representatives,
       Ibar[t, b] = sum_j w[t, j] * relu(q_I[t, j] . kbar_b),
     and keeps the `num_blocks` (m) best; the first block (the attention
     sink) and the query's own block (the local context) are always kept.
  3. Token refinement: the original score I[t, s] on the keys of the kept
     blocks only, and the top-k of those (DSA's `TIE_RULE`).

Causality: a block is a candidate once its first key is visible. The only
block a query sees in part is its own, whose representative pools keys the
query must not see; that block is forced in and its score never used, so
no future key changes any selection. When every visible block is kept
(num_blocks >= ceil(S / block_size)), HISA is DSA's flat top-k exactly.

The token stage reads m * B_s keys per query instead of S: with the
paper's B_s = 128, m = 64, K = 2048 it scans 8192 keys per query at any
context length, plus S / 128 representatives.

Shapes: B batch, T queries, S keys, HI indexer heads, DI indexer dim,
M = ceil(S / block_size) blocks, m kept blocks, K top-k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.ops import checks, chunking, masking
from sparse_attn.ops.attention import check_indexed_qkv, gathered_attention
from sparse_attn.ops.indexer import (
  check_indexer_inputs,
  relu_scores,
  topk_of_columns,
)
from sparse_attn.ops.pooling import mean_pool_blocks

#: The paper's sizes (its experiments on DeepSeek-V3.2 and GLM-5).
PAPER_BLOCK_SIZE = 128
PAPER_NUM_BLOCKS = 64

# Bound on one query chunk's gathered candidates, [chunk, m * B_s, DI + HI].
_HISA_BUDGET = 1 << 23


def check_hisa_sizes(block_size: Any, num_blocks: Any) -> tuple[int, int]:
  """(block_size, num_blocks) as ints; ValueError naming the bad one."""
  block_size = checks.check_positive_int("block_size", block_size)
  num_blocks = checks.check_positive_int("num_blocks", num_blocks)
  if num_blocks < 2:
    raise ValueError(
      f"num_blocks must be >= 2 (HISA always keeps the first block and the "
      f"query's own block), got {num_blocks}."
    )
  return block_size, num_blocks


def select_blocks(
  q_idx: jax.Array,
  pooled: jax.Array,
  weights: jax.Array,
  q_pos: jax.Array,
  *,
  block_size: int,
  num_blocks: int,
  kv_lengths: jax.Array | None = None,
) -> jax.Array:
  """int32[B, C, m]: the blocks each query keeps (eq. 5), ascending, then M.

  q_idx [B, C, HI, DI], weights [B, C, HI] of C queries at absolute
  positions q_pos int32[B, C]; pooled [B, M, DI] block representatives.
  Slots past the visible blocks hold M (a sentinel that sorts last).
  Among equal block scores the more recent block wins (`TIE_RULE`).
  """
  num_total = pooled.shape[1]
  scores = relu_scores(q_idx, pooled, weights)  # [B, C, M]
  blocks = jnp.arange(num_total, dtype=jnp.int32)
  first_key = blocks * block_size
  visible = first_key[None, None] <= q_pos[..., None]
  if kv_lengths is not None:
    kv = jnp.asarray(kv_lengths, jnp.int32)[:, None, None]
    visible = visible & (first_key[None, None] < kv)
  own = blocks[None, None] == (q_pos // block_size)[..., None]
  forced = visible & (own | (blocks == 0)[None, None])
  scores = jnp.where(forced, jnp.inf, jnp.where(visible, scores, -jnp.inf))
  kept = topk_of_columns(scores, blocks, min(num_blocks, num_total))
  return jnp.sort(jnp.where(kept < 0, num_total, kept), axis=-1)


def hisa_topk(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  k: int,
  *,
  block_size: int = PAPER_BLOCK_SIZE,
  num_blocks: int = PAPER_NUM_BLOCKS,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  query_chunk: int | None = None,
) -> jax.Array:
  """int32[B, T, K]: HISA's top-k keys per query, -1 past the candidates.

  Args:
    q_idx: [B, T, HI, DI] indexer queries; k_idx: [B, S, DI] indexer keys;
      weights: [B, T, HI] per-query head weights (as `lightning_topk`).
    k: keys kept per query (K).
    block_size: keys per block (B_s; the paper's 128).
    num_blocks: blocks kept per query (m >= 2, the first and the query's
      own block included; the paper's 64).
    q_offset, kv_lengths: as `lightning_topk` (positions, padding).
    query_chunk: queries scored at a time (default: what fits a fixed
      budget of chunk * m * B_s * (DI + HI) elements).

  A query that sees fewer than K keys in its kept blocks fills the rest
  with -1 (with K <= (m - 1) * B_s + 1 every query sees min(K, t + 1)).
  Ties and order follow DSA's `TIE_RULE`, so with every block kept the
  result equals `lightning_topk` wherever the two compute equal scores.
  """
  qs, ks = check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths)
  k = checks.check_k(k)
  block_size, num_blocks = check_hisa_sizes(block_size, num_blocks)
  batch, num_q, num_heads, dim = qs
  num_keys = ks[1]
  num_total = -(-num_keys // block_size)
  m = min(num_blocks, num_total)
  pooled = mean_pool_blocks(k_idx, block_size, kv_lengths)  # [B, M, DI]
  pad = num_total * block_size - num_keys
  k_blocks = jnp.pad(k_idx, [(0, 0), (0, pad), (0, 0)]).reshape(
    batch, num_total, block_size, dim
  )
  # One all-zero block for the sentinel M, so gathers need no clamping.
  k_blocks = jnp.pad(k_blocks, [(0, 0), (0, 1), (0, 0), (0, 0)])
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  if query_chunk is None:
    per_query = m * block_size * (dim + num_heads) + num_total * num_heads
    query_chunk = chunking.auto_chunk(num_q, per_query, _HISA_BUDGET)
  local = jnp.arange(block_size, dtype=jnp.int32)
  limit = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)

  def chunk(start, qb, wb):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    kept = select_blocks(
      qb,
      pooled,
      wb,
      q_pos,
      block_size=block_size,
      num_blocks=num_blocks,
      kv_lengths=kv_lengths,
    )  # [B, C, m]
    keys = jax.vmap(lambda kb, i: kb[i])(k_blocks, kept)  # [B, C, m, Bs, DI]
    keys = keys.reshape(*kept.shape[:2], m * block_size, dim)
    acc = checks.acc_dtype(qb, keys, wb)
    dots = jnp.einsum("bchd,bcnd->bchn", qb, keys, preferred_element_type=acc)
    scores = jnp.einsum("bchn,bch->bcn", jax.nn.relu(dots), wb.astype(acc))
    cols = (kept[..., None] * block_size + local).reshape(scores.shape)
    ok = (kept < num_total)[..., None] & jnp.ones((block_size,), bool)
    ok = ok.reshape(scores.shape) & (cols <= q_pos[..., None])
    if limit is not None:
      ok = ok & (cols < limit[:, None, None])
    return topk_of_columns(jnp.where(ok, scores, -jnp.inf), cols, k)

  return chunking.map_query_chunks(chunk, query_chunk, q_idx, weights)


def hisa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  top_k: int,
  block_size: int = PAPER_BLOCK_SIZE,
  num_blocks: int = PAPER_NUM_BLOCKS,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  attention_block_sizes: Any = None,
  return_indices: bool = False,
) -> Any:
  """DSA with HISA's top-k [B, T, H, Dv]: `hisa_topk`, then gathered attention.

  q [B, T, H, D], k [B, S, G, D], v [B, S, G, Dv]; the indexer inputs as
  `hisa_topk`. The attention runs on `implementation` (its Pallas kernel
  included, `attention_block_sizes` its tiling); the top-k is XLA.
  return_indices: also return the int32[B, T, K] selection.
  """
  check_indexed_qkv(q, k, v, q_idx, k_idx, q_offset, kv_lengths)
  indices = hisa_topk(
    q_idx,
    k_idx,
    weights,
    top_k,
    block_size=block_size,
    num_blocks=num_blocks,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
  )
  out = gathered_attention(
    q,
    k,
    v,
    indices,
    scale=scale,
    implementation=implementation,
    block_sizes=attention_block_sizes,
  )
  return (out, indices) if return_indices else out


def hisa_keys_per_query(
  seq_len: int, *, top_k: int, block_size: int, num_blocks: int
) -> np.ndarray:
  """float64[seq_len]: keys HISA selects for the query at position i.

  The candidates are every visible key while the query sees at most m
  blocks, else m - 1 whole past blocks plus its own block's i % B_s + 1.
  """
  i = np.arange(seq_len, dtype=np.int64)
  seen_blocks = i // block_size + 1
  candidates = np.where(
    seen_blocks <= num_blocks,
    i + 1,
    (num_blocks - 1) * block_size + i % block_size + 1,
  )
  return np.minimum(top_k, candidates).astype(np.float64)
