"""Gathered sparse attention (DSA main attention) in Pallas, fwd + bwd.

out[b, t, h] = softmax_j(scale * q[b,t,h] . k[b, idx_j, g(h)]) @ v[b, idx_j, g(h)]
over the selected keys idx_j = indices[b, t, j] (j < K); an index that is < 0
or >= S is ignored, a row with no valid index returns zeros (never NaN).

Tiling: one grid step handles ONE query token x ALL heads of ONE kv group
(H/G heads) x a block of ``block_k`` selected keys. The index set is shared by
every head of the group, so each gathered K/V row is loaded once and used by
H/G heads (for MQA, H/G = H = 128: a full MXU tile). Online (flash) softmax
over the K blocks, f32 accumulators, output in the input dtype; the forward
also returns the log-sum-exp used by the backward.

Gather:
* TPU (Mosaic): K/V stay in HBM (``memory_space=ANY``); the block's indices
  arrive in SMEM (a blocked SMEM input, *not* scalar prefetch: the whole
  [B,T,K] index array does not fit SMEM at realistic sizes) and each row is
  copied with its own DMA into a VMEM buffer; a VMEM copy of the same indices
  gives the validity mask as a vector. (No double buffering yet: the DMAs of
  block j+1 are not overlapped with the compute of block j.)
* GPU (Triton): pointer gather, ``k_ref.at[b, idx[:, None], g, d[None, :]]``
  with a mask; head and feature dims are padded to powers of two *inside* the
  kernel (masked loads) so K/V are never copied; outputs are padded and sliced.

Backward (jax.custom_vjp): the kernel recomputes p = exp(s - lse), produces dq
in-kernel (accumulated over K blocks) and, for every (query, slot), the
head-summed contributions dK_slot = scale * dS^T q and dV_slot = P^T dO in f32.
These are scatter-added into dK/dV with ``.at[].add`` (XLA segment-sum)
outside the kernel. To bound memory the backward runs over chunks of
``bwd_chunk_t`` queries (lax.scan), so the contribution buffer is
chunk*K*G*(D+Dv)*4 bytes. (A transposed key-major pass or GPU atomics would
avoid the buffer; not done.)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: selected keys per grid step (TPU: multiple of 128 unless it
  covers all of K; GPU: power of two >= 16). bwd_chunk_t: queries per backward
  chunk (bounds the dK/dV contribution buffer). num_warps/num_stages: Triton."""
  block_k: int = 128
  bwd_chunk_t: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for f in ("block_k", "bwd_chunk_t", "num_warps", "num_stages"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"BlockSizes.{f} must be a positive int, got {v!r}")

  def validate(self, platform: str, K: int) -> None:
    if platform == "tpu":
      if self.block_k % 128 and self.block_k < K:
        raise ValueError(f"BlockSizes.block_k={self.block_k} must be a multiple of 128 "
                         f"(TPU lane tiling) or >= K={K}")
    else:
      if self.block_k < 16 or self.block_k & (self.block_k - 1):
        raise ValueError(f"BlockSizes.block_k={self.block_k} must be a power of two >= 16 on GPU")


# --------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------

