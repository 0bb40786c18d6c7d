"""NSA: Native Sparse Attention (Yuan et al. 2025, DeepSeek; arXiv 2502.11089).

Three branches per query t, each with its own keys and values (sec. 3.3.3:
independent K/V per branch, so that the branches do not shortcut through
one another), mixed by per-head gates in [0, 1] (eq. 5):

  o_t = g_cmp o_cmp + g_slc o_slc + g_win o_win

  compressed  (eq. 7) block m of the compressed branch's keys covers tokens
              m*d .. m*d + l - 1 (length l = cmp_block, stride d =
              cmp_stride) and is summarised by phi: the paper's learnable
              MLP with intra-block position encoding, or mean-pooling
              (`compress_k` / `compress_v` callables [B, N, G, l, D] ->
              [B, N, G, D]; default mean). A compressed block is visible only
              when it is fully in the past: m*d + l - 1 <= t.
  selected    (eqs. 8-12) keys in selection blocks of l' = select_block
              tokens. The importance of block j comes from the compressed
              branch's attention probabilities p_cmp (eq. 8), summed over
              the heads of the kv group (eq. 10), and, when the blockings
              differ, spread over the selection blocks by eq. 9: compressed
              block m adds p_cmp[m] once per stride-sized piece of it that
              lies in block j, i.e. with weight |block m & block j| / d
              (l / d pieces per compressed block; with l = l' = d this is
              p_slc = p_cmp). Eq. 9's double sum has exactly these weights
              (1, 2, .., 2, 1 for l = 32, d = 16, l' = 64) over the
              l'/d + l/d - 1 compressed blocks that overlap block j; we
              align that window to those blocks (read literally with 0-based
              indices, l'j/d - m - n would credit block j with blocks that
              end before it starts). Each kv group keeps `num_selected`
              blocks (eq. 11) among those that start at or before t: the
              `num_initial` first blocks and the `num_local` most recent
              ones (the current block and those before it) always, as in the
              paper's setup (1 initial + 2 local of 16), then the most
              important others. Attention inside them is causal (eq. 12).
  window      the last `window` keys of the window branch (sec. 3.3.3).

The selection is a hard top-n (no gradient through it), as in NSA; the
compressed keys learn through the compressed branch. The pure function's
defaults are the paper's sizes (l = 32, d = 16, l' = 64, n = 16, w = 512,
1 initial + 2 local blocks); the layer's presets are scaled down for CPU
(docs/baselines.md).

Dense equivalence: with num_selected >= ceil(S / select_block) the selected
branch alone is dense causal attention over its keys, so gates = (0, 1, 0)
give dense attention (used by the tests).
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


def selection_weights(
  n_cmp: int, n_sel: int, cmp_block: int, cmp_stride: int, select_block: int
) -> jax.Array:
  """f32[N, M]: eq. 9's weight of compressed block m in selection block j,
  |tokens of block m in block j| / d (the number of stride-sized pieces of
  block m inside block j when d divides l and l')."""
  m = np.arange(n_cmp)[:, None]
  j = np.arange(n_sel)[None, :]
  lo = np.maximum(m * cmp_stride, j * select_block)
  hi = np.minimum(m * cmp_stride + cmp_block, (j + 1) * select_block)
  return jnp.asarray(np.maximum(hi - lo, 0) / cmp_stride, jnp.float32)


def check_nsa_sizes(
  cmp_block,
  cmp_stride,
  select_block,
  num_selected,
  window,
  num_initial=0,
  num_local=1,
):
  """ValueError unless the block sizes are positive ints with stride <= block
  and the always-selected blocks fit in num_selected."""
  for name, value in (
    ("cmp_block", cmp_block),
    ("cmp_stride", cmp_stride),
    ("select_block", select_block),
    ("num_selected", num_selected),
    ("window", window),
    ("num_local", num_local),
  ):
    checks.check_positive_int(name, value)
  if not isinstance(num_initial, int) or num_initial < 0:
    raise ValueError(f"num_initial must be an int >= 0, got {num_initial!r}.")
  if cmp_stride > cmp_block:
    raise ValueError(
      f"cmp_stride={cmp_stride} must be <= cmp_block="
      f"{cmp_block} (blocks must cover every key)."
    )
  if num_initial + num_local > num_selected:
    raise ValueError(
      f"num_initial={num_initial} + num_local={num_local} always-selected "
      f"blocks do not fit in num_selected={num_selected}."
    )


def _check_nsa(gates, qs, *sizes):
  check_nsa_sizes(*sizes)
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
  num_initial: int = 1,
  num_local: int = 2,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
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
  num_initial: int = 1,
  num_local: int = 2,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
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
  num_initial: int = 1,
  num_local: int = 2,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
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
  num_initial: int = 1,
  num_local: int = 2,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
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
  num_initial: int = 1,
  num_local: int = 2,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
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
  num_initial: int = 1,
  num_local: int = 2,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
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
      n (the always-selected ones included). window: sliding-window size w.
    num_initial, num_local: blocks always selected: the first num_initial
      blocks and the num_local most recent ones (the query's own block and
      those before it); the paper's setup is 1 and 2.
    compress_k, compress_v: phi, [B, N, G, l, D] -> [B, N, G, D]; default
      mean-pooling.
    kv_compressed, kv_window: (k, v) of the compressed and window branches,
      [B, S, G, D] / [B, S, G, Dv] like k / v (default: k, v, which are the
      selected branch's). The NSA layer passes independent K/V per branch.
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
    gates,
    qs,
    cmp_block,
    cmp_stride,
    select_block,
    num_selected,
    window,
    num_initial,
    num_local,
  )
  k_cmp, v_cmp = (k, v) if kv_compressed is None else kv_compressed
  k_win, v_win = (k, v) if kv_window is None else kv_window
  for name, (kb, vb) in (
    ("kv_compressed", (k_cmp, v_cmp)),
    ("kv_window", (k_win, v_win)),
  ):
    if kb.shape != k.shape or vb.shape != v.shape:
      raise ValueError(
        f"{name} shapes {kb.shape}, {vb.shape} must equal k / v shapes "
        f"{k.shape}, {v.shape}."
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

  # (kc, vc, cmp_end, eq. 9 weights); None when no compressed block fits.
  compressed = None
  if n_cmp > 0:
    compressed = (
      compress_k(compression_windows(k_cmp, cmp_block, cmp_stride)),
      compress_v(compression_windows(v_cmp, cmp_block, cmp_stride)),
      jnp.arange(n_cmp, dtype=jnp.int32) * cmp_stride + cmp_block - 1,
      selection_weights(n_cmp, n_sel, cmp_block, cmp_stride, select_block),
    )
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(
      num_q, num_heads * (2 * max(n_cmp, 1) + n_sel), ATTN_BUDGET
    )

  def block(start, qb):
    c = qb.shape[1]
    q_pos = offset[:, None] + start + jnp.arange(c, dtype=jnp.int32)
    if compressed is not None:
      kc, vc, cmp_end, weights = compressed
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
      importance = jnp.einsum("bcgrn,nm->bcgm", probs, weights)
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
    local = (blk <= cur) & (blk > cur - num_local)
    forced = cand & ((blk < num_initial) | local)
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
    k_win,
    v_win,
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
