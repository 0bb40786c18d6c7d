"""Gathered sparse attention (DSA main attention) in Pallas, fwd + bwd.

out[b, t, h] = softmax_j(scale * q[b,t,h] . k[b, idx_j, g(h)]) @ v[b, idx_j, g(h)]
over the selected keys idx_j = indices[b, t, j] (j < K); an index that is < 0
or >= S is ignored, a row with no valid index returns zeros (never NaN).

Tiling: one program handles ONE query token x the heads of ONE kv group
(TPU: all H/G of them; GPU: blocks of ``block_h``) x blocks of ``block_k``
selected keys. The index set is shared by every head of the group, so each
gathered K/V row is loaded once and used by many heads (for MQA, H/G = 128).
Online (flash) softmax over the K blocks, f32 accumulators, output in the
input dtype; the forward also returns the log-sum-exp used by the backward.

Gather:
* TPU (Mosaic): K/V stay in HBM (``memory_space=ANY``); the block's indices
  arrive in SMEM (a blocked SMEM input, *not* scalar prefetch: the whole
  [B,T,K] index array does not fit SMEM at realistic sizes) and each row is
  copied with its own DMA into a VMEM buffer; a VMEM copy of the same indices
  gives the validity mask as a vector. DMAs must start on a tile boundary,
  so rows live in an untiled leading axis: K/V as [B,S,G,1,D], buffer
  [bk,1,D]. (No double buffering yet.)
* GPU (Triton): pointer gather, ``k_ref.at[b, idx[:, None], g, cols]`` with
  a mask. Heads go in blocks of ``block_h``; feature dims in power-of-two
  pieces (576 = 512 + 64), each loaded and multiplied on its own, so neither
  is padded far and K/V are never copied; outputs are padded and sliced.
  Defaults come from compiling for sm_90 (docs/kernels.md).

Backward (jax.custom_vjp): the kernel recomputes p = exp(s - lse), produces dq
in-kernel (accumulated over K blocks) and, for every (query, slot), the
head-summed contributions dK_slot = scale * dS^T q and dV_slot = P^T dO in f32.
These are scatter-added into dK/dV with ``.at[].add`` (XLA segment-sum)
outside the kernel (on GPU one contribution per head block, summed by XLA).
To bound memory the backward runs over chunks of queries (lax.scan) sized
so the contribution buffer stays under ``bwd_buffer_bytes``. (A transposed
key-major pass or GPU atomics would avoid the buffer; not done.)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")


_DEFAULTS = {
    # TPU: a 128-lane block of selected keys per grid step.
    "tpu": dict(block_k=128, bwd_block_k=128, block_h=128, bwd_block_h=128, num_warps=4,
                num_stages=2, bwd_buffer_bytes=1 << 28),
    # GPU (sm_90, from deviceless compiles with ptxas -v; see docs/kernels.md):
    # 32 keys x 32 heads x 8 warps keeps the forward at D=576/Dv=512 within
    # 255 registers without spills and ~70 KiB of shared memory; the backward
    # holds dq and recomputes p, so it takes 16 keys per step.
    # The 4 GiB backward buffer keeps >= 4 programs per SM at the MQA shape.
    "gpu": dict(block_k=32, bwd_block_k=16, block_h=32, bwd_block_h=32, num_warps=8,
                num_stages=2, bwd_buffer_bytes=1 << 32),
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the gathered-attention kernels; None = the platform default.

  block_k: selected keys per step (TPU: multiple of 128 unless it covers all
    of K; GPU: power of two >= 16). bwd_block_k: the same for the backward
    (TPU: equal to block_k).
  block_h: query heads per program on GPU (power of two >= 16; a KV group's
    heads are split into blocks of this size, each re-gathering its keys).
    bwd_block_h: the same for the backward. TPU always takes the whole group.
  bwd_chunk_t: queries per backward chunk; it bounds the dK/dV contribution
    buffer, B*chunk*G*K*(D+Dv)*4 bytes per head block. None: as many as keep
    that buffer under `bwd_buffer_bytes` (default 256 MiB on TPU, whose grid
    runs sequentially anyway; 4 GiB on GPU, to fill the SMs).
  num_warps / num_stages: Triton launch parameters.
  """
  block_k: int | None = None
  bwd_chunk_t: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  block_h: int | None = None
  bwd_block_h: int | None = None
  bwd_block_k: int | None = None
  bwd_buffer_bytes: int | None = None

  def __post_init__(self):
    for f in ("block_k", "bwd_chunk_t", "num_warps", "num_stages", "block_h", "bwd_block_h",
              "bwd_block_k", "bwd_buffer_bytes"):
      v = getattr(self, f)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"BlockSizes.{f} must be a positive int, got {v!r}")

  def for_platform(self, platform: str) -> "BlockSizes":
    """Copy with every None replaced by the platform default."""
    d = dict(_DEFAULTS[platform])
    if platform == "tpu":  # one key block for both passes: either field sets it
      if self.block_k is not None:
        d["bwd_block_k"] = self.block_k
      elif self.bwd_block_k is not None:
        d["block_k"] = self.bwd_block_k
    return dataclasses.replace(self, **{
        f: d[f] for f in d if getattr(self, f) is None})

  def validate(self, platform: str, K: int) -> None:
    if platform == "tpu":
      if self.bwd_block_k != self.block_k:
        raise ValueError(f"BlockSizes.bwd_block_k={self.bwd_block_k} must equal "
                         f"block_k={self.block_k} on TPU")
      if self.block_k % 128 and self.block_k < K:
        raise ValueError(f"BlockSizes.block_k={self.block_k} must be a multiple of 128 "
                         f"(TPU lane tiling) or >= K={K}")
    else:
      for f in ("block_k", "bwd_block_k", "block_h", "bwd_block_h"):
        x = getattr(self, f)
        if x < 16 or x & (x - 1):
          raise ValueError(f"BlockSizes.{f}={x} must be a power of two >= 16 on GPU")


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
  s = _nt(q, _gathered(kbuf)) * scale
  s = jnp.where(valid, s, _NEG_INF)
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(vbuf.dtype), _gathered(vbuf),
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
        pltpu.VMEM((self.bk, 1, self.D), k.dtype),
        pltpu.VMEM((self.bk, 1, self.Dv), v.dtype),
        pltpu.SemaphoreType.DMA((2,)),
    ]
    self.compiler_params = bk_.tpu_compiler_params(
        ("parallel", "parallel", "parallel", "arbitrary"))

  @staticmethod
  def kv_rows(k, v):
    """K/V as [B, S, G, 1, D]: each (token, group) row is its own tile row.

    TPU arrays are tiled over their two minor dims, and a DMA may only start
    at a tile boundary; a gathered row at an arbitrary token index therefore
    has to live in a leading (untiled) position, both in HBM (source) and in
    the VMEM gather buffer (destination, [bk, 1, D]). For f32 this is a
    free reinterpretation (XLA tiles it (1, 128)); bf16 tiles are (2, 128),
    so XLA copies K/V into a layout twice their size, once per call. (TPU
    packs bf16 row pairs into 32-bit sublanes: one bf16 row alone is half a
    packed row, so it takes this copy or a two-row DMA plus a select.)
    """
    B, S, G = k.shape[:3]
    return k.reshape(B, S, G, 1, k.shape[-1]), v.reshape(B, S, G, 1, v.shape[-1])

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
  )(idx4, idx4, qg, *lay.kv_rows(k, v))


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
  kk, vv = _gathered(kbuf), _gathered(vbuf)
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
  )(idx4, idx4, qg, *lay.kv_rows(k, v), do, lse, delta)