def gathered_attention_reference(q, k, v, indices, *, scale=None, return_lse=False):
  """Pure-jnp reference (materialises the gathered [B,T,K,G,D] keys)."""
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  hg = H // G
  scale = D ** -0.5 if scale is None else scale
  valid = (indices >= 0) & (indices < S)
  idx = jnp.where(valid, indices, 0)
  bidx = jnp.arange(B)[:, None, None]
  kg = k[bidx, idx].astype(jnp.float32)  # [B,T,K,G,D]
  vg = v[bidx, idx].astype(jnp.float32)
  qg = q.reshape(B, T, G, hg, D).astype(jnp.float32)
  s = jnp.einsum("btghd,btkgd->btghk", qg, kg) * scale
  s = jnp.where(valid[:, :, None, None, :], s, _NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("btghk,btkgv->btghv", p, vg) / jnp.where(l > 0, l, 1.0)
  o = o.reshape(B, T, H, -1).astype(q.dtype)
  if return_lse:
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)[..., 0]
    return o, lse.reshape(B, T, H)
  return o


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def _validate(q, k, v, indices):
  for name, x, r in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("indices", indices, 3)):
    if getattr(x, "ndim", None) != r:
      raise ValueError(f"gathered_attention: {name} must have rank {r}, got shape {getattr(x, 'shape', None)}")
  B, T, H, D = q.shape
  Bk, S, G, Dk = k.shape
  if (Bk, Dk) != (B, D):
    raise ValueError(f"gathered_attention: k shape {k.shape} incompatible with q shape {q.shape} "
                     "(expected [B,S,G,D])")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"gathered_attention: v shape {v.shape} incompatible with k shape {k.shape} "
                     "(expected [B,S,G,Dv])")
  if G < 1 or H % G:
    raise ValueError(f"gathered_attention: H % G != 0 (q shape {q.shape}, k shape {k.shape})")
  if indices.shape[:2] != (B, T) or indices.shape[2] < 1:
    raise ValueError(f"gathered_attention: indices shape {indices.shape} must be [B={B},T={T},K>=1]")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"gathered_attention: indices must be integer, got {indices.dtype}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(f"gathered_attention: {name} dtype {x.dtype} not supported (f32/bf16/f16)")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"gathered_attention: q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


# --------------------------------------------------------------------------
# TPU (Mosaic) kernels
# --------------------------------------------------------------------------

def _tpu_gather_rows(b, g, S, bk, idx_smem, k_hbm, v_hbm, kbuf, vbuf, sem):
  def issue(j, c):
    i = idx_smem[0, 0, 0, j]
    i = jnp.where((i >= 0) & (i < S), i, 0)
    pltpu = _pltpu()
    pltpu.make_async_copy(k_hbm.at[b, pl.ds(i, 1), g], kbuf.at[pl.ds(j, 1)], sem.at[0]).start()
    pltpu.make_async_copy(v_hbm.at[b, pl.ds(i, 1), g], vbuf.at[pl.ds(j, 1)], sem.at[1]).start()
    return c
  jax.lax.fori_loop(0, bk, issue, 0)

  def wait(j, c):
    pltpu = _pltpu()
    pltpu.make_async_copy(k_hbm.at[b, pl.ds(0, 1), g], kbuf.at[pl.ds(0, 1)], sem.at[0]).wait()
    pltpu.make_async_copy(v_hbm.at[b, pl.ds(0, 1), g], vbuf.at[pl.ds(0, 1)], sem.at[1]).wait()
    return c
  jax.lax.fori_loop(0, bk, wait, 0)


def _pltpu():
  from jax.experimental.pallas import tpu as pltpu
  return pltpu


def _nt(a, b):  # a @ b.T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):  # a.T @ b
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_tpu_kernel(idx_smem, idx_vmem, q_ref, k_hbm, v_hbm, o_ref, lse_ref,
                    kbuf, vbuf, sem, m_sc, l_sc, acc_sc, *, S, bk, scale, nk):
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
  s = _nt(q, kbuf[...]) * scale
  s = jnp.where(valid, s, _NEG_INF)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(vbuf.dtype), vbuf[...],
                                              preferred_element_type=jnp.float32)
  m_sc[...] = m_new

  @pl.when(kb == nk - 1)
  def _():
    l = l_sc[...]
    ok = l > 0
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[0, 0, 0] = jnp.where(ok, acc_sc[...] / l_safe, 0.0).astype(o_ref.dtype)
    lse_ref[0, 0, 0] = jnp.where(ok, m_sc[...] + jnp.log(l_safe), 0.0)


class _TpuLayout:
  """Grid, index maps and the gather operands shared by the TPU fwd and bwd.

  Grid (B, T, G, K/bk): one query token x one KV group x one block of bk
  selected keys. Both passes take the block's indices twice (SMEM, to drive
  the row DMAs; VMEM, for the validity mask), the group's query heads, and
  K/V left in HBM, and both need the same gather scratch.
  """

  def __init__(self, qg, k, v, idx4, bs: BlockSizes):
    self.B, self.T, self.G, self.hg, self.D = qg.shape
    self.S, self.Dv = k.shape[1], v.shape[-1]
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
        pltpu.VMEM((self.bk, self.D), k.dtype),
        pltpu.VMEM((self.bk, self.Dv), v.dtype),
        pltpu.SemaphoreType.DMA((2,)),
    ]
    self.compiler_params = bk_.tpu_compiler_params(
        ("parallel", "parallel", "parallel", "arbitrary"))

  def rows(self, width):
    """BlockSpec of a per-(query, group) [hg, width] tile."""
    return pl.BlockSpec((1, 1, 1, self.hg, width), self.row_map)


