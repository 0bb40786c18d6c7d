"""Fused lightning-indexer scores + top-k selection in Pallas.

I[b,t,s] = sum_j w[b,t,j] * relu(q_idx[b,t,j] . k_idx[b,s])  for visible s
(s <= q_offset[b] + t and s < kv_lengths[b]), -inf otherwise. The kernel
returns the indices of the K largest visible scores (int32[B,T,K]); slots
beyond the number of visible keys hold -1. Order in a row: TPU formulation
gives descending score (ties -> smaller index first); GPU formulation the
order of lax.top_k. Callers must not rely on the order.

TPU formulation (Mosaic has no sort / top_k / scatter lowering):
  grid (B, T/block_t, S/block_s), the S axis sequential ("arbitrary"). Each
  step computes a [block_t, block_s] score tile on the MXU (one
  [block_t, DI] x [DI, block_s] matmul per indexer head, relu, weighted sum)
  and stores it into a VMEM scratch holding the whole score row tile
  [block_t, S_pad] (never written to HBM). At the last S step the top-k is
  extracted by *iterative max extraction*: K passes over the row tile, each
  a fused "remove previous winner + running elementwise (max, argmax)" sweep
  followed by one cross-lane max/min reduction; winners are written into a
  lane-dense [block_t, 128] register tile and stored 128 slots at a time.
  Only elementwise ops, comparisons and reductions are used, so it lowers
  with Mosaic. Cost: O(K * S) VPU work per query on top of the O(S*HI*DI)
  MXU work of the scores; VMEM: block_t * S_pad * 4 bytes.
  Why not a radix select: a 32-pass bit-wise threshold search is cheaper to
  *find* the K-th value (O(32*S)), but emitting the selected indices into K
  compact slots needs a per-row prefix-sum + scatter, which has no cheap
  Mosaic formulation (per-row dynamic lane offsets); the emission alone would
  again cost O(K*S) compares. Iterative extraction is the simplest correct
  kernel with the same asymptotic cost; fine for K << S, and the obvious next
  step (radix threshold + blocked compaction) is noted in docs/kernels.md.

GPU formulation (Triton): a Pallas kernel computes fused score tiles for a
chunk of queries ([B, chunk_t, S_pad] at a time, lax.map over chunks, so
memory is O(chunk_t * S)), then XLA's lax.top_k (native on GPU) selects.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_t: queries per tile (TPU: multiple of 8; GPU: power of two >= 16).
  block_s: keys per score tile (TPU: multiple of 128; GPU: power of 2 >= 16).
  gpu_chunk_t: queries per score chunk on GPU (bounds memory)."""
  block_t: int = 8
  block_s: int = 128
  gpu_chunk_t: int = 256
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for f in ("block_t", "block_s", "gpu_chunk_t", "num_warps", "num_stages"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"BlockSizes.{f} must be a positive int, got {v!r}")

  def validate(self, platform: str) -> None:
    if platform == "tpu":
      bk_.check_tpu_block("BlockSizes.block_t", self.block_t, -1, 8)
      bk_.check_tpu_block("BlockSizes.block_s", self.block_s, -1, 128)
    else:
      for f in ("block_t", "block_s"):
        v = getattr(self, f)
        if v < 16 or v & (v - 1):
          raise ValueError(f"BlockSizes.{f}={v} must be a power of two >= 16 on GPU")


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------

def _visible(q_off, kv_len, T, S):
  t = jnp.arange(T, dtype=jnp.int32)[None, :, None]
  s = jnp.arange(S, dtype=jnp.int32)[None, None, :]
  return (s <= q_off[:, None, None] + t) & (s < kv_len[:, None, None])