# --------------------------------------------------------------------------
# GPU (Triton) kernels
# --------------------------------------------------------------------------

def _pieces(n: int) -> tuple[tuple[int, int], ...]:
  """Splits a feature dim into power-of-two pieces [(offset, width)].

  Triton blocks must be powers of two; padding D=576 to 1024 would waste 44%
  of the QK FLOPs and push one [heads, 1024] query tile past the 227 KiB of
  shared memory an H100 block may use. 576 -> (0, 512), (512, 64). Pieces are
  >= 16 wide (the smallest tl.dot); only the last may run past n (masked).
  """
  out, off = [], 0
  while n - off >= 16:
    w = 1 << ((n - off).bit_length() - 1)
    out.append((off, w))
    off += w
  if off < n:
    out.append((off, max(16, bk_.next_power_of_2(n - off))))
  return tuple(out)


def _padded(n: int) -> int:
  off, w = _pieces(n)[-1]
  return off + w


def _cols(piece, n):
  """Clamped column indices and their mask for one piece of an n-wide dim."""
  c = piece[0] + jnp.arange(piece[1])
  return jnp.minimum(c, n - 1)[None, :], (c < n)[None, :]


def _load_pieces(ref_at, n, row_ok):
  """Loads every piece of [rows, n]; ref_at(cols) indexes the ref."""
  out = []
  for piece in _pieces(n):
    c, cm = _cols(piece, n)
    out.append(bk_.gpu_masked_load(ref_at(c), mask=row_ok[:, None] & cm, other=0.0))
  return out


