"""Fixed sparsity patterns: Sparse Transformer (strided / fixed), sliding window.

Sparse Transformer (Child et al. 2019, "Generating Long Sequences with Sparse
Transformers"), causal, stride l. For the query at absolute position i and the
key at position j (always j <= i):

  strided  A (local):    i - l <= j <= i       (l + 1 keys: t = max(0, i - l)
                                                 .. i, the paper's A(1))
           B (stride):   (i - j) mod l == 0
  fixed    A (block):    floor(j / l) == floor(i / l)
           B (summary):  j mod l >= l - c        (the last c keys of every block)

The two patterns of a kind are combined in one of three ways (`combine`):
  "merged"     one pattern, the union A | B, for every head of every layer;
  "alternate"  layer parity picks the pattern: even layer_index -> A, odd -> B;
  "split"      heads split: heads h < ceil(H / 2) use A, the others B.

Sliding-window local attention with window w: i - w < j <= i (the strided
local pattern with l = w - 1).

Mask functions take absolute query positions int[..., T] and key positions
int[S] and return bool[..., T, S] (pattern AND causal; padding is the
caller's, see `masking.visible`). They are elementwise in (i, j), so a block
layout for a block-sparse kernel is `block_layout(mask, bq, bk)`.

Attention: `sparse_transformer_attention` is a memory-bounded XLA path with
the shared dense body `attention.dense_block`, over the queries as
`chunking.map_causal_segments` splits them: in training (a static offset,
T x S within the budget) causal segments over the key prefix each can see;
otherwise `query_chunk` queries at a time over all S keys (peak memory
O(chunk * S * H), rematerialised under autodiff). `sliding_window_attention`
gathers the w keys of each query (`attention.gathered_attention`: O(T * w)
memory, and the Pallas gathered kernel on accelerators).

Key budgets (keys per query, causal, no padding) are in `*_keys_per_query`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.ops import checks, chunking, masking
from sparse_attn.ops.attention import (
  ATTN_BUDGET,
  check_qkv,
  default_scale,
  dense_block,
  gathered_attention,
  group_heads,
  masked_softmax,
)

PATTERNS = ("strided", "fixed")
COMBINES = ("merged", "alternate", "split")


def _pair(q_pos, key_pos):
  """Broadcasts q_pos [..., T] and key_pos [S] to [..., T, 1] and [S]."""
  q_pos = jnp.asarray(q_pos, jnp.int32)
  key_pos = jnp.asarray(key_pos, jnp.int32)
  return q_pos[..., :, None], key_pos


# --------------------------------------------------------------------------
# Mask functions: bool[..., T, S] = pattern(i, j) & (j <= i).


def causal_mask(q_pos, key_pos):
  i, j = _pair(q_pos, key_pos)
  return j <= i


def sliding_window_mask(q_pos, key_pos, window: int):
  """i - window < j <= i."""
  i, j = _pair(q_pos, key_pos)
  return (j <= i) & (j > i - window)


def strided_local_mask(q_pos, key_pos, stride: int):
  """Strided pattern A (Child et al. 2019, sec. 4.2: A(1)_i = {t, t+1, ...,
  i} for t = max(0, i - l)): i - l <= j <= i, l + 1 keys."""
  return sliding_window_mask(q_pos, key_pos, stride + 1)


def strided_stride_mask(q_pos, key_pos, stride: int):
  """Strided pattern B: every l-th position back, (i - j) mod l == 0."""
  i, j = _pair(q_pos, key_pos)
  return (j <= i) & (jnp.mod(i - j, stride) == 0)


def fixed_block_mask(q_pos, key_pos, stride: int):
  """Fixed pattern A: own block, floor(j / l) == floor(i / l)."""
  i, j = _pair(q_pos, key_pos)
  return (j <= i) & (j // stride == i // stride)


def fixed_summary_mask(q_pos, key_pos, stride: int, summary: int):
  """Fixed pattern B: summary columns, j mod l >= l - c."""
  i, j = _pair(q_pos, key_pos)
  return (j <= i) & (jnp.mod(j, stride) >= stride - summary)


def check_pattern(pattern, stride, summary, combine):
  if pattern not in PATTERNS:
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}.")
  if combine not in COMBINES:
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}.")
  stride = checks.check_positive_int("stride", stride)
  summary = checks.check_positive_int("summary", summary)
  if pattern == "fixed" and summary > stride:
    raise ValueError(f"summary c={summary} must be <= stride l={stride}.")
  return stride, summary


def pattern_masks(
  pattern: str, q_pos, key_pos, *, stride: int, summary: int = 1
):
  """(A, B) bool[..., T, S] masks of a Sparse Transformer pattern."""
  stride, summary = check_pattern(pattern, stride, summary, "merged")
  if pattern == "strided":
    return (
      strided_local_mask(q_pos, key_pos, stride),
      strided_stride_mask(q_pos, key_pos, stride),
    )
  return (
    fixed_block_mask(q_pos, key_pos, stride),
    fixed_summary_mask(q_pos, key_pos, stride, summary),
  )


def heads_using_a(num_heads: int) -> int:
  """Heads that use pattern A under combine="split" (the first ceil(H/2))."""
  return (num_heads + 1) // 2


def sparse_transformer_mask(
  pattern: str,
  q_pos,
  key_pos,
  *,
  num_heads: int,
  stride: int,
  summary: int = 1,
  combine: str = "merged",
  layer_index: int = 0,
):
  """bool[..., H, T, S]: the combined pattern (and causal) for every head."""
  stride, summary = check_pattern(pattern, stride, summary, combine)
  a, b = pattern_masks(pattern, q_pos, key_pos, stride=stride, summary=summary)
  a, b = a[..., None, :, :], b[..., None, :, :]
  shape = a.shape[:-3] + (num_heads,) + a.shape[-2:]
  if combine == "merged":
    m = a | b
  elif combine == "alternate":
    m = a if layer_index % 2 == 0 else b
  else:
    use_a = jnp.arange(num_heads) < heads_using_a(num_heads)
    m = jnp.where(use_a[:, None, None], a, b)
  return jnp.broadcast_to(m, shape)


def block_layout(mask, block_q: int, block_k: int):
  """bool[..., T/bq, S/bk]: which (query block, key block) tiles are non-empty.

  The tile list a block-sparse kernel would iterate; T and S are padded up to
  multiples of the block sizes.
  """
  mask = jnp.asarray(mask)
  t, s = mask.shape[-2:]
  nq, nk = -(-t // block_q), -(-s // block_k)
  pad = [(0, 0)] * (mask.ndim - 2) + [
    (0, nq * block_q - t),
    (0, nk * block_k - s),
  ]
  m = jnp.pad(mask, pad)
  m = m.reshape(*m.shape[:-2], nq, block_q, nk, block_k)
  return jnp.any(m, axis=(-3, -1))


# --------------------------------------------------------------------------
# Attention.


@overload
def masked_pattern_attention(
  q,
  k,
  v,
  mask_fn: Callable,
  *,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: Literal[False] = False,
) -> jax.Array: ...


@overload
def masked_pattern_attention(
  q,
  k,
  v,
  mask_fn: Callable,
  *,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def masked_pattern_attention(
  q,
  k,
  v,
  mask_fn: Callable,
  *,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def masked_pattern_attention(
  q,
  k,
  v,
  mask_fn: Callable,
  *,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Softmax attention under an arbitrary per-head mask, chunked over queries.

  mask_fn(q_pos int32[B, C], key_pos int32[S']) -> bool[B, H or 1, C, S']; it
  is ANDed with causal visibility and kv_lengths padding. key_pos is
  0 .. S'-1 with S' <= S: a block gets only the key prefix it can see
  (`chunking.map_causal_segments`), so the mask must depend on positions,
  not on S. Queries with no visible key return zeros. With return_counts
  also returns f32[B, T]: keys attended per query, averaged over heads.
  """
  qs, ks, vs = check_qkv(q, k, v, q_offset, kv_lengths)
  batch, num_q, num_heads, head_dim = qs
  num_keys, num_kv = ks[1], ks[2]
  scale = default_scale(scale, head_dim)
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(
      num_q, num_keys * num_heads * 2, ATTN_BUDGET
    )

  def block(start, seen, qb):
    c = qb.shape[1]
    q_pos = offset[:, None] + start + jnp.arange(c, dtype=jnp.int32)
    key_pos = jnp.arange(seen, dtype=jnp.int32)
    pat = jnp.asarray(mask_fn(q_pos, key_pos))  # [B, H|1, C, seen]
    pat = jnp.broadcast_to(pat, (batch, pat.shape[1], c, seen))
    pat = jnp.moveaxis(pat, 1, 2)  # [B, C, H|1, seen]
    vis = masking.visible(q_pos, seen, kv_lengths)[:, :, None, :]
    valid = jnp.broadcast_to(pat & vis, (batch, c, num_heads, seen))
    valid = valid.reshape(batch, c, num_kv, num_heads // num_kv, seen)
    out, _ = dense_block(qb, k[:, :seen], v[:, :seen], valid, scale)
    counts = jnp.sum(valid, axis=(2, 3, 4)).astype(jnp.float32) / num_heads
    return out, counts

  out, counts = chunking.map_causal_segments(
    block, query_chunk, q_offset, num_keys, q
  )
  return (out, counts) if return_counts else out


@overload
def sparse_transformer_attention(
  q,
  k,
  v,
  *,
  pattern: str,
  stride: int,
  summary: int = 1,
  combine: str = "merged",
  layer_index: int = 0,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: Literal[False] = False,
) -> jax.Array: ...


@overload
def sparse_transformer_attention(
  q,
  k,
  v,
  *,
  pattern: str,
  stride: int,
  summary: int = 1,
  combine: str = "merged",
  layer_index: int = 0,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def sparse_transformer_attention(
  q,
  k,
  v,
  *,
  pattern: str,
  stride: int,
  summary: int = 1,
  combine: str = "merged",
  layer_index: int = 0,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def sparse_transformer_attention(
  q,
  k,
  v,
  *,
  pattern: str,
  stride: int,
  summary: int = 1,
  combine: str = "merged",
  layer_index: int = 0,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Sparse Transformer attention [B, T, H, Dv] (strided or fixed pattern).

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv].
    pattern: "strided" or "fixed"; stride: l; summary: c (fixed only).
    combine: "merged" | "alternate" | "split" (see module docstring);
      layer_index picks the pattern under "alternate".
    q_offset, kv_lengths, scale: as `dense_attention`.
    query_chunk: queries per block (default from a memory budget).
    return_counts: also return f32[B, T] keys per query (mean over heads).
  """
  stride, summary = check_pattern(pattern, stride, summary, combine)
  num_heads = checks.check_rank("q", q, 4, "[B, T, H, D]")[2]

  def mask_fn(q_pos, key_pos):
    return sparse_transformer_mask(
      pattern,
      q_pos,
      key_pos,
      num_heads=num_heads,
      stride=stride,
      summary=summary,
      combine=combine,
      layer_index=layer_index,
    )

  return masked_pattern_attention(
    q,
    k,
    v,
    mask_fn,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    scale=scale,
    query_chunk=query_chunk,
    return_counts=return_counts,
  )


# The window's keys (shared with CSA / HCA's window in ops.compressed).
sliding_window_indices = masking.window_indices


@overload
def sliding_window_attention(
  q,
  k,
  v,
  *,
  window: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  implementation: str | None = None,
  block_sizes=None,
  return_counts: Literal[False] = False,
) -> jax.Array: ...


@overload
def sliding_window_attention(
  q,
  k,
  v,
  *,
  window: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  implementation: str | None = None,
  block_sizes=None,
  return_counts: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def sliding_window_attention(
  q,
  k,
  v,
  *,
  window: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  implementation: str | None = None,
  block_sizes=None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def sliding_window_attention(
  q,
  k,
  v,
  *,
  window: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  implementation: str | None = None,
  block_sizes=None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Local causal attention [B, T, H, Dv]: each query sees its last `window` keys.

  Implemented as gathered attention over int32[B, T, w] indices (O(T * w)
  memory; `implementation` and `block_sizes` as in `gathered_attention`).
  return_counts also returns f32[B, T] keys per query.
  """
  window = checks.check_positive_int("window", window)
  qs, ks, _ = check_qkv(q, k, v, q_offset, kv_lengths)
  q_pos = masking.query_positions(qs[0], qs[1], ks[1], q_offset)
  idx = sliding_window_indices(q_pos, window, ks[1], kv_lengths)
  out = gathered_attention(
    q,
    k,
    v,
    idx,
    scale=scale,
    implementation=implementation,
    block_sizes=block_sizes,
  )
  if return_counts:
    return out, jnp.sum(idx >= 0, axis=-1).astype(jnp.float32)
  return out


# --------------------------------------------------------------------------
# Key budgets: keys attended by the query at position i = 0 .. n-1 of a causal
# sequence of length n (no padding), as float64[n]. Under "split" the count is
# the mean over heads; under "alternate" the mean over the two layer parities
# unless layer_index is given.


def sliding_window_keys_per_query(seq_len: int, window: int) -> np.ndarray:
  i = np.arange(seq_len)
  return np.minimum(window, i + 1).astype(np.float64)


def _combine_counts(a, b, union, combine, num_heads, layer_index):
  if combine == "merged":
    return union
  if combine == "alternate":
    if layer_index is None:
      return (a + b) / 2
    return a if layer_index % 2 == 0 else b
  if num_heads is None:
    return (a + b) / 2
  n_a = heads_using_a(num_heads)
  return (n_a * a + (num_heads - n_a) * b) / num_heads


def sparse_transformer_keys_per_query(
  seq_len: int,
  *,
  pattern: str,
  stride: int,
  summary: int = 1,
  combine: str = "merged",
  layer_index: int | None = None,
  num_heads: int | None = None,
):
  """Keys per query of a Sparse Transformer pattern (closed forms).

  strided: A = min(l+1, i+1), B = floor(i/l) + 1,
           A|B = min(l, i+1) + floor(i/l) (A and B share i and i - l)
  fixed:   A = (i mod l) + 1, B = c*floor(i/l) + max(0, (i mod l) - (l-c) + 1),
           A|B = (i mod l) + 1 + c*floor(i/l)
  """
  stride, summary = check_pattern(pattern, stride, summary, combine)
  i = np.arange(seq_len)
  l, c = stride, summary
  if pattern == "strided":
    a = np.minimum(l + 1, i + 1)
    b = i // l + 1
    union = np.minimum(l, i + 1) + i // l
  else:
    a = i % l + 1
    b = c * (i // l) + np.maximum(0, i % l - (l - c) + 1)
    union = i % l + 1 + c * (i // l)
  return _combine_counts(a, b, union, combine, num_heads, layer_index).astype(
    np.float64
  )


# --------------------------------------------------------------------------
# Block-sparse attention over selected key blocks (used by NSA and MoBA).


@overload
def block_sparse_attention(
  q,
  k,
  v,
  blocks,
  *,
  block_size: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: Literal[False] = False,
) -> jax.Array: ...


@overload
def block_sparse_attention(
  q,
  k,
  v,
  blocks,
  *,
  block_size: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def block_sparse_attention(
  q,
  k,
  v,
  blocks,
  *,
  block_size: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def block_sparse_attention(
  q,
  k,
  v,
  blocks,
  *,
  block_size: int,
  q_offset=None,
  kv_lengths=None,
  scale=None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention of each query over the keys of its selected blocks [B, T, H, Dv].

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv].
    blocks: int32[B, T, G, Rb, n] block ids per query, Rb = 1 (one selection
      shared by the H/G heads of a kv group, NSA) or Rb = H/G (one per query
      head, MoBA); -1 = empty slot. Block j holds keys j*bs .. j*bs + bs - 1;
      keys past S, after the query (causal) or past kv_lengths are dropped.
      Selected blocks must be distinct (a repeated block counts twice).
    return_counts: also return f32[B, T] keys attended (mean over heads).
  Memory O(chunk * H * n * bs) per query block: the keys are gathered.
  """
  qs, ks, vs = check_qkv(q, k, v, q_offset, kv_lengths)
  block_size = checks.check_positive_int("block_size", block_size)
  batch, num_q, num_heads, head_dim = qs
  num_keys, num_kv = ks[1], ks[2]
  reps = num_heads // num_kv
  bshape = checks.check_rank("blocks", blocks, 5, "[B, T, G, Rb, n]")
  checks.check_integer("blocks", blocks)
  if bshape[:3] != (batch, num_q, num_kv) or bshape[3] not in (1, reps):
    raise ValueError(
      f"blocks shape {bshape} must be [B, T, G, Rb, n] with "
      f"[B, T, G] = {(batch, num_q, num_kv)} and Rb in "
      f"(1, {reps})."
    )
  per_head = bshape[3] != 1 or reps == 1
  scale = default_scale(scale, head_dim)
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  n_keys = bshape[4] * block_size
  if query_chunk is None:
    per_query = (
      bshape[3] * num_kv * n_keys * (head_dim + vs[3]) + num_heads * n_keys
    )
    query_chunk = chunking.auto_chunk(num_q, per_query, ATTN_BUDGET)
  acc = checks.acc_dtype(q)
  k_t = jnp.swapaxes(k, 1, 2)  # [B, G, S, D]
  v_t = jnp.swapaxes(v, 1, 2)

  def block(start, qb, bb):
    c = qb.shape[1]
    q_pos = offset[:, None] + start + jnp.arange(c, dtype=jnp.int32)
    idx = bb[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    idx = idx.reshape(*bb.shape[:4], n_keys)  # [B,C,G,Rb,K]
    valid = (
      (jnp.repeat(bb, block_size, axis=-1) >= 0)
      & (idx >= 0)
      & (idx < num_keys)
      & (idx <= q_pos[:, :, None, None, None])
    )
    if kv_lengths is not None:
      kv = jnp.asarray(kv_lengths, jnp.int32)
      valid = valid & (idx < kv[:, None, None, None, None])
    safe = jnp.where(valid, idx, 0)
    flat = jnp.moveaxis(safe, 2, 1).reshape(batch, num_kv, -1)  # [B,G,C*Rb*K]
    kg = jnp.take_along_axis(k_t, flat[..., None], axis=2)
    vg = jnp.take_along_axis(v_t, flat[..., None], axis=2)
    kg = kg.reshape(batch, num_kv, c, bshape[3], n_keys, head_dim)
    vg = vg.reshape(batch, num_kv, c, bshape[3], n_keys, vs[3])
    qg = group_heads(qb, num_kv)  # [B,C,G,R,D]
    if per_head:
      logits = jnp.einsum(
        "bcgrd,bgcrkd->bcgrk", qg, kg, preferred_element_type=acc
      )
    else:
      logits = jnp.einsum(
        "bcgrd,bgckd->bcgrk", qg, kg[:, :, :, 0], preferred_element_type=acc
      )
    valid_h = jnp.broadcast_to(valid, (batch, c, num_kv, reps, n_keys))
    probs, _ = masked_softmax(logits * scale, valid_h)
    probs = probs.astype(v.dtype)
    if per_head:
      out = jnp.einsum(
        "bcgrk,bgcrkv->bcgrv", probs, vg, preferred_element_type=acc
      )
    else:
      out = jnp.einsum(
        "bcgrk,bgckv->bcgrv", probs, vg[:, :, :, 0], preferred_element_type=acc
      )
    out = out.reshape(batch, c, num_heads, vs[3]).astype(q.dtype)
    counts = jnp.sum(valid_h, axis=(2, 3, 4)).astype(jnp.float32) / num_heads
    return out, counts

  out, counts = chunking.map_query_chunks(block, query_chunk, q, blocks)
  return (out, counts) if return_counts else out


def topk_blocks(scores, forced, candidates, n: int):
  """int32[..., n]: the forced blocks, then the other candidate blocks by
  descending score, n in all (the forced ones must number <= n).

  scores f32[..., M]; forced / candidates bool[..., M]. Slots beyond the
  number of available blocks hold -1. Ties break toward lower block ids.
  """
  s = jnp.where(candidates, scores.astype(jnp.float32), -jnp.inf)
  s = jnp.where(forced, jnp.inf, s)
  m = s.shape[-1]
  kk = min(n, m)
  values, idx = jax.lax.top_k(s, kk)
  idx = jnp.where(jnp.isneginf(values), -1, idx).astype(jnp.int32)
  if kk < n:
    pad = [(0, 0)] * (idx.ndim - 1) + [(0, n - kk)]
    idx = jnp.pad(idx, pad, constant_values=-1)
  return idx
