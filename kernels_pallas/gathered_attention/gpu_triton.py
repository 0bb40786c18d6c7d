"""Gathered sparse attention, Pallas Triton formulation (fwd + bwd kernels).

Grid (B, T, G, head blocks): one query token x a block of ``block_h`` heads of
one KV group, all K selected keys in blocks of ``block_k``. Pointer gather,
``k_ref.at[b, idx[:, None], g, cols]`` with a mask (K/V are never copied).
Feature dims go in power-of-two pieces (:func:`feature_pieces`, 576 = 512 +
64), each loaded and multiplied on its own, so neither is padded far;
outputs are padded and sliced. The backward writes one dK/dV contribution
per (query, slot, head block); the caller sums the head blocks by XLA.
Defaults come from compiling for sm_90 (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")

# sm_90, from deviceless compiles with ptxas -v (docs/kernels.md): 32 keys x
# 32 heads x 8 warps keeps the forward at D=576/Dv=512 within 255 registers
# without spills and ~70 KiB of shared memory; the backward holds dq and
# recomputes p, so it takes 16 keys per step. The 4 GiB backward buffer keeps
# >= 4 programs per SM at the MQA shape.
DEFAULTS = dict(
  block_k=32,
  bwd_block_k=16,
  block_h=32,
  bwd_block_h=32,
  num_warps=8,
  num_stages=2,
  bwd_buffer_bytes=1 << 32,
)


def fill_defaults(bs):
  return bk_.fill_none(bs, DEFAULTS)


def check_block_sizes(bs, K: int) -> None:
  del K
  for f in ("block_k", "bwd_block_k", "block_h", "bwd_block_h"):
    x = getattr(bs, f)
    if x < 16 or x & (x - 1):
      raise ValueError(
        f"BlockSizes.{f}={x} must be a power of two >= 16 on GPU"
      )


def padded_k(K: int, bs) -> int:
  """Index slots after padding: whole key blocks of both passes."""
  return bk_.round_up(K, max(bs.block_k, bs.bwd_block_k))


def contribution_bytes(bs, G: int, hg: int, Kp: int, D: int, Dv: int) -> int:
  """Bytes of dK/dV contributions the backward writes per (batch row, query)."""
  nh = bk_.cdiv(hg, _gpu_head_block(bs.bwd_block_h, hg))
  return G * nh * Kp * (_padded(D) + _padded(Dv)) * 4


def kv_layout(k, v):
  """K/V as they are: the pointer gather reads [B, S, G, D] rows directly."""
  return k, v


def feature_pieces(n: int) -> tuple[tuple[int, int], ...]:
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
  off, w = feature_pieces(n)[-1]
  return off + w


def _cols(piece, n):
  """Clamped column indices and their mask for one piece of an n-wide dim."""
  c = piece[0] + jnp.arange(piece[1])
  return jnp.minimum(c, n - 1)[None, :], (c < n)[None, :]


def _load_pieces(ref_at, n, row_ok):
  """Loads every piece of [rows, n]; ref_at(cols) indexes the ref."""
  out = []
  for piece in feature_pieces(n):
    c, cm = _cols(piece, n)
    out.append(
      bk_.gpu_masked_load(ref_at(c), mask=row_ok[:, None] & cm, other=0.0)
    )
  return out


def _dot_pieces(a, b):
  """sum_i a_i @ b_i.T over matching feature pieces (f32)."""
  return sum(
    jnp.dot(x, y.T, preferred_element_type=jnp.float32) for x, y in zip(a, b)
  )


def _store_pieces(ref, lead, rows, vals, n):
  """ref[*lead, rows, cols] = vals piece by piece (into the padded array)."""
  for (off, w), x in zip(feature_pieces(n), vals):
    ref[(*lead, rows[:, None], (off + jnp.arange(w))[None, :])] = x.astype(
      ref.dtype
    )


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


def _fwd_gpu_kernel(
  idx_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  *,
  S,
  hg,
  hb,
  D,
  Dv,
  bk,
  nk,
  scale,
):
  b, t, g, hi = (pl.program_id(i) for i in range(4))
  hr, hc, hok = _gpu_heads(hi, hb, hg)
  q = _load_pieces(lambda c: q_ref.at[b, t, g, hc[:, None], c], D, hok)

  def body(j, carry):
    m, l, acc = carry
    valid, kk, vv = _gpu_gather_kv(
      idx_ref, k_ref, v_ref, b, t, g, j, S=S, D=D, Dv=Dv, bk=bk
    )
    s = _dot_pieces(q, kk) * scale
    s = jnp.where(valid[None, :], s, _NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    pv = p.astype(vv[0].dtype)
    acc = tuple(
      alpha[:, None] * a + jnp.dot(pv, x, preferred_element_type=jnp.float32)
      for a, x in zip(acc, vv)
    )
    return m_new, l, acc

  m0 = jnp.full((hb,), _NEG_INF, jnp.float32)
  l0 = jnp.zeros((hb,), jnp.float32)
  a0 = tuple(jnp.zeros((hb, w), jnp.float32) for _, w in feature_pieces(Dv))
  m, l, acc = jax.lax.fori_loop(0, nk, body, (m0, l0, a0))
  ok = l > 0
  l_safe = jnp.where(ok, l, 1.0)
  _store_pieces(
    o_ref,
    (b, t, g),
    hr,
    [jnp.where(ok[:, None], a / l_safe[:, None], 0.0) for a in acc],
    Dv,
  )
  lse_ref[b, t, g, hr] = jnp.where(ok, m + jnp.log(l_safe), 0.0)


def _gpu_head_block(block_h: int, hg: int) -> int:
  return min(block_h, max(16, bk_.next_power_of_2(hg)))


class _GpuLayout:
  """Grid (B, T, G, head blocks) and padded shapes shared by the GPU fwd/bwd.

  One program: one query token x a block of `hb` heads of one KV group, all
  of its K selected keys in blocks of `bk`. Heads are padded to nh*hb and
  features to power-of-two pieces; outputs are padded and sliced.
  """

  def __init__(self, qg, k, v, idx3, bs, backward: bool):
    self.B, self.T, self.G, self.hg, self.D = qg.shape
    self.S, self.Dv = k.shape[1], v.shape[-1]
    self.Kp = idx3.shape[-1]
    self.bk = bs.bwd_block_k if backward else bs.block_k
    self.nk = self.Kp // self.bk
    self.hb = _gpu_head_block(
      bs.bwd_block_h if backward else bs.block_h, self.hg
    )
    self.nh = bk_.cdiv(self.hg, self.hb)
    self.hp, self.Dp, self.Dvp = (
      self.nh * self.hb,
      _padded(self.D),
      _padded(self.Dv),
    )
    self.grid = (self.B, self.T, self.G, self.nh)
    self.statics = dict(
      S=self.S,
      hg=self.hg,
      hb=self.hb,
      D=self.D,
      Dv=self.Dv,
      bk=self.bk,
      nk=self.nk,
    )
    self.compiler_params = bk_.gpu_compiler_params(bs.num_warps, bs.num_stages)


def forward(qg, k, v, idx3, *, scale, bs, interpret):
  """(o [B,T,G,hg,Dv], lse f32[B,T,G,hg,1])."""
  lay = _GpuLayout(qg, k, v, idx3, bs, backward=False)
  B, T, G, hp = lay.B, lay.T, lay.G, lay.hp
  any_ = bk_.any_memory_space()
  kernel = functools.partial(_fwd_gpu_kernel, scale=scale, **lay.statics)
  o, lse = pl.pallas_call(
    kernel,
    grid=lay.grid,
    in_specs=[pl.BlockSpec(memory_space=any_)] * 4,
    out_specs=[pl.BlockSpec(memory_space=any_)] * 2,
    out_shape=[
      bk_.out_struct((B, T, G, hp, lay.Dvp), qg.dtype, idx3, qg, k, v),
      bk_.out_struct((B, T, G, hp), jnp.float32, idx3, qg, k, v),
    ],
    compiler_params=lay.compiler_params,
    interpret=interpret,
    name="gathered_attention_fwd_gpu",
  )(idx3, qg, k, v)
  return o[..., : lay.hg, : lay.Dv], lse[..., : lay.hg, None]


def _bwd_gpu_kernel(
  idx_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  dk_ref,
  dv_ref,
  *,
  S,
  hg,
  hb,
  D,
  Dv,
  bk,
  nk,
  scale,
):
  b, t, g, hi = (pl.program_id(i) for i in range(4))
  hr, hc, hok = _gpu_heads(hi, hb, hg)
  q = _load_pieces(lambda c: q_ref.at[b, t, g, hc[:, None], c], D, hok)
  do = _load_pieces(lambda c: do_ref.at[b, t, g, hc[:, None], c], Dv, hok)
  lse = bk_.gpu_masked_load(lse_ref.at[b, t, g, hc], mask=hok, other=0.0)
  delta = bk_.gpu_masked_load(delta_ref.at[b, t, g, hc], mask=hok, other=0.0)

  def body(j, dq):
    valid, kk, vv = _gpu_gather_kv(
      idx_ref, k_ref, v_ref, b, t, g, j, S=S, D=D, Dv=Dv, bk=bk
    )
    s = _dot_pieces(q, kk) * scale
    p = jnp.where(valid[None, :] & hok[:, None], jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot_pieces(do, vv) - delta[:, None])
    dsk = ds.astype(kk[0].dtype)
    dq = tuple(
      a + jnp.dot(dsk, x, preferred_element_type=jnp.float32) * scale
      for a, x in zip(dq, kk)
    )
    # Per-slot contributions of this head block (summed over blocks outside).
    rows = j * bk + jnp.arange(bk)
    dsT, pT = ds.T.astype(q[0].dtype), p.T.astype(do[0].dtype)
    _store_pieces(
      dk_ref,
      (b, t, g, hi),
      rows,
      [jnp.dot(dsT, x, preferred_element_type=jnp.float32) * scale for x in q],
      D,
    )
    _store_pieces(
      dv_ref,
      (b, t, g, hi),
      rows,
      [jnp.dot(pT, x, preferred_element_type=jnp.float32) for x in do],
      Dv,
    )
    return dq

  dq0 = tuple(jnp.zeros((hb, w), jnp.float32) for _, w in feature_pieces(D))
  dq = jax.lax.fori_loop(0, nk, body, dq0)
  _store_pieces(dq_ref, (b, t, g), hr, dq, D)


def backward(qg, k, v, idx3, do, lse, delta, *, scale, bs, interpret):
  """(dq, dK and dV contributions f32[B,T,G,Kp,D|Dv] per slot, head blocks summed)."""
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
    out_shape=[
      bk_.out_struct((B, T, G, hp, lay.Dp), qg.dtype, *like),
      bk_.out_struct((B, T, G, nh, Kp, lay.Dp), jnp.float32, *like),
      bk_.out_struct((B, T, G, nh, Kp, lay.Dvp), jnp.float32, *like),
    ],
    compiler_params=lay.compiler_params,
    interpret=interpret,
    name="gathered_attention_bwd_gpu",
  )(idx3, qg, k, v, do, lse[..., 0], delta[..., 0])
  return (
    dq[..., : lay.hg, : lay.D],
    jnp.sum(dk[..., : lay.D], axis=3),
    jnp.sum(dv[..., : lay.Dv], axis=3),
  )
