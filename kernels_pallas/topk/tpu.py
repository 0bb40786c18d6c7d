"""Fused indexer scores + top-k, Mosaic TPU formulation (no sort / top_k /
scatter lowering in Mosaic).

Grid (B, T/block_t, S/block_s), the S axis sequential ("arbitrary"). Each
step computes a [block_t, block_s] score tile on the MXU (one
[block_t, DI] x [DI, block_s] matmul per indexer head, relu, weighted sum)
and stores it into a VMEM scratch holding the whole score row tile
[block_t, S_pad] (never written to HBM). At the last S step the top-k is
extracted by *iterative max extraction*: K passes over the row tile, each a
fused "remove previous winner + running elementwise (max, argmax)" sweep
followed by one cross-lane max/min reduction; winners are written into a
lane-dense [block_t, 128] register tile and stored 128 slots at a time. Only
elementwise ops, comparisons and reductions are used, so it lowers with
Mosaic. Cost: O(K * S) VPU work per query on top of the O(S*HI*DI) MXU work
of the scores; VMEM: block_t * S_pad * 4 bytes. Output order: descending
score, ties -> larger (more recent) index first, the library's tie rule.

Why not a radix select: a 32-pass bit-wise threshold search is cheaper to
*find* the K-th value (O(32*S)), but emitting the selected indices into K
compact slots needs a per-row prefix-sum + scatter, which has no cheap
Mosaic formulation (per-row dynamic lane offsets); the emission alone would
again cost O(K*S) compares. Iterative extraction is the simplest correct
kernel with the same asymptotic cost; fine for K << S, and the obvious next
step (radix threshold + blocked compaction) is noted in docs/kernels.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")

# 8 queries per step keep the [8, S] score rows in VMEM at long S.
DEFAULTS = dict(
  block_t=8, block_s=128, gpu_chunk_t=256, num_warps=4, num_stages=2
)


def fill_defaults(bs):
  return bk_.fill_none(bs, DEFAULTS)


def check_block_sizes(bs) -> None:
  bk_.check_tpu_block("BlockSizes.block_t", bs.block_t, -1, 8)
  bk_.check_tpu_block("BlockSizes.block_s", bs.block_s, -1, 128)


def _topk_tpu_kernel(
  qoff_ref,
  kvlen_ref,
  q_ref,
  w_ref,
  k_ref,
  o_ref,
  sc_ref,
  wt_sc,
  wcol_sc,
  *,
  HI,
  S,
  K,
  Kp,
  bt,
  bs,
  ns,
  wb,
):
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t0 = ti * bt

  @pl.when(si == 0)
  def _():
    # Weights arrive lane-major ([HI, queries], compact in HBM); the score
    # tiles need one per-query column per head: made once per query block.
    wt_sc[...] = w_ref[0].T  # [wb, HIp]
    wc = wt_sc[
      pl.ds(pl.multiple_of(jax.lax.rem(t0, wb), 8), bt), :
    ]  # [bt, HIp]
    head_lane = jax.lax.broadcasted_iota(jnp.int32, wc.shape, 1)

    def column(j, c):
      wcol_sc[j] = jnp.sum(
        jnp.where(head_lane == j, wc, 0.0), axis=1, keepdims=True
      )
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
      d = jax.lax.dot_general(
        q_ref[0, j],
        kk,
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
      )
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
      # Remove the previous winner and find the new (max, largest argmax):
      # among equal scores the more recent key wins (the library's tie rule).
      def blk(jb, c):
        mv, ai = c
        cols = lane + jb * bs
        x = sc_ref[jb]
        x = jnp.where(cols == prev, _NEG_INF, x)
        sc_ref[jb] = x
        upd = x >= mv  # later blocks hold larger indices: they win ties
        return jnp.where(upd, x, mv), jnp.where(upd, cols, ai)

      mv, ai = jax.lax.fori_loop(
        0,
        ns,
        blk,
        (
          jnp.full((bt, bs), _NEG_INF, jnp.float32),
          jnp.full((bt, bs), -1, jnp.int32),
        ),
      )
      m = jnp.max(mv, axis=1, keepdims=True)
      idx = jnp.max(jnp.where(mv == m, ai, -1), axis=1, keepdims=True)
      return jnp.where(m == _NEG_INF, -1, idx)

    def chunk(c, prev):
      def slot(l, carry):
        prev, acc = carry
        idx = extract(prev)
        return idx, jnp.where(lane128 == l, idx, acc)

      nslots = jnp.minimum(K - c * 128, 128)
      prev, acc = jax.lax.fori_loop(
        0, nslots, slot, (prev, jnp.full((bt, 128), -1, jnp.int32))
      )
      o_ref[0, :, pl.ds(pl.multiple_of(c * 128, 128), 128)] = acc
      return prev

    jax.lax.fori_loop(0, Kp // 128, chunk, jnp.full((bt, 1), -1, jnp.int32))


def topk(q_idx, k_idx, weights, q_off, kv_len, K, *, bs, interpret):
  """int32[B, T, K] (descending score, the more recent first among equal
  scores, -1 past the visible keys)."""
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
  wt = bk_.pad_axis(
    bk_.pad_axis(weights.astype(jnp.float32), 1, bk_.round_up(Tp, wb)), 2, HIp
  )
  wt = wt.transpose(0, 2, 1)  # [B, HIp, Tw]
  kp = bk_.pad_axis(k_idx, 1, Sp)
  pltpu = _pltpu()
  kernel = functools.partial(
    _topk_tpu_kernel, HI=HI, S=S, K=K, Kp=Kp, bt=bt, bs=bsz, ns=ns, wb=wb
  )
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(B, Tp // bt, ns),
    in_specs=[
      pl.BlockSpec((1, HI, bt, DI), lambda b, t, s, *_: (b, 0, t, 0)),
      pl.BlockSpec(
        (1, HIp, wb), lambda b, t, s, *_: (b, 0, jax.lax.div(t * bt, wb))
      ),
      pl.BlockSpec((1, bsz, DI), lambda b, t, s, *_: (b, s, 0)),
    ],
    out_specs=pl.BlockSpec((1, bt, Kp), lambda b, t, s, *_: (b, t, 0)),
    scratch_shapes=[
      pltpu.VMEM((ns, bt, bsz), jnp.float32),
      pltpu.VMEM((wb, HIp), jnp.float32),
      pltpu.VMEM((HI, bt, 1), jnp.float32),
    ],
  )
  out = pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=bk_.out_struct((B, Tp, Kp), jnp.int32, q_off, kv_len, qt, wt, kp),
    compiler_params=bk_.tpu_compiler_params(
      ("parallel", "parallel", "arbitrary")
    ),
    interpret=interpret,
    name="lightning_topk_tpu",
  )(q_off, kv_len, qt, wt, kp)
  return out[:, :T, :K]


def _pltpu():
  from jax.experimental.pallas import tpu as pltpu

  return pltpu