def _fwd_tpu(qg, k, v, idx4, *, scale, bs: BlockSizes, interpret):
  lay = _TpuLayout(qg, k, v, idx4, bs)
  B, T, G, hg, Dv = lay.B, lay.T, lay.G, lay.hg, lay.Dv
  pltpu = _pltpu()
  kernel = functools.partial(_fwd_tpu_kernel, S=lay.S, bk=lay.bk, scale=scale,
                             nk=lay.nk)
  return pl.pallas_call(
      kernel,
      grid=lay.grid,
      in_specs=lay.gather_in_specs,
      out_specs=[lay.rows(Dv), lay.rows(1)],
      out_shape=[
          bk_.out_struct((B, T, G, hg, Dv), qg.dtype, idx4, qg, k, v),
          bk_.out_struct((B, T, G, hg, 1), jnp.float32, idx4, qg, k, v),
      ],
      scratch_shapes=lay.gather_scratch + [
          pltpu.VMEM((hg, 1), jnp.float32),
          pltpu.VMEM((hg, 1), jnp.float32),
          pltpu.VMEM((hg, Dv), jnp.float32),
      ],
      compiler_params=lay.compiler_params,
      interpret=interpret,
      name="gathered_attention_fwd_tpu",
  )(idx4, idx4, qg, k, v)


def _bwd_tpu_kernel(idx_smem, idx_vmem, q_ref, k_hbm, v_hbm, do_ref, lse_ref, delta_ref,
                    dq_ref, dk_ref, dv_ref, kbuf, vbuf, sem, dq_sc, *, S, bk, scale, nk):
  b, g, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kb == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  _tpu_gather_rows(b, g, S, bk, idx_smem, k_hbm, v_hbm, kbuf, vbuf, sem)
  idx = idx_vmem[0, 0]
  valid = (idx >= 0) & (idx < S)
  q = q_ref[0, 0, 0]
  do = do_ref[0, 0, 0]
  kk, vv = kbuf[...], vbuf[...]
  s = _nt(q, kk) * scale
  p = jnp.where(valid, jnp.exp(s - lse_ref[0, 0, 0]), 0.0)  # [hg, bk]
  dp = _nt(do, vv)
  ds = p * (dp - delta_ref[0, 0, 0])
  dq_sc[...] += jnp.dot(ds.astype(kk.dtype), kk, preferred_element_type=jnp.float32) * scale
  dk_ref[0, 0, 0] = _tn(ds.astype(q.dtype), q) * scale
  dv_ref[0, 0, 0] = _tn(p.astype(do.dtype), do)

  @pl.when(kb == nk - 1)
  def _():
    dq_ref[0, 0, 0] = dq_sc[...].astype(dq_ref.dtype)


def _bwd_tpu(qg, k, v, idx4, do, lse, delta, *, scale, bs: BlockSizes, interpret):
  lay = _TpuLayout(qg, k, v, idx4, bs)
  B, T, G, hg, D, Dv, Kp, bk = (lay.B, lay.T, lay.G, lay.hg, lay.D, lay.Dv,
                                lay.Kp, lay.bk)
  pltpu = _pltpu()
  kernel = functools.partial(_bwd_tpu_kernel, S=lay.S, bk=bk, scale=scale,
                             nk=lay.nk)
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


# --------------------------------------------------------------------------
# GPU (Triton) kernels
# --------------------------------------------------------------------------