def indexer_scores_reference(q_idx, k_idx, weights, *, q_offset=None, kv_lengths=None):
  """f32[B,T,S]: sum_j w * relu(q . k) for visible keys, -inf elsewhere."""
  _validate(q_idx, k_idx, weights, 1)
  B, T = q_idx.shape[:2]
  S = k_idx.shape[1]
  q_off, kv_len = bk_.normalize_positions("indexer_scores", q_offset, kv_lengths, B, T, S)
  dots = jnp.einsum("btjd,bsd->btjs", q_idx.astype(jnp.float32), k_idx.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  sc = jnp.einsum("btjs,btj->bts", jax.nn.relu(dots), weights.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return jnp.where(_visible(q_off, kv_len, T, S), sc, _NEG_INF)


def select_topk_reference(scores, k):
  """int32[B,T,K] indices of the K largest finite scores, -1 past the visible."""
  S = scores.shape[-1]
  if k > S:
    scores = bk_.pad_axis(scores, -1, k, _NEG_INF)
  vals, idx = jax.lax.top_k(scores, k)
  return jnp.where(vals == _NEG_INF, -1, idx).astype(jnp.int32)


def lightning_topk_reference(q_idx, k_idx, weights, k, *, q_offset=None, kv_lengths=None):
  return select_topk_reference(
      indexer_scores_reference(q_idx, k_idx, weights, q_offset=q_offset, kv_lengths=kv_lengths), k)


def _validate(q_idx, k_idx, weights, k):
  for name, x, r in (("q_idx", q_idx, 4), ("k_idx", k_idx, 3), ("weights", weights, 3)):
    if getattr(x, "ndim", None) != r:
      raise ValueError(f"lightning_topk: {name} must have rank {r}, got shape {getattr(x, 'shape', None)}")
  B, T, HI, DI = q_idx.shape
  if k_idx.shape[0] != B or k_idx.shape[2] != DI:
    raise ValueError(f"lightning_topk: k_idx shape {k_idx.shape} incompatible with q_idx shape "
                     f"{q_idx.shape} (expected [B,S,DI])")
  if weights.shape != (B, T, HI):
    raise ValueError(f"lightning_topk: weights shape {weights.shape} must be [B,T,HI]={(B, T, HI)}")
  for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"lightning_topk: {name} must be floating, got {x.dtype}")
  if q_idx.dtype != k_idx.dtype:
    raise ValueError(f"lightning_topk: q_idx/k_idx dtypes differ: {q_idx.dtype} vs {k_idx.dtype}")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"lightning_topk: k must be a positive int, got {k!r}")


# --------------------------------------------------------------------------
# TPU kernel
# --------------------------------------------------------------------------