def _dot_pieces(a, b):
  """sum_i a_i @ b_i.T over matching feature pieces (f32)."""
  return sum(jnp.dot(x, y.T, preferred_element_type=jnp.float32) for x, y in zip(a, b))


def _store_pieces(ref, lead, rows, vals, n):
  """ref[*lead, rows, cols] = vals piece by piece (into the padded array)."""
  for (off, w), x in zip(_pieces(n), vals):
    ref[(*lead, rows[:, None], (off + jnp.arange(w))[None, :])] = x.astype(ref.dtype)


def _gpu_heads(hi, hb, hg):
  """Rows of head block hi: indices, clamped indices, mask."""
  hr = hi * hb + jnp.arange(hb)
  return hr, jnp.minimum(hr, hg - 1), hr < hg


def _gpu_gather_kv(idx_ref, k_ref, v_ref, b, t, g, j, *, S, D, Dv, bk):
  idx = idx_ref[b, t, pl.ds(j * bk, bk)]
  valid = (idx >= 0) & (idx < S)
  ic = jnp.where(valid, idx, 0)[:, None]
  kk = _load_pieces(lambda c: k_ref.at[b, ic, g, c], D, valid)
  vv = _load_pieces(lambda c: v_ref.at[b, ic, g, c], Dv, valid)
  return valid, kk, vv