def _fwd_gpu_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    S, hg, D, Dv, hp, Dp, Dvp, bk, nk, scale):
  b, t, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hr = jnp.arange(hp)
  dr = jnp.arange(Dp)
  dvr = jnp.arange(Dvp)
  hmask = hr < hg
  dmask = dr < D
  dvmask = dvr < Dv
  q = bk_.gpu_masked_load(
      q_ref.at[b, t, g, jnp.minimum(hr, hg - 1)[:, None], jnp.minimum(dr, D - 1)[None, :]],
      mask=hmask[:, None] & dmask[None, :], other=0.0)

  def body(j, carry):
    m, l, acc = carry
    idx = idx_ref[b, t, pl.ds(j * bk, bk)]
    valid = (idx >= 0) & (idx < S)
    ic = jnp.where(valid, idx, 0)
    kk = bk_.gpu_masked_load(k_ref.at[b, ic[:, None], g, jnp.minimum(dr, D - 1)[None, :]],
                             mask=valid[:, None] & dmask[None, :], other=0.0)
    vv = bk_.gpu_masked_load(v_ref.at[b, ic[:, None], g, jnp.minimum(dvr, Dv - 1)[None, :]],
                             mask=valid[:, None] & dvmask[None, :], other=0.0)
    s = jnp.dot(q, kk.T, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[None, :], s, _NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
    return m_new, l, acc

  m0 = jnp.full((hp,), _NEG_INF, jnp.float32)
  l0 = jnp.zeros((hp,), jnp.float32)
  a0 = jnp.zeros((hp, Dvp), jnp.float32)
  m, l, acc = jax.lax.fori_loop(0, nk, body, (m0, l0, a0))
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  o_ref[0, 0, 0] = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[0, 0, 0] = jnp.where(ok, m + jnp.log(l_safe), 0.0)


def _gpu_dims(hg, D, Dv):
  return max(16, bk_.next_power_of_2(hg)), max(16, bk_.next_power_of_2(D)), max(16, bk_.next_power_of_2(Dv))


def _fwd_gpu(qg, k, v, idx3, *, scale, bs: BlockSizes, interpret):
  B, T, G, hg, D = qg.shape
  S, Dv = k.shape[1], v.shape[-1]
  Kp = idx3.shape[-1]
  bk = bs.block_k
  nk = Kp // bk
  hp, Dp, Dvp = _gpu_dims(hg, D, Dv)
  any_ = bk_.any_memory_space()
  row = lambda b, t, g: (b, t, g, 0, 0)
  kernel = functools.partial(_fwd_gpu_kernel, S=S, hg=hg, D=D, Dv=Dv, hp=hp, Dp=Dp, Dvp=Dvp,
                             bk=bk, nk=nk, scale=scale)
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, T, G),
      in_specs=[pl.BlockSpec(memory_space=any_)] * 4,
      out_specs=[pl.BlockSpec((1, 1, 1, hp, Dvp), row),
                 pl.BlockSpec((1, 1, 1, hp), lambda b, t, g: (b, t, g, 0))],
      out_shape=[bk_.out_struct((B, T, G, hp, Dvp), qg.dtype, idx3, qg, k, v),
                 bk_.out_struct((B, T, G, hp), jnp.float32, idx3, qg, k, v)],
      compiler_params=bk_.gpu_compiler_params(bs.num_warps, bs.num_stages),
      interpret=interpret,
      name="gathered_attention_fwd_gpu",
  )(idx3, qg, k, v)
  return o[..., :hg, :Dv], lse[..., :hg, None]


