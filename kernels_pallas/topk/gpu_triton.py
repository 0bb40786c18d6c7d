"""Indexer scores in Pallas Triton + XLA top_k: the GPU formulation.

A Pallas kernel computes fused score tiles for a chunk of queries
([B, gpu_chunk_t, S_pad] at a time, lax.map over chunks, so memory is
O(gpu_chunk_t * S)), then XLA's lax.top_k (native on GPU) selects.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_
from kernels_pallas.topk.reference import select_topk_reference

_NEG_INF = float("-inf")

DEFAULTS = dict(
  block_t=16, block_s=64, gpu_chunk_t=256, num_warps=4, num_stages=2
)


def fill_defaults(bs):
  return bk_.fill_none(bs, DEFAULTS)


def check_block_sizes(bs) -> None:
  for f in ("block_t", "block_s"):
    v = getattr(bs, f)
    if v < 16 or v & (v - 1):
      raise ValueError(
        f"BlockSizes.{f}={v} must be a power of two >= 16 on GPU"
      )


def _scores_gpu_kernel(
  qoff_ref,
  kvlen_ref,
  q_ref,
  w_ref,
  k_ref,
  o_ref,
  *,
  HI,
  HIp,
  DI,
  DIp,
  S,
  bt,
  bs,
  t_base,
):
  b, ti, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t0 = ti * bt
  s0 = si * bs
  rows = jnp.arange(bt) + t0 + t_base
  cols = jnp.arange(bs) + s0
  dr = jnp.arange(DIp)
  dmask = dr < DI
  dc = jnp.minimum(dr, DI - 1)
  Sk = k_ref.shape[1]
  kk = bk_.gpu_masked_load(
    k_ref.at[b, jnp.minimum(cols, Sk - 1)[:, None], dc[None, :]],
    mask=(cols < Sk)[:, None] & dmask[None, :],
    other=0.0,
  )
  Tq = q_ref.shape[2]
  trow = jnp.arange(bt) + t0
  tmask = trow < Tq
  tc = jnp.minimum(trow, Tq - 1)

  def head(j, acc):
    qj = bk_.gpu_masked_load(
      q_ref.at[b, j, tc[:, None], dc[None, :]],
      mask=tmask[:, None] & dmask[None, :],
      other=0.0,
    )
    wj = bk_.gpu_masked_load(w_ref.at[b, j, tc], mask=tmask, other=0.0)
    d = jnp.dot(qj, kk.T, preferred_element_type=jnp.float32)
    return acc + wj.astype(jnp.float32)[:, None] * jnp.maximum(d, 0.0)

  acc = jax.lax.fori_loop(0, HI, head, jnp.zeros((bt, bs), jnp.float32))
  qoff = qoff_ref[b]
  kvl = kvlen_ref[b]
  vis = (
    (cols[None, :] <= qoff + rows[:, None])
    & (cols[None, :] < kvl)
    & (cols[None, :] < S)
  )
  o_ref[0] = jnp.where(vis, acc, _NEG_INF)


def topk(q_idx, k_idx, weights, q_off, kv_len, K, *, bs, interpret):
  """int32[B, T, K] (descending score, the more recent first among equal
  scores: select_topk_reference; -1 past the visible keys)."""
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
    kernel = functools.partial(
      _scores_gpu_kernel,
      HI=HI,
      HIp=HIp,
      DI=DI,
      DIp=DIp,
      S=S,
      bt=bt,
      bs=bsz,
      t_base=0,
    )
    qo = (
      q_off + c * tc
    )  # shift positions so row r of the chunk is query c*tc + r
    sc = pl.pallas_call(
      kernel,
      grid=(B, tc // bt, Sp // bsz),
      in_specs=[pl.BlockSpec(memory_space=any_)] * 5,
      out_specs=pl.BlockSpec((1, bt, bsz), lambda b, t, s: (b, t, s)),
      out_shape=bk_.out_struct(
        (B, tc, Sp), jnp.float32, qo, kv_len, qc, wc, k_idx
      ),
      compiler_params=bk_.gpu_compiler_params(bs.num_warps, bs.num_stages),
      interpret=interpret,
      name="lightning_scores_gpu",
    )(qo, kv_len, qc, wc, k_idx)
    return select_topk_reference(sc, K)

  out = jax.lax.map(
    one_chunk, (jnp.arange(nc, dtype=jnp.int32), qt, wt)
  )  # [nc, B, tc, K]
  return out.transpose(1, 0, 2, 3).reshape(B, Tp, K)[:, :T]