def _fwd_gpu_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                    S, hg, hb, D, Dv, bk, nk, scale):
  b, t, g, hi = (pl.program_id(i) for i in range(4))
  hr, hc, hok = _gpu_heads(hi, hb, hg)
  q = _load_pieces(lambda c: q_ref.at[b, t, g, hc[:, None], c], D, hok)

  def body(j, carry):
    m, l, acc = carry
    valid, kk, vv = _gpu_gather_kv(idx_ref, k_ref, v_ref, b, t, g, j, S=S, D=D, Dv=Dv, bk=bk)
    s = _dot_pieces(q, kk) * scale
    s = jnp.where(valid[None, :], s, _NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    pv = p.astype(vv[0].dtype)
    acc = tuple(alpha[:, None] * a + jnp.dot(pv, x, preferred_element_type=jnp.float32)
                for a, x in zip(acc, vv))
    return m_new, l, acc

  m0 = jnp.full((hb,), _NEG_INF, jnp.float32)
  l0 = jnp.zeros((hb,), jnp.float32)
  a0 = tuple(jnp.zeros((hb, w), jnp.float32) for _, w in _pieces(Dv))
  m, l, acc = jax.lax.fori_loop(0, nk, body, (m0, l0, a0))
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  _store_pieces(o_ref, (b, t, g), hr,
                [jnp.where(ok[:, None], a / l_safe[:, None], 0.0) for a in acc], Dv)
  lse_ref[b, t, g, hr] = jnp.where(ok, m + jnp.log(l_safe), 0.0)


def _gpu_head_block(block_h: int, hg: int) -> int:
  return min(block_h, max(16, bk_.next_power_of_2(hg)))


class _GpuLayout:
  """Grid (B, T, G, head blocks) and padded shapes shared by the GPU fwd/bwd.

  One program: one query token x a block of `hb` heads of one KV group, all
  of its K selected keys in blocks of `bk`. Heads are padded to nh*hb and
  features to power-of-two pieces; outputs are padded and sliced.
  """

  def __init__(self, qg, k, v, idx3, bs: BlockSizes, backward: bool):
    self.B, self.T, self.G, self.hg, self.D = qg.shape
    self.S, self.Dv = k.shape[1], v.shape[-1]
    self.Kp = idx3.shape[-1]
    self.bk = bs.bwd_block_k if backward else bs.block_k
    self.nk = self.Kp // self.bk
    self.hb = _gpu_head_block(bs.bwd_block_h if backward else bs.block_h, self.hg)
    self.nh = bk_.cdiv(self.hg, self.hb)
    self.hp, self.Dp, self.Dvp = self.nh * self.hb, _padded(self.D), _padded(self.Dv)
    self.grid = (self.B, self.T, self.G, self.nh)
    self.statics = dict(S=self.S, hg=self.hg, hb=self.hb, D=self.D, Dv=self.Dv,
                        bk=self.bk, nk=self.nk)
    self.compiler_params = bk_.gpu_compiler_params(bs.num_warps, bs.num_stages)


def _fwd_gpu(qg, k, v, idx3, *, scale, bs: BlockSizes, interpret):
  lay = _GpuLayout(qg, k, v, idx3, bs, backward=False)
  B, T, G, hp = lay.B, lay.T, lay.G, lay.hp
  any_ = bk_.any_memory_space()
  kernel = functools.partial(_fwd_gpu_kernel, scale=scale, **lay.statics)
  o, lse = pl.pallas_call(
      kernel,
      grid=lay.grid,
      in_specs=[pl.BlockSpec(memory_space=any_)] * 4,
      out_specs=[pl.BlockSpec(memory_space=any_)] * 2,
      out_shape=[bk_.out_struct((B, T, G, hp, lay.Dvp), qg.dtype, idx3, qg, k, v),
                 bk_.out_struct((B, T, G, hp), jnp.float32, idx3, qg, k, v)],
      compiler_params=lay.compiler_params,
      interpret=interpret,
      name="gathered_attention_fwd_gpu",
  )(idx3, qg, k, v)
  return o[..., :lay.hg, :lay.Dv], lse[..., :lay.hg, None]


def _bwd_gpu_kernel(idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    dq_ref, dk_ref, dv_ref, *, S, hg, hb, D, Dv, bk, nk, scale):
  b, t, g, hi = (pl.program_id(i) for i in range(4))
  hr, hc, hok = _gpu_heads(hi, hb, hg)
  q = _load_pieces(lambda c: q_ref.at[b, t, g, hc[:, None], c], D, hok)
  do = _load_pieces(lambda c: do_ref.at[b, t, g, hc[:, None], c], Dv, hok)
  lse = bk_.gpu_masked_load(lse_ref.at[b, t, g, hc], mask=hok, other=0.0)
  delta = bk_.gpu_masked_load(delta_ref.at[b, t, g, hc], mask=hok, other=0.0)

  def body(j, dq):
    valid, kk, vv = _gpu_gather_kv(idx_ref, k_ref, v_ref, b, t, g, j, S=S, D=D, Dv=Dv, bk=bk)
    s = _dot_pieces(q, kk) * scale
    p = jnp.where(valid[None, :] & hok[:, None], jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot_pieces(do, vv) - delta[:, None])
    dsk = ds.astype(kk[0].dtype)
    dq = tuple(a + jnp.dot(dsk, x, preferred_element_type=jnp.float32) * scale
               for a, x in zip(dq, kk))
    # Per-slot contributions of this head block (summed over blocks outside).
    rows = j * bk + jnp.arange(bk)
    dsT, pT = ds.T.astype(q[0].dtype), p.T.astype(do[0].dtype)
    _store_pieces(dk_ref, (b, t, g, hi), rows,
                  [jnp.dot(dsT, x, preferred_element_type=jnp.float32) * scale for x in q], D)
    _store_pieces(dv_ref, (b, t, g, hi), rows,
                  [jnp.dot(pT, x, preferred_element_type=jnp.float32) for x in do], Dv)
    return dq

  dq0 = tuple(jnp.zeros((hb, w), jnp.float32) for _, w in _pieces(D))
  dq = jax.lax.fori_loop(0, nk, body, dq0)
  _store_pieces(dq_ref, (b, t, g), hr, dq, D)


def _bwd_gpu(qg, k, v, idx3, do, lse, delta, *, scale, bs: BlockSizes, interpret):
  lay = _GpuLayout(qg, k, v, idx3, bs, backward=True)
  B, T, G, hp, nh, Kp = lay.B, lay.T, lay.G, lay.hp, lay.nh, lay.Kp
  any_ = bk_.any_memory_space()
  like = (idx3, qg, k, v, do, lse, delta)
  kernel = functools.partial(_bwd_gpu_kernel, scale=scale, **lay.statics)
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=lay.grid,
      in_specs=[pl.BlockSpec(memory_space=any_)] * 7,
      out_specs=[pl.BlockSpec(memory_space=any_)] * 3,
      out_shape=[bk_.out_struct((B, T, G, hp, lay.Dp), qg.dtype, *like),
                 bk_.out_struct((B, T, G, nh, Kp, lay.Dp), jnp.float32, *like),
                 bk_.out_struct((B, T, G, nh, Kp, lay.Dvp), jnp.float32, *like)],
      compiler_params=lay.compiler_params,
      interpret=interpret,
      name="gathered_attention_bwd_gpu",
  )(idx3, qg, k, v, do, lse[..., 0], delta[..., 0])
  return (dq[..., :lay.hg, :lay.D], jnp.sum(dk[..., :lay.D], axis=3),
          jnp.sum(dv[..., :lay.Dv], axis=3))


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


