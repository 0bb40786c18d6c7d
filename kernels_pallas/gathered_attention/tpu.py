"""Gathered sparse attention, Mosaic TPU formulation (fwd + bwd kernels).

Grid (B, T, G, K/block_k): one query token x all H/G heads of one KV group x
one block of selected keys. K/V stay in HBM (``memory_space=ANY``); the
block's indices arrive in SMEM (a blocked SMEM input, *not* scalar prefetch:
the whole [B,T,K] index array does not fit SMEM at realistic sizes) and each
row is copied with its own DMA into a VMEM buffer; a VMEM copy of the same
indices gives the validity mask as a vector. DMAs must start on a tile
boundary, so rows live in an untiled leading axis: K/V as [B,S,G,1,D]
(:func:`kv_layout`), buffer [bk,1,D]. (No double buffering yet.)

The backward recomputes p from the LSE, accumulates dq over the key blocks
in VMEM and writes every (query, slot)'s head-summed dK/dV contribution;
the caller scatter-adds those (see the package docstring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")

# A 128-lane block of selected keys per grid step; the grid runs sequentially,
# so a 256 MiB backward buffer is enough to keep chunks large.
DEFAULTS = dict(
  block_k=128,
  bwd_block_k=128,
  block_h=128,
  bwd_block_h=128,
  num_warps=4,
  num_stages=2,
  bwd_buffer_bytes=1 << 28,
)


def fill_defaults(bs):
  """``bs`` with None fields from DEFAULTS; one key block for both passes."""
  tied = bs.block_k if bs.block_k is not None else bs.bwd_block_k
  if tied is not None:  # either field sets both (a conflict fails the check)
    bs = bk_.fill_none(bs, dict(block_k=tied, bwd_block_k=tied))
  return bk_.fill_none(bs, DEFAULTS)


def check_block_sizes(bs, K: int) -> None:
  if bs.bwd_block_k != bs.block_k:
    raise ValueError(
      f"BlockSizes.bwd_block_k={bs.bwd_block_k} must equal "
      f"block_k={bs.block_k} on TPU"
    )
  if bs.block_k % 128 and bs.block_k < K:
    raise ValueError(
      f"BlockSizes.block_k={bs.block_k} must be a multiple of 128 "
      f"(TPU lane tiling) or >= K={K}"
    )


def padded_k(K: int, bs) -> int:
  """Index slots after padding: whole key blocks, or K rounded to sublanes."""
  return bk_.round_up(K, bs.block_k) if bs.block_k < K else bk_.round_up(K, 8)


def contribution_bytes(bs, G: int, hg: int, Kp: int, D: int, Dv: int) -> int:
  """Bytes of dK/dV contributions the backward writes per (batch row, query)."""
  del bs, hg  # the whole group in one program: one contribution per slot
  return G * Kp * (D + Dv) * 4


def kv_layout(k, v):
  """K/V as [B, S, G, 1, D]: each (token, group) row is its own tile row.

  TPU arrays are tiled over their two minor dims, and a DMA may only start
  at a tile boundary; a gathered row at an arbitrary token index therefore
  has to live in a leading (untiled) position, both in HBM (source) and in
  the VMEM gather buffer (destination, [bk, 1, D]). For f32 this is a
  free reinterpretation (XLA tiles it (1, 128)); bf16 tiles are (2, 128),
  so XLA copies K/V into a layout twice their size, once per call (the
  backward makes it once, outside its chunk loop). (TPU packs bf16 row pairs
  into 32-bit sublanes: one bf16 row alone is half a packed row, so it takes
  this copy or a two-row DMA plus a select.)
  """
  B, S, G = k.shape[:3]
  return k.reshape(B, S, G, 1, k.shape[-1]), v.reshape(B, S, G, 1, v.shape[-1])


def _tpu_gather_rows(b, g, S, bk, idx_smem, k_hbm, v_hbm, kbuf, vbuf, sem):
  def issue(j, c):
    i = idx_smem[0, 0, 0, j]
    i = jnp.where((i >= 0) & (i < S), i, 0)
    pltpu = _pltpu()
    pltpu.make_async_copy(k_hbm.at[b, i, g], kbuf.at[j], sem.at[0]).start()
    pltpu.make_async_copy(v_hbm.at[b, i, g], vbuf.at[j], sem.at[1]).start()
    return c

  jax.lax.fori_loop(0, bk, issue, 0)

  def wait(j, c):
    pltpu = _pltpu()
    pltpu.make_async_copy(k_hbm.at[b, 0, g], kbuf.at[0], sem.at[0]).wait()
    pltpu.make_async_copy(v_hbm.at[b, 0, g], vbuf.at[0], sem.at[1]).wait()
    return c

  jax.lax.fori_loop(0, bk, wait, 0)


def _pltpu():
  from jax.experimental.pallas import tpu as pltpu

  return pltpu


def _gathered(buf):
  """[bk, 1, D] gather buffer -> [bk, D] matrix."""
  return buf[...].reshape(buf.shape[0], buf.shape[2])


def _nt(a, b):  # a @ b.T
  return jax.lax.dot_general(
    a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
  )


def _tn(a, b):  # a.T @ b
  return jax.lax.dot_general(
    a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )


def _fwd_tpu_kernel(
  idx_smem,
  idx_vmem,
  q_ref,
  k_hbm,
  v_hbm,
  o_ref,
  lse_ref,
  kbuf,
  vbuf,
  sem,
  m_sc,
  l_sc,
  acc_sc,
  *,
  S,
  bk,
  scale,
  nk,
):
  b, g, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  _tpu_gather_rows(b, g, S, bk, idx_smem, k_hbm, v_hbm, kbuf, vbuf, sem)
  idx = idx_vmem[0, 0]  # [1, bk]
  valid = (idx >= 0) & (idx < S)
  q = q_ref[0, 0, 0]  # [hg, D]
  s = _nt(q, _gathered(kbuf)) * scale
  s = jnp.where(valid, s, _NEG_INF)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + jnp.dot(
    p.astype(vbuf.dtype), _gathered(vbuf), preferred_element_type=jnp.float32
  )
  m_sc[...] = m_new

  @pl.when(kb == nk - 1)
  def _():
    l = l_sc[...]
    ok = l > 0
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[0, 0, 0] = jnp.where(ok, acc_sc[...] / l_safe, 0.0).astype(
      o_ref.dtype
    )
    lse_ref[0, 0, 0] = jnp.where(ok, m_sc[...] + jnp.log(l_safe), 0.0)


class _TpuLayout:
  """Grid, index maps and the gather operands shared by the TPU fwd and bwd.

  Grid (B, T, G, K/bk): one query token x one KV group x one block of bk
  selected keys. Both passes take the block's indices twice (SMEM, to drive
  the row DMAs; VMEM, for the validity mask), the group's query heads, and
  K/V left in HBM, and both need the same gather scratch.
  """

  def __init__(self, qg, k, v, idx4, bs):
    self.B, self.T, self.G, self.hg, self.D = qg.shape
    self.S, self.Dv = k.shape[1], v.shape[-1]  # k, v: [B, S, G, 1, D|Dv]
    self.Kp = idx4.shape[-1]
    self.bk = bs.block_k if bs.block_k < self.Kp else self.Kp
    self.nk = self.Kp // self.bk
    self.grid = (self.B, self.T, self.G, self.nk)
    self.row_map = lambda b, t, g, j: (b, t, g, 0, 0)
    self.slot_map = lambda b, t, g, j: (b, t, g, j, 0)
    idx_map = lambda b, t, g, j: (b, t, 0, j)
    any_ = bk_.any_memory_space()
    self.gather_in_specs = [
      pl.BlockSpec((1, 1, 1, self.bk), idx_map, memory_space=bk_.smem()),
      pl.BlockSpec((1, 1, 1, self.bk), idx_map),
      pl.BlockSpec((1, 1, 1, self.hg, self.D), self.row_map),
      pl.BlockSpec(memory_space=any_),
      pl.BlockSpec(memory_space=any_),
    ]
    pltpu = _pltpu()
    self.gather_scratch = [
      pltpu.VMEM((self.bk, 1, self.D), k.dtype),
      pltpu.VMEM((self.bk, 1, self.Dv), v.dtype),
      pltpu.SemaphoreType.DMA((2,)),
    ]
    self.compiler_params = bk_.tpu_compiler_params(
      ("parallel", "parallel", "parallel", "arbitrary")
    )

  def rows(self, width):
    """BlockSpec of a per-(query, group) [hg, width] tile."""
    return pl.BlockSpec((1, 1, 1, self.hg, width), self.row_map)


def forward(qg, k, v, idxp, *, scale, bs, interpret):
  """(o [B,T,G,hg,Dv], lse f32[B,T,G,hg,1]); k, v in the :func:`kv_layout`."""
  idx4 = idxp.reshape(*qg.shape[:2], 1, -1)  # blocks of [1, 1, 1, bk]
  lay = _TpuLayout(qg, k, v, idx4, bs)
  B, T, G, hg, Dv = lay.B, lay.T, lay.G, lay.hg, lay.Dv
  pltpu = _pltpu()
  kernel = functools.partial(
    _fwd_tpu_kernel, S=lay.S, bk=lay.bk, scale=scale, nk=lay.nk
  )
  return pl.pallas_call(
    kernel,
    grid=lay.grid,
    in_specs=lay.gather_in_specs,
    out_specs=[lay.rows(Dv), lay.rows(1)],
    out_shape=[
      bk_.out_struct((B, T, G, hg, Dv), qg.dtype, idx4, qg, k, v),
      bk_.out_struct((B, T, G, hg, 1), jnp.float32, idx4, qg, k, v),
    ],
    scratch_shapes=lay.gather_scratch
    + [
      pltpu.VMEM((hg, 1), jnp.float32),
      pltpu.VMEM((hg, 1), jnp.float32),
      pltpu.VMEM((hg, Dv), jnp.float32),
    ],
    compiler_params=lay.compiler_params,
    interpret=interpret,
    name="gathered_attention_fwd_tpu",
  )(idx4, idx4, qg, k, v)


def _bwd_tpu_kernel(
  idx_smem,
  idx_vmem,
  q_ref,
  k_hbm,
  v_hbm,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  dk_ref,
  dv_ref,
  kbuf,
  vbuf,
  sem,
  dq_sc,
  *,
  S,
  bk,
  scale,
  nk,
):
  b, g, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  _tpu_gather_rows(b, g, S, bk, idx_smem, k_hbm, v_hbm, kbuf, vbuf, sem)
  idx = idx_vmem[0, 0]
  valid = (idx >= 0) & (idx < S)
  q = q_ref[0, 0, 0]
  do = do_ref[0, 0, 0]
  kk, vv = _gathered(kbuf), _gathered(vbuf)
  s = _nt(q, kk) * scale
  p = jnp.where(valid, jnp.exp(s - lse_ref[0, 0, 0]), 0.0)  # [hg, bk]
  dp = _nt(do, vv)
  ds = p * (dp - delta_ref[0, 0, 0])
  dq_sc[...] += (
    jnp.dot(ds.astype(kk.dtype), kk, preferred_element_type=jnp.float32) * scale
  )
  dk_ref[0, 0, 0] = _tn(ds.astype(q.dtype), q) * scale
  dv_ref[0, 0, 0] = _tn(p.astype(do.dtype), do)

  @pl.when(kb == nk - 1)
  def _():
    dq_ref[0, 0, 0] = dq_sc[...].astype(dq_ref.dtype)


def backward(qg, k, v, idxp, do, lse, delta, *, scale, bs, interpret):
  """(dq, dK and dV contributions f32[B,T,G,Kp,D|Dv] per slot)."""
  idx4 = idxp.reshape(*qg.shape[:2], 1, -1)  # blocks of [1, 1, 1, bk]
  lay = _TpuLayout(qg, k, v, idx4, bs)
  B, T, G, hg, D, Dv, Kp, bk = (
    lay.B,
    lay.T,
    lay.G,
    lay.hg,
    lay.D,
    lay.Dv,
    lay.Kp,
    lay.bk,
  )
  pltpu = _pltpu()
  kernel = functools.partial(
    _bwd_tpu_kernel, S=lay.S, bk=bk, scale=scale, nk=lay.nk
  )
  like = (idx4, qg, k, v, do, lse, delta)
  return pl.pallas_call(
    kernel,
    grid=lay.grid,
    in_specs=lay.gather_in_specs + [lay.rows(Dv), lay.rows(1), lay.rows(1)],
    out_specs=[
      lay.rows(D),
      pl.BlockSpec((1, 1, 1, bk, D), lay.slot_map),
      pl.BlockSpec((1, 1, 1, bk, Dv), lay.slot_map),
    ],
    out_shape=[
      bk_.out_struct((B, T, G, hg, D), qg.dtype, *like),
      bk_.out_struct((B, T, G, Kp, D), jnp.float32, *like),
      bk_.out_struct((B, T, G, Kp, Dv), jnp.float32, *like),
    ],
    scratch_shapes=lay.gather_scratch + [pltpu.VMEM((hg, D), jnp.float32)],
    compiler_params=lay.compiler_params,
    interpret=interpret,
    name="gathered_attention_bwd_tpu",
  )(idx4, idx4, qg, k, v, do, lse, delta)
