"""NSA: Native Sparse Attention (Yuan et al. 2025, DeepSeek).

Three branches per query, mixed by per-head sigmoid gates g[B, T, H, 3]
(projected from x by the layer):  o = g_cmp o_cmp + g_slc o_slc + g_win o_win.

  compressed  keys/values summarised per block of `cmp_block` tokens taken
              every `cmp_stride` tokens (block m covers m*d .. m*d + l - 1)
              by mean-pooling or a small learned MLP (`compress_k` /
              `compress_v` callables [B, N, G, l, D] -> [B, N, G, D]). A
              compressed block is visible only when it is fully in the past:
              m*d + l - 1 <= i (and below kv_lengths).
  selected    keys split into selection blocks of `select_block` tokens.
              Importance of selection block j = the compressed attention
              probabilities summed over the heads of the kv group and over
              the compressed blocks that overlap j (NSA eq. 9, which reduces
              to p_cmp when cmp_block = cmp_stride = select_block). Each kv
              group keeps the top `num_selected` blocks among those that start
              at or before the query, always including the query's own
              (current) block; attention inside them is causal.
  window      sliding window of the last `window` keys.

The selection is a hard top-k (no gradient through it), as in NSA; the
compressed keys learn through the compressed branch.

Dense equivalence: with num_selected >= ceil(S / select_block) the selected
branch alone is dense causal attention, so gates = (0, 1, 0) give dense
attention (used by the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.kinds.patterns import (
  block_sparse_attention,
  sliding_window_attention,
  topk_blocks,
)
from sparse_attn.ops import checks, chunking, masking
from sparse_attn.ops.attention import (
  ATTN_BUDGET,
  check_qkv,
  default_scale,
  group_heads,
  masked_softmax,
)

BRANCHES = ("compressed", "selected", "window")


def num_compressed_blocks(
  num_keys: int, cmp_block: int, cmp_stride: int
) -> int:
  """Blocks m with m*d + l <= S (blocks reaching past S are never visible)."""
  if num_keys < cmp_block:
    return 0
  return (num_keys - cmp_block) // cmp_stride + 1


def compression_windows(
  x: jax.Array, cmp_block: int, cmp_stride: int
) -> jax.Array:
  """x [B, S, G, D] -> [B, N, G, l, D]: the tokens of each compressed block."""
  n = num_compressed_blocks(x.shape[1], cmp_block, cmp_stride)
  idx = np.arange(n)[:, None] * cmp_stride + np.arange(cmp_block)[None]
  w = x[:, idx]  # [B, N, l, G, D]
  return jnp.swapaxes(w, 2, 3)


def mean_compress(windows: jax.Array) -> jax.Array:
  """[B, N, G, l, D] -> [B, N, G, D] mean-pool."""
  return jnp.mean(windows.astype(jnp.float32), axis=3).astype(windows.dtype)


def _overlap(n_cmp, n_sel, cmp_block, cmp_stride, select_block):
  """f32[N, M]: 1 where compressed block m overlaps selection block j."""
  m = np.arange(n_cmp)[:, None]
  j = np.arange(n_sel)[None, :]
  start, end = m * cmp_stride, m * cmp_stride + cmp_block - 1
  ov = (start <= (j + 1) * select_block - 1) & (end >= j * select_block)
  return jnp.asarray(ov, jnp.float32)


def check_nsa_sizes(cmp_block, cmp_stride, select_block, num_selected, window):
  """ValueError unless the block sizes are positive ints with stride <= block."""
  for name, value in (
    ("cmp_block", cmp_block),
    ("cmp_stride", cmp_stride),
    ("select_block", select_block),
    ("num_selected", num_selected),
    ("window", window),
  ):
    checks.check_positive_int(name, value)
  if cmp_stride > cmp_block:
    raise ValueError(
      f"cmp_stride={cmp_stride} must be <= cmp_block="
      f"{cmp_block} (blocks must cover every key)."
    )


def _check_nsa(
  gates, qs, cmp_block, cmp_stride, select_block, num_selected, window
):
  check_nsa_sizes(cmp_block, cmp_stride, select_block, num_selected, window)
  gs = checks.check_rank("gates", gates, 4, "[B, T, H, 3]")
  if gs != qs[:3] + (3,):
    raise ValueError(
      f"gates shape {gs} must be [B, T, H, 3] = "
      f"{qs[:3] + (3,)} for q shape {qs}."
    )


@overload
def nsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gates: jax.Array,
  *,
  cmp_block: int = 32,
  cmp_stride: int = 16,
  select_block: int = 64,
  num_selected: int = 16,
  window: int = 512,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  implementation: str | None = None,
  block_sizes=None,
  return_branches: Literal[False] = False,
  return_counts: Literal[False] = False,
) -> jax.Array: ...


@overload
def nsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gates: jax.Array,
  *,
  cmp_block: int = 32,
  cmp_stride: int = 16,
  select_block: int = 64,
  num_selected: int = 16,
  window: int = 512,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  implementation: str | None = None,
  block_sizes=None,
  return_branches: Literal[False] = False,
  return_counts: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def nsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gates: jax.Array,
  *,
  cmp_block: int = 32,
  cmp_stride: int = 16,
  select_block: int = 64,
  num_selected: int = 16,
  window: int = 512,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  implementation: str | None = None,
  block_sizes=None,
  return_branches: Literal[True],
  return_counts: Literal[False] = False,
) -> tuple[jax.Array, dict[str, jax.Array]]: ...


@overload
def nsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gates: jax.Array,
  *,
  cmp_block: int = 32,
  cmp_stride: int = 16,
  select_block: int = 64,
  num_selected: int = 16,
  window: int = 512,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  implementation: str | None = None,
  block_sizes=None,
  return_branches: Literal[True],
  return_counts: Literal[True],
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]: ...


@overload
def nsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gates: jax.Array,
  *,
  cmp_block: int = 32,
  cmp_stride: int = 16,
  select_block: int = 64,
  num_selected: int = 16,
  window: int = 512,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  implementation: str | None = None,
  block_sizes=None,
  return_branches: bool = False,
  return_counts: bool = False,
) -> (
  jax.Array
  | tuple[jax.Array, dict[str, jax.Array]]
  | tuple[jax.Array, jax.Array]
  | tuple[jax.Array, dict[str, jax.Array], jax.Array]
): ...


def nsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  gates: jax.Array,
  *,
  cmp_block: int = 32,
  cmp_stride: int = 16,
  select_block: int = 64,
  num_selected: int = 16,
  window: int = 512,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  implementation: str | None = None,
  block_sizes=None,
  return_branches: bool = False,
  return_counts: bool = False,
) -> (
  jax.Array
  | tuple[jax.Array, dict[str, jax.Array]]
  | tuple[jax.Array, jax.Array]
  | tuple[jax.Array, dict[str, jax.Array], jax.Array]
):
  """Native Sparse Attention [B, T, H, Dv].

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv].
    gates: [B, T, H, 3] branch weights (compressed, selected, window),
      typically sigmoid outputs.
    cmp_block, cmp_stride: compression block length l and stride d (d <= l).
    select_block, num_selected: selection block size l' and blocks per query
      (current block included). window: sliding-window size w.
    compress_k, compress_v: [B, N, G, l, D] -> [B, N, G, D]; default mean.
    q_offset, kv_lengths, scale: as `dense_attention`.
    implementation, block_sizes: the window branch's gathered attention
      ("xla", "pallas", None = platform default; its kernel's BlockSizes).
    return_branches: also return a dict with the three branch outputs and the
      selection int32[B, T, G, num_selected].
    return_counts: also return f32[B, T] keys attended per query (mean over
      heads), summed over the three branches (compressed keys count as keys).
  """
  qs, ks, vs = check_qkv(q, k, v, q_offset, kv_lengths)
  _check_nsa(
    gates, qs, cmp_block, cmp_stride, select_block, num_selected, window
  )
  batch, num_q, num_heads, head_dim = qs
  num_keys, num_kv = ks[1], ks[2]
  scale = default_scale(scale, head_dim)
  compress_k = compress_k or mean_compress
  compress_v = compress_v or mean_compress
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  n_cmp = num_compressed_blocks(num_keys, cmp_block, cmp_stride)
  n_sel = -(-num_keys // select_block)
  acc = checks.acc_dtype(q)
  blk = jnp.arange(n_sel, dtype=jnp.int32)

  # (kc, vc, cmp_end, overlap); None when no compressed block fits in S.
  compressed = None
  if n_cmp > 0:
    compressed = (
      compress_k(compression_windows(k, cmp_block, cmp_stride)),
      compress_v(compression_windows(v, cmp_block, cmp_stride)),
      jnp.arange(n_cmp, dtype=jnp.int32) * cmp_stride + cmp_block - 1,
      _overlap(n_cmp, n_sel, cmp_block, cmp_stride, select_block),
    )
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(
      num_q, num_heads * (2 * max(n_cmp, 1) + n_sel), ATTN_BUDGET
    )

  def block(start, qb):
    c = qb.shape[1]
    q_pos = offset[:, None] + start + jnp.arange(c, dtype=jnp.int32)
    if compressed is not None:
      kc, vc, cmp_end, overlap = compressed
      qg = group_heads(qb, num_kv)
      logits = (
        jnp.einsum("bcgrd,bngd->bcgrn", qg, kc, preferred_element_type=acc)
        * scale
      )
      valid = cmp_end <= q_pos[:, :, None]  # [B, C, N]
      if kv_lengths is not None:
        kv = jnp.asarray(kv_lengths, jnp.int32)
        valid = valid & (cmp_end < kv[:, None, None])
      probs, _ = masked_softmax(logits, valid[:, :, None, None, :])
      o_cmp = jnp.einsum(
        "bcgrn,bngv->bcgrv",
        probs.astype(v.dtype),
        vc,
        preferred_element_type=acc,
      )
      o_cmp = o_cmp.reshape(batch, c, num_heads, vs[3]).astype(q.dtype)
      importance = jnp.einsum("bcgrn,nm->bcgm", probs, overlap)
      n_cmp_keys = jnp.sum(valid, axis=-1).astype(jnp.float32)
    else:
      o_cmp = jnp.zeros((batch, c, num_heads, vs[3]), q.dtype)
      importance = jnp.zeros((batch, c, num_kv, n_sel), jnp.float32)
      n_cmp_keys = jnp.zeros((batch, c), jnp.float32)
    cur = (q_pos // select_block)[:, :, None, None]
    cand = blk * select_block <= q_pos[:, :, None, None]
    if kv_lengths is not None:
      kv = jnp.asarray(kv_lengths, jnp.int32)[:, None, None, None]
      cand = cand & (blk * select_block < kv)
    forced = (blk == cur) & (cur < n_sel)
    sel = topk_blocks(importance, forced, cand, num_selected)
    return o_cmp, sel, n_cmp_keys

  o_cmp, sel, n_cmp_keys = chunking.map_query_chunks(block, query_chunk, q)
  sel = jax.lax.stop_gradient(sel)
  o_slc, n_slc = block_sparse_attention(
    q,
    k,
    v,
    sel[:, :, :, None, :],
    block_size=select_block,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    scale=scale,
    return_counts=True,
  )
  o_win, n_win = sliding_window_attention(
    q,
    k,
    v,
    window=window,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    scale=scale,
    implementation=implementation,
    block_sizes=block_sizes,
    return_counts=True,
  )
  g = gates.astype(acc)
  o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
  o = o.astype(q.dtype)
  branches = {
    "compressed": o_cmp,
    "selected": o_slc,
    "window": o_win,
    "selection": sel,
  }
  if return_branches and return_counts:
    return o, branches, n_cmp_keys + n_slc + n_win
  if return_branches:
    return o, branches
  if return_counts:
    return o, n_cmp_keys + n_slc + n_win
  return o


def nsa_keys_per_query(
  seq_len: int,
  *,
  cmp_block: int,
  cmp_stride: int,
  select_block: int,
  num_selected: int,
  window: int,
) -> np.ndarray:
  """Keys per query, summed over the branches:

  compressed: #{m : m*d + l - 1 <= i} = floor((i - l + 1) / d) + 1 if i >= l-1
  selected:   (i mod l') + 1 + min(n - 1, floor(i / l')) * l'
  window:     min(w, i + 1)
  """
  i = np.arange(seq_len)
  cmp = np.where(i >= cmp_block - 1, (i - cmp_block + 1) // cmp_stride + 1, 0)
  slc = (
    i % select_block
    + 1
    + np.minimum(num_selected - 1, i // select_block) * select_block
  )
  win = np.minimum(window, i + 1)
  return (cmp + slc + win).astype(np.float64)