def _bwd_gpu_kernel(idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    dq_ref, dk_ref, dv_ref, *, S, hg, D, Dv, hp, Dp, Dvp, bk, nk, scale):
  b, t, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  hr, dr, dvr = jnp.arange(hp), jnp.arange(Dp), jnp.arange(Dvp)
  hmask, dmask, dvmask = hr < hg, dr < D, dvr < Dv
  hc = jnp.minimum(hr, hg - 1)[:, None]
  q = bk_.gpu_masked_load(q_ref.at[b, t, g, hc, jnp.minimum(dr, D - 1)[None, :]],
                          mask=hmask[:, None] & dmask[None, :], other=0.0)
  do = bk_.gpu_masked_load(do_ref.at[b, t, g, hc, jnp.minimum(dvr, Dv - 1)[None, :]],
                           mask=hmask[:, None] & dvmask[None, :], other=0.0)
  hcv = jnp.minimum(hr, hg - 1)
  lse = bk_.gpu_masked_load(lse_ref.at[b, t, g, hcv], mask=hmask, other=0.0)
  delta = bk_.gpu_masked_load(delta_ref.at[b, t, g, hcv], mask=hmask, other=0.0)

  def body(j, dq):
    idx = idx_ref[b, t, pl.ds(j * bk, bk)]
    valid = (idx >= 0) & (idx < S)
    ic = jnp.where(valid, idx, 0)
    kk = bk_.gpu_masked_load(k_ref.at[b, ic[:, None], g, jnp.minimum(dr, D - 1)[None, :]],
                             mask=valid[:, None] & dmask[None, :], other=0.0)
    vv = bk_.gpu_masked_load(v_ref.at[b, ic[:, None], g, jnp.minimum(dvr, Dv - 1)[None, :]],
                             mask=valid[:, None] & dvmask[None, :], other=0.0)
    s = jnp.dot(q, kk.T, preferred_element_type=jnp.float32) * scale
    p = jnp.where(valid[None, :] & hmask[:, None], jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, vv.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dq = dq + jnp.dot(ds.astype(kk.dtype), kk, preferred_element_type=jnp.float32) * scale
    rows = j * bk + jnp.arange(bk)
    dk_ref[b, t, g, rows[:, None], dr[None, :]] = (
        jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale)
    dv_ref[b, t, g, rows[:, None], dvr[None, :]] = jnp.dot(
        p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    return dq

  dq = jax.lax.fori_loop(0, nk, body, jnp.zeros((hp, Dp), jnp.float32))
  dq_ref[0, 0, 0] = dq.astype(dq_ref.dtype)


def _bwd_gpu(qg, k, v, idx3, do, lse, delta, *, scale, bs: BlockSizes, interpret):
  B, T, G, hg, D = qg.shape
  S, Dv = k.shape[1], v.shape[-1]
  Kp = idx3.shape[-1]
  bk = bs.block_k
  nk = Kp // bk
  hp, Dp, Dvp = _gpu_dims(hg, D, Dv)
  any_ = bk_.any_memory_space()
  like = (idx3, qg, k, v, do, lse, delta)
  kernel = functools.partial(_bwd_gpu_kernel, S=S, hg=hg, D=D, Dv=Dv, hp=hp, Dp=Dp, Dvp=Dvp,
                             bk=bk, nk=nk, scale=scale)
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=(B, T, G),
      in_specs=[pl.BlockSpec(memory_space=any_)] * 7,
      out_specs=[pl.BlockSpec((1, 1, 1, hp, Dp), lambda b, t, g: (b, t, g, 0, 0)),
                 pl.BlockSpec(memory_space=any_),
                 pl.BlockSpec(memory_space=any_)],
      out_shape=[bk_.out_struct((B, T, G, hp, Dp), qg.dtype, *like),
                 bk_.out_struct((B, T, G, Kp, Dp), jnp.float32, *like),
                 bk_.out_struct((B, T, G, Kp, Dvp), jnp.float32, *like)],
      compiler_params=bk_.gpu_compiler_params(bs.num_warps, bs.num_stages),
      interpret=interpret,
      name="gathered_attention_bwd_gpu",
  )(idx3, qg, k, v, do, lse[..., 0], delta[..., 0])
  return dq[..., :hg, :D], dk[..., :D], dv[..., :Dv]


# --------------------------------------------------------------------------
# custom_vjp wiring
# --------------------------------------------------------------------------

def _pad_indices(indices, Kp):
  return bk_.pad_axis(indices.astype(jnp.int32), 2, Kp, -1)


def _fwd_impl(qg, k, v, idxp, scale, bs, platform, interpret):
  B, T = qg.shape[:2]
  if platform == "tpu":
    return _fwd_tpu(qg, k, v, idxp.reshape(B, T, 1, -1), scale=scale, bs=bs, interpret=interpret)
  return _fwd_gpu(qg, k, v, idxp, scale=scale, bs=bs, interpret=interpret)


def _bwd_impl(qg, k, v, idxp, do, lse, delta, scale, bs, platform, interpret):
  B, T = qg.shape[:2]
  if platform == "tpu":
    return _bwd_tpu(qg, k, v, idxp.reshape(B, T, 1, -1), do, lse, delta, scale=scale, bs=bs,
                    interpret=interpret)
  return _bwd_gpu(qg, k, v, idxp, do, lse, delta, scale=scale, bs=bs, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ga(qg, k, v, idxp, scale, bs, platform, interpret):
  return _fwd_impl(qg, k, v, idxp, scale, bs, platform, interpret)[0]


def _ga_fwd(qg, k, v, idxp, scale, bs, platform, interpret):
  o, lse = _fwd_impl(qg, k, v, idxp, scale, bs, platform, interpret)
  return o, (qg, k, v, idxp, o, lse)


def _ga_bwd(scale, bs, platform, interpret, res, do):
  qg, k, v, idxp, o, lse = res
  B, T, G, hg, D = qg.shape
  S, Dv = k.shape[1], v.shape[-1]
  Kp = idxp.shape[-1]
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  do = do.astype(qg.dtype)
  tc = min(bs.bwd_chunk_t, T)
  nc = bk_.cdiv(T, tc)
  Tp = nc * tc

  def chunked(x, fill=0):
    x = bk_.pad_axis(x, 1, Tp, fill)
    return x.reshape(B, nc, tc, *x.shape[2:]).swapaxes(0, 1)

  xs = (chunked(qg), chunked(idxp, -1), chunked(do), chunked(lse), chunked(delta))
  bidx = jnp.arange(B)[:, None, None]

  def step(carry, x):
    dk_acc, dv_acc = carry
    qc, ic, doc, lc, dc = x
    dq_c, dk_s, dv_s = _bwd_impl(qc, k, v, ic, doc, lc, dc, scale, bs, platform, interpret)
    valid = (ic >= 0) & (ic < S)
    tgt = jnp.where(valid, ic, S)  # out of range -> dropped
    # dk_s: [B, tc, G, Kp, D] -> [B, tc, Kp, G, D] to scatter rows of [B, S, G, D].
    dk_acc = dk_acc.at[bidx, tgt].add(dk_s.swapaxes(2, 3), mode="drop")
    dv_acc = dv_acc.at[bidx, tgt].add(dv_s.swapaxes(2, 3), mode="drop")
    return (dk_acc, dv_acc), dq_c

  init = (jnp.zeros((B, S, G, D), jnp.float32), jnp.zeros((B, S, G, Dv), jnp.float32))
  (dk, dv), dq = jax.lax.scan(step, init, xs)
  dq = dq.swapaxes(0, 1).reshape(B, Tp, G, hg, D)[:, :T]
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_ga.defvjp(_ga_fwd, _ga_bwd)


def gathered_attention(q, k, v, indices, *, scale=None, block_sizes: BlockSizes | None = None,
                       interpret: bool | None = None, platform: str | None = None):
  """Sparse attention of each query over its selected keys.

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv] (same dtype, f32/bf16).
    indices: int [B, T, K]; entries < 0 or >= S are ignored.
    scale: softmax scale, default D**-0.5.
    block_sizes: :class:`BlockSizes`.
    interpret: None -> interpret on CPU, native on GPU/TPU.
    platform: "tpu" | "gpu" formulation, None -> from the default backend.
  Returns:
    [B, T, H, Dv] in q.dtype. Differentiable w.r.t. q, k, v (custom_vjp).
  """
  _validate(q, k, v, indices)
  platform, interpret = bk_.resolve(interpret, platform)
  bs = block_sizes or BlockSizes()
  B, T, H, D = q.shape
  G = k.shape[2]
  K = indices.shape[2]
  bs.validate(platform, K)
  scale = float(D ** -0.5 if scale is None else scale)
  if platform == "tpu":
    Kp = bk_.round_up(K, bs.block_k) if bs.block_k < K else bk_.round_up(K, 8)
  else:
    Kp = bk_.round_up(K, bs.block_k)
  idxp = _pad_indices(indices, Kp)
  qg = q.reshape(B, T, G, H // G, D)
  o = _ga(qg, k, v, jax.lax.stop_gradient(idxp), scale, bs, platform, interpret)
  return o.reshape(B, T, H, -1)