def _topk_tpu_kernel(qoff_ref, kvlen_ref, q_ref, w_ref, k_ref, o_ref, sc_ref, wt_sc, wcol_sc, *,
                     HI, S, K, Kp, bt, bs, ns, wb):
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t0 = ti * bt

  @pl.when(si == 0)
  def _():
    # Weights arrive lane-major ([HI, queries], compact in HBM); the score
    # tiles need one per-query column per head: made once per query block.
    wt_sc[...] = w_ref[0].T  # [wb, HIp]
    wc = wt_sc[pl.ds(pl.multiple_of(jax.lax.rem(t0, wb), 8), bt), :]  # [bt, HIp]
    head_lane = jax.lax.broadcasted_iota(jnp.int32, wc.shape, 1)

    def column(j, c):
      wcol_sc[j] = jnp.sum(jnp.where(head_lane == j, wc, 0.0), axis=1, keepdims=True)
      return c

    jax.lax.fori_loop(0, HI, column, 0)
  # limit[r] = number of visible keys of query row r (exclusive upper bound).
  rows = jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0) + t0
  limit = jnp.minimum(jnp.minimum(qoff_ref[b] + rows + 1, kvlen_ref[b]), S)
  max_limit = jnp.minimum(jnp.minimum(qoff_ref[b] + t0 + bt, kvlen_ref[b]), S)
  s0 = si * bs

  @pl.when(s0 < max_limit)
  def _():
    kk = k_ref[0]  # [bs, DI]

    def head(j, acc):
      d = jax.lax.dot_general(q_ref[0, j], kk, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
      return acc + wcol_sc[j] * jnp.maximum(d, 0.0)  # wcol: [bt, 1]

    acc = jax.lax.fori_loop(0, HI, head, jnp.zeros((bt, bs), jnp.float32))
    cols = jax.lax.broadcasted_iota(jnp.int32, (bt, bs), 1) + s0
    sc_ref[si] = jnp.where(cols < limit, acc, _NEG_INF)

  @pl.when(s0 >= max_limit)
  def _():
    sc_ref[si] = jnp.full((bt, bs), _NEG_INF, jnp.float32)

  @pl.when(si == ns - 1)
  def _():
    lane = jax.lax.broadcasted_iota(jnp.int32, (bt, bs), 1)
    lane128 = jax.lax.broadcasted_iota(jnp.int32, (bt, 128), 1)

    def extract(prev):
      # Remove the previous winner and find the new (max, smallest argmax).
      def blk(jb, c):
        mv, ai = c
        cols = lane + jb * bs
        x = sc_ref[jb]
        x = jnp.where(cols == prev, _NEG_INF, x)
        sc_ref[jb] = x
        upd = x > mv
        return jnp.where(upd, x, mv), jnp.where(upd, cols, ai)

      mv, ai = jax.lax.fori_loop(
          0, ns, blk, (jnp.full((bt, bs), _NEG_INF, jnp.float32),
                       jnp.full((bt, bs), bk_.BIG_INDEX, jnp.int32)))
      m = jnp.max(mv, axis=1, keepdims=True)
      idx = jnp.min(jnp.where(mv == m, ai, bk_.BIG_INDEX), axis=1, keepdims=True)
      return jnp.where(m == _NEG_INF, -1, idx)

    def chunk(c, prev):
      def slot(l, carry):
        prev, acc = carry
        idx = extract(prev)
        return idx, jnp.where(lane128 == l, idx, acc)

      nslots = jnp.minimum(K - c * 128, 128)
      prev, acc = jax.lax.fori_loop(0, nslots, slot, (prev, jnp.full((bt, 128), -1, jnp.int32)))
      o_ref[0, :, pl.ds(pl.multiple_of(c * 128, 128), 128)] = acc
      return prev

    jax.lax.fori_loop(0, Kp // 128, chunk, jnp.full((bt, 1), -1, jnp.int32))


def _topk_tpu(q_idx, k_idx, weights, q_off, kv_len, K, bs: BlockSizes, interpret):
  B, T, HI, DI = q_idx.shape
  S = k_idx.shape[1]
  bt, bsz = bs.block_t, bs.block_s
  Tp, Sp, Kp = bk_.round_up(T, bt), bk_.round_up(S, bsz), bk_.round_up(K, 128)
  ns = Sp // bsz
  qt = bk_.pad_axis(q_idx, 1, Tp).transpose(0, 2, 1, 3)  # [B, HI, Tp, DI]
  # Weights as [B, HIp, Tw] f32, blocks of wb = lcm(block_t, 128) queries (or
  # all of them): a [.., T, 1] column layout would be padded to 128 lanes in
  # HBM. Each query block lies inside one weight block.
  wb = math.lcm(bt, 128)
  wb = Tp if Tp <= wb else wb
  HIp = bk_.round_up(HI, 8)
  wt = bk_.pad_axis(bk_.pad_axis(weights.astype(jnp.float32), 1, bk_.round_up(Tp, wb)), 2, HIp)
  wt = wt.transpose(0, 2, 1)  # [B, HIp, Tw]
  kp = bk_.pad_axis(k_idx, 1, Sp)
  pltpu = _pltpu()
  kernel = functools.partial(_topk_tpu_kernel, HI=HI, S=S, K=K, Kp=Kp, bt=bt, bs=bsz, ns=ns,
                             wb=wb)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, Tp // bt, ns),
      in_specs=[
          pl.BlockSpec((1, HI, bt, DI), lambda b, t, s, *_: (b, 0, t, 0)),
          pl.BlockSpec((1, HIp, wb), lambda b, t, s, *_: (b, 0, jax.lax.div(t * bt, wb))),
          pl.BlockSpec((1, bsz, DI), lambda b, t, s, *_: (b, s, 0)),
      ],
      out_specs=pl.BlockSpec((1, bt, Kp), lambda b, t, s, *_: (b, t, 0)),
      scratch_shapes=[pltpu.VMEM((ns, bt, bsz), jnp.float32),
                      pltpu.VMEM((wb, HIp), jnp.float32),
                      pltpu.VMEM((HI, bt, 1), jnp.float32)],
  )
  out = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=bk_.out_struct((B, Tp, Kp), jnp.int32, q_off, kv_len, qt, wt, kp),
      compiler_params=bk_.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="lightning_topk_tpu",
  )(q_off, kv_len, qt, wt, kp)
  return out[:, :T, :K]


def _pltpu():
  from jax.experimental.pallas import tpu as pltpu
  return pltpu


# --------------------------------------------------------------------------
# GPU kernel (scores) + XLA top_k
# --------------------------------------------------------------------------

def _scores_gpu_kernel(qoff_ref, kvlen_ref, q_ref, w_ref, k_ref, o_ref, *,
                       HI, HIp, DI, DIp, S, bt, bs, t_base):
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t0 = ti * bt
  s0 = si * bs
  rows = jnp.arange(bt) + t0 + t_base
  cols = jnp.arange(bs) + s0
  dr = jnp.arange(DIp)
  dmask = dr < DI
  dc = jnp.minimum(dr, DI - 1)
  Sk = k_ref.shape[1]
  kk = bk_.gpu_masked_load(k_ref.at[b, jnp.minimum(cols, Sk - 1)[:, None], dc[None, :]],
                           mask=(cols < Sk)[:, None] & dmask[None, :], other=0.0)
  Tq = q_ref.shape[2]
  trow = jnp.arange(bt) + t0
  tmask = trow < Tq
  tc = jnp.minimum(trow, Tq - 1)

  def head(j, acc):
    qj = bk_.gpu_masked_load(q_ref.at[b, j, tc[:, None], dc[None, :]],
                             mask=tmask[:, None] & dmask[None, :], other=0.0)
    wj = bk_.gpu_masked_load(w_ref.at[b, j, tc], mask=tmask, other=0.0)
    d = jnp.dot(qj, kk.T, preferred_element_type=jnp.float32)
    return acc + wj.astype(jnp.float32)[:, None] * jnp.maximum(d, 0.0)

  acc = jax.lax.fori_loop(0, HI, head, jnp.zeros((bt, bs), jnp.float32))
  qoff = qoff_ref[b]
  kvl = kvlen_ref[b]
  vis = (cols[None, :] <= qoff + rows[:, None]) & (cols[None, :] < kvl) & (cols[None, :] < S)
  o_ref[0] = jnp.where(vis, acc, _NEG_INF)