def _bwd_chunk(bs: BlockSizes, platform, B, T, G, hg, Kp, D, Dv) -> int:
  """Queries per backward chunk (explicit, or from the buffer budget)."""
  if bs.bwd_chunk_t is not None:
    return min(bs.bwd_chunk_t, T)
  if platform == "tpu":
    nh, width = 1, D + Dv
  else:
    nh, width = bk_.cdiv(hg, _gpu_head_block(bs.bwd_block_h, hg)), _padded(D) + _padded(Dv)
  per_query = B * G * nh * Kp * width * 4
  most = max(1, min(T, bs.bwd_buffer_bytes // per_query))
  return bk_.cdiv(T, bk_.cdiv(T, most))  # equal chunks: little padding


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
  tc = _bwd_chunk(bs, platform, B, T, G, hg, Kp, D, Dv)
  nc = bk_.cdiv(T, tc)
  Tp = nc * tc

  def chunked(x, fill=0):
    x = bk_.pad_axis(x, 1, Tp, fill)
    return x.reshape(B, nc, tc, *x.shape[2:]).swapaxes(0, 1)

  xs = (chunked(qg), chunked(idxp, -1), chunked(do), chunked(lse), chunked(delta))
  bidx = jnp.arange(B)[:, None, None]
  # The TPU row layout is a copy for bf16 (XLA pads [.., 1, D] tiles to 2
  # rows); made here, once, not inside the loop for every chunk.
  kk, vv = _TpuLayout.kv_rows(k, v) if platform == "tpu" else (k, v)

  def step(carry, x):
    dk_acc, dv_acc = carry
    qc, ic, doc, lc, dc = x
    dq_c, dk_s, dv_s = _bwd_impl(qc, kk, vv, ic, doc, lc, dc, scale, bs, platform, interpret)
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
  bs = (block_sizes or BlockSizes()).for_platform(platform)
  B, T, H, D = q.shape
  G = k.shape[2]
  K = indices.shape[2]
  bs.validate(platform, K)
  scale = float(D ** -0.5 if scale is None else scale)
  if platform == "tpu":
    Kp = bk_.round_up(K, bs.block_k) if bs.block_k < K else bk_.round_up(K, 8)
  else:
    Kp = bk_.round_up(K, max(bs.block_k, bs.bwd_block_k))
  idxp = _pad_indices(indices, Kp)
  qg = q.reshape(B, T, G, H // G, D)
  o = _ga(qg, k, v, jax.lax.stop_gradient(idxp), scale, bs, platform, interpret)
  return o.reshape(B, T, H, -1)
