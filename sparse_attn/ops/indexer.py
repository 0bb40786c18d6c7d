"""The lightning indexer's pure functions: index scores and top-k selection.

For query t and key s the index score is
    I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s])
over HI indexer heads j, with one shared indexer key per token. Each query
keeps the top-k visible keys; the main attention reads only those.

Shapes: B batch, T queries, S keys, HI indexer heads, DI indexer dim, K top-k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_attn import dispatch
from sparse_attn.ops import checks, chunking, kernel_sharding, masking

# Bound on the [chunk, S, HI] intermediate of one query block (elements).
_TOPK_BUDGET = 1 << 23

TIE_RULE = (
  "among equal scores the more recent key (larger index) wins; a row lists "
  "its keys by descending score, the more recent first among equals, then "
  "-1 slots"
)


def check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths):
  qs = checks.check_rank("q_idx", q_idx, 4, "[B, T, HI, DI]")
  ks = checks.check_rank("k_idx", k_idx, 3, "[B, S, DI]")
  ws = checks.check_rank("weights", weights, 3, "[B, T, HI]")
  for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
    checks.check_floating(name, x)
  if ks[0] != qs[0] or ks[2] != qs[3]:
    raise ValueError(
      f"k_idx shape {ks} must be [B, S, DI] matching q_idx shape {qs} "
      f"(B={qs[0]}, DI={qs[3]})."
    )
  if ws != qs[:3]:
    raise ValueError(
      f"weights shape {ws} must be [B, T, HI] = {qs[:3]} to match q_idx "
      f"shape {qs}."
    )
  checks.check_q_offset(q_offset, qs[0])
  checks.check_kv_lengths(kv_lengths, qs[0])
  return qs, ks


def relu_scores(q_idx, k_idx, weights):
  """Unmasked index scores [B, C, S] = sum_j w * relu(q_j . k) (acc dtype)."""
  acc = checks.acc_dtype(q_idx, k_idx, weights)
  if q_idx.shape[1] <= 8:
    # Decode-sized blocks: keys-major dots keep the head reduction contiguous
    # (about 4x faster on CPU at T=1, S=64K than the query-major layout).
    dots = jnp.einsum(
      "bthd,bsd->bsth", q_idx, k_idx, preferred_element_type=acc
    )
    return jnp.einsum("bsth,bth->bts", jax.nn.relu(dots), weights.astype(acc))
  dots = jnp.einsum("bthd,bsd->bths", q_idx, k_idx, preferred_element_type=acc)
  return jnp.einsum("bths,bth->bts", jax.nn.relu(dots), weights.astype(acc))


def masked_scores(q_idx, k_idx, weights, q_pos, kv_lengths):
  """f32[B, C, S] index scores of one query block, -inf where not visible."""
  scores = relu_scores(q_idx, k_idx, weights)
  mask = masking.visible(q_pos, k_idx.shape[1], kv_lengths)
  return jnp.where(mask, scores, -jnp.inf)


def pair_scores(pair, q_idx, weights, k_idx, kv_lengths):
  """f32[B, C, J, C] index scores of a `chunking.CausalPair`'s slots, -inf
  where not visible: q_idx [B, J, C, HI, DI], weights [B, J, C, HI] and
  k_idx [B, J, C, DI] per slot."""
  scores = jax.vmap(relu_scores, in_axes=1, out_axes=2)(q_idx, k_idx, weights)
  return jnp.where(pair.visible(q_idx.shape[0], kv_lengths), scores, -jnp.inf)


def indexer_scores(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
) -> jax.Array:
  """Index scores f32[B, T, S]: sum_j w*relu(q.k) where visible, -inf elsewhere.

  Args:
    q_idx: [B, T, HI, DI] indexer queries.
    k_idx: [B, S, DI] indexer keys (one per token, shared by all heads).
    weights: [B, T, HI] per-query head weights (any scale is the caller's:
      no hidden scale is applied here).
    q_offset: absolute position of query 0 (int or int32[B]); default S - T.
    kv_lengths: optional int32[B]; keys >= kv_lengths[b] are padding.
  """
  qs, ks = check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths)
  q_pos = masking.query_positions(qs[0], qs[1], ks[1], q_offset)
  return masked_scores(q_idx, k_idx, weights, q_pos, kv_lengths)


def _pow2_floor(x: float) -> int:
  x = max(int(x), 1)
  return 1 << (x.bit_length() - 1)


def default_sub_block(num_keys: int, k: int) -> int:
  """Sub-block size balancing the two sorts of `two_stage_topk`: ~sqrt(S/K)."""
  return _pow2_floor(max(1.0, (num_keys / k) ** 0.5))


def two_stage_topk(
  scores: jax.Array, k: int, sub_block: int | None = None
) -> jax.Array:
  """int32[..., K] indices of the K largest finite scores, -1 for the rest.

  Ties follow the selection rule of the API: among equal scores the more
  recent key (larger index) wins, and a row lists its keys by descending
  score, the more recent first among equals (`TIE_RULE`).

  Exact two-stage selection. Order the entries of a row by (score, index).
  The K largest lie in the K sub-blocks whose largest entries are largest
  (a block outside those has K blocks whose largest entries beat
  everything in it). Stage 1 picks those K blocks, stage 2 the K largest of
  their K * sub_block entries. XLA's CPU top_k sorts whole rows, so two
  sorts of ~sqrt(S*K) entries beat one of S entries several times over at
  long context; on other backends it is no worse.
  """
  num_keys = scores.shape[-1]
  # lax.top_k breaks ties towards the smaller index: select on the reversed
  # row, where the smaller index is the more recent key. Its total order
  # also ranks -0.0 below 0.0, which a comparison-based kernel calls equal.
  rev = jnp.where(scores == 0, 0.0, scores).astype(scores.dtype)[..., ::-1]
  sb = default_sub_block(num_keys, k) if sub_block is None else sub_block
  num_blocks = -(-num_keys // sb)
  if sb == 1 or num_blocks <= k:
    picked = _select(rev, jnp.arange(num_keys, dtype=jnp.int32), k)
  else:
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, num_blocks * sb - num_keys)]
    blocks = jnp.pad(rev, pad, constant_values=-jnp.inf).reshape(
      *scores.shape[:-1], num_blocks, sb
    )
    _, top_blocks = jax.lax.top_k(jnp.max(blocks, axis=-1), k)
    # In row order again, so that stage 2's ties also go to the smaller
    # (reversed) index.
    top_blocks = jnp.sort(top_blocks, axis=-1)
    cand = jnp.take_along_axis(blocks, top_blocks[..., None], axis=-2)
    cand_cols = top_blocks[..., None] * sb + jnp.arange(sb, dtype=jnp.int32)
    picked = _select(
      cand.reshape(*cand.shape[:-2], k * sb),
      cand_cols.reshape(*cand.shape[:-2], k * sb),
      k,
    )
  return jnp.where(picked >= 0, num_keys - 1 - picked, -1)


def topk_of_columns(values: jax.Array, columns: jax.Array, k: int) -> jax.Array:
  """int32[..., K]: the `columns` of the K largest finite `values`, by `TIE_RULE`.

  For selections over candidates that are not a whole row of keys
  (HISA's blocks and the keys inside them): values [..., N] are the scores
  of candidates whose key (or block) indices `columns` [..., N] (any
  broadcastable shape) increase along the row, -inf where a candidate is
  not visible. Among equal scores the larger column wins; the result lists
  columns by descending score, -1 past the visible ones.
  """
  values = jnp.where(values == 0, 0.0, values).astype(values.dtype)
  columns = jnp.broadcast_to(columns, values.shape)
  return _select(values[..., ::-1], columns[..., ::-1], k)


def _select(values: jax.Array, columns: jax.Array, k: int) -> jax.Array:
  """columns of the K largest finite values (one top_k), -1 padded."""
  kk = min(k, values.shape[-1])
  top, pos = jax.lax.top_k(values, kk)
  cols = jnp.broadcast_to(columns, values.shape)
  idx = jnp.take_along_axis(cols, pos, axis=-1)
  idx = jnp.where(jnp.isneginf(top), -1, idx).astype(jnp.int32)
  if kk < k:
    pad = [(0, 0)] * (idx.ndim - 1) + [(0, k - kk)]
    idx = jnp.pad(idx, pad, constant_values=-1)
  return idx


def select_topk(scores: jax.Array, k: int) -> jax.Array:
  """int32[B, T, K]: indices of the K largest visible (finite) scores.

  Slots beyond the number of visible keys hold -1; -inf marks a key as not
  visible. Ties: among equal scores the more recent key (larger index)
  wins, and each row lists its keys by descending score, the more recent
  first among equals (`TIE_RULE`; every DSA top-k path follows it, so
  training, decoding, kernels and sharded runs select the same keys from
  the same scores; NSA's and MoBA's block selections keep their own rule,
  the lower block id).
  """
  checks.check_rank("scores", scores, 3, "[B, T, S]")
  checks.check_floating("scores", scores)
  k = checks.check_k(k)
  return two_stage_topk(scores, k)


def lightning_topk(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  k: int,
  *,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  implementation: str | None = None,
  query_chunk: int | None = None,
  block_sizes: Any = None,
) -> jax.Array:
  """int32[B, T, K]: top-k of the index scores without materialising [T, S].

  Returns what `select_topk(indexer_scores(...), k)` returns, ties and
  order included (`TIE_RULE`), whenever the two compute equal scores
  (always for exact ties such as all-zero ReLU scores; otherwise scores one
  rounding apart may order differently). The XLA path scores `query_chunk`
  queries at a time (default: as many as fit a fixed budget of chunk*S*HI
  elements), so peak memory is
  O(T*K + chunk*S*HI). It also skips most of the invisible upper triangle
  where the causal mask is known when tracing: with one chunk, the queries
  go in causal segments over the key prefix each can see
  (`chunking.map_causal_segments`); past one chunk in causal
  self-attention (T == S, q_offset None or 0), each step takes two chunks
  of query_chunk/2 queries, c and n-1-c, which together see n+1 key blocks
  (`chunking.map_causal_pairs`), halving the work. The Pallas path fuses
  scoring and selection in one kernel, tiled by `block_sizes`
  (`kernels_pallas.topk.BlockSizes` or a dict of its fields; None fields, or
  None, take the platform defaults; ignored by "xla").
  """
  block_sizes = dispatch.block_sizes("topk", block_sizes, "block_sizes")
  qs, ks = check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths)
  k = checks.check_k(k)
  impl = dispatch.resolve(implementation)
  if impl == "pallas":
    kernel = dispatch.kernel("topk", "lightning_topk")
    offset = q_offset
    if offset is not None and not isinstance(offset, int):
      offset = jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (qs[0],))
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    batch_role = ("batch",)
    # Only the batch splits: every indexer head feeds each query's scores.
    return kernel_sharding.call_kernel_sharded(
      lambda qi, ki, w, off, kv: kernel(
        qi, ki, w, k, q_offset=off, kv_lengths=kv, block_sizes=block_sizes
      ),
      (q_idx, k_idx, weights, offset, lengths),
      roles=[
        ("batch", None, None, None),
        ("batch", None, None),
        ("batch", None, None),
        None if offset is None or isinstance(offset, int) else batch_role,
        None if lengths is None else batch_role,
      ],
      out_roles=("batch", None, None),
    )
  batch, num_q, num_heads, _ = qs
  num_keys = ks[1]
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(num_q, num_keys * num_heads, _TOPK_BUDGET)
  # Per slot row: q_idx, the head weights and k_idx.
  slot_elems = num_heads * (qs[3] + 1) + qs[3]
  if chunking.use_causal_pairs(
    q_offset, num_q, num_keys, query_chunk, slot_elems, _TOPK_BUDGET
  ):

    def pair_topk(pair, queries, keys):
      (qb, wb), (kb,) = queries, keys
      scores = pair_scores(pair, qb, wb, kb, kv_lengths)
      return pair.key_index(two_stage_topk(pair.rows(scores, -jnp.inf), k))

    # A row's columns increase with the key's position (its owner's key
    # blocks in order), so the tie rule on columns is the rule on keys.
    return chunking.map_causal_pairs(
      pair_topk, chunking.pair_chunk(query_chunk), (q_idx, weights), (k_idx,)
    )
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)

  def block(start, seen, qb, wb):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    scores = masked_scores(qb, k_idx[:, :seen], wb, q_pos, kv_lengths)
    # Exact over the prefix: the keys past `seen` are invisible to the
    # block, and indices are absolute, so the selection is unchanged.
    return two_stage_topk(scores, k)

  return chunking.map_causal_segments(
    block, query_chunk, q_offset, num_keys, q_idx, weights
  )