def _topk_gpu(q_idx, k_idx, weights, q_off, kv_len, K, bs: BlockSizes, interpret):
  B, T, HI, DI = q_idx.shape
  S = k_idx.shape[1]
  bt, bsz = bs.block_t, bs.block_s
  tc = bk_.round_up(min(bs.gpu_chunk_t, T), bt)
  nc = bk_.cdiv(T, tc)
  Tp = nc * tc
  Sp = bk_.round_up(S, bsz)
  HIp, DIp = bk_.next_power_of_2(HI), max(16, bk_.next_power_of_2(DI))
  qt = bk_.pad_axis(q_idx, 1, Tp).transpose(0, 2, 1, 3)  # [B, HI, Tp, DI]
  wt = bk_.pad_axis(weights, 1, Tp).transpose(0, 2, 1)  # [B, HI, Tp]
  qt = qt.reshape(B, HI, nc, tc, DI).transpose(2, 0, 1, 3, 4)
  wt = wt.reshape(B, HI, nc, tc).transpose(2, 0, 1, 3)
  any_ = bk_.any_memory_space()

  def one_chunk(args):
    c, qc, wc = args
    kernel = functools.partial(_scores_gpu_kernel, HI=HI, HIp=HIp, DI=DI, DIp=DIp, S=S,
                               bt=bt, bs=bsz, t_base=0)
    qo = q_off + c * tc  # shift positions so row r of the chunk is query c*tc + r
    sc = pl.pallas_call(
        kernel,
        grid=(B, tc // bt, Sp // bsz),
        in_specs=[pl.BlockSpec(memory_space=any_)] * 5,
        out_specs=pl.BlockSpec((1, bt, bsz), lambda b, t, s: (b, t, s)),
        out_shape=bk_.out_struct((B, tc, Sp), jnp.float32, qo, kv_len, qc, wc, k_idx),
        compiler_params=bk_.gpu_compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="lightning_scores_gpu",
    )(qo, kv_len, qc, wc, k_idx)
    return select_topk_reference(sc, K)

  out = jax.lax.map(one_chunk, (jnp.arange(nc, dtype=jnp.int32), qt, wt))  # [nc, B, tc, K]
  return out.transpose(1, 0, 2, 3).reshape(B, Tp, K)[:, :T]


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------

def lightning_topk(q_idx, k_idx, weights, k: int, *, q_offset=None, kv_lengths=None,
                   block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                   platform: str | None = None):
  """Fused indexer scores + top-k. Returns int32[B, T, k] (-1 past the visible keys).

  Args:
    q_idx: [B, T, HI, DI]; k_idx: [B, S, DI] (same float dtype); weights: [B, T, HI].
    k: number of keys to select (>= 1; may exceed the visible count).
    q_offset: int or int32[B]; query i sits at q_offset + i (default S - T).
    kv_lengths: int32[B] or None; keys >= kv_lengths[b] are padding.
    block_sizes: :class:`BlockSizes`. interpret: None -> interpret on CPU.
    platform: "tpu" | "gpu" formulation, None -> from the default backend.
  """
  _validate(q_idx, k_idx, weights, k)
  platform, interpret = bk_.resolve(interpret, platform)
  bs = block_sizes or (BlockSizes() if platform == "tpu" else BlockSizes(block_t=16, block_s=64))
  bs.validate(platform)
  B, T = q_idx.shape[:2]
  S = k_idx.shape[1]
  q_off, kv_len = bk_.normalize_positions("lightning_topk", q_offset, kv_lengths, B, T, S)
  q_idx = jax.lax.stop_gradient(q_idx)
  k_idx = jax.lax.stop_gradient(k_idx)
  weights = jax.lax.stop_gradient(weights)
  if platform == "tpu":
    return _topk_tpu(q_idx, k_idx, weights, q_off, kv_len, k, bs, interpret)
  return _topk_gpu(q_idx, k_idx, weights, q_off, kv_len, k, bs, interpret)
