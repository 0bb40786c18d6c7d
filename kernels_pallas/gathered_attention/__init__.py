"""Gathered sparse attention (DSA main attention) in Pallas, fwd + bwd.

out[b, t, h] = softmax_j(scale * q[b,t,h] . k[b, idx_j, g(h)]) @ v[b, idx_j, g(h)]
over the selected keys idx_j = indices[b, t, j] (j < K); an index that is < 0
or >= S is ignored, a row with no valid index returns zeros (never NaN).
Query head h reads kv group g(h) = h // (H/G) (g-major).

Tiling: one program handles ONE query token x the heads of ONE kv group
(TPU: all H/G of them; GPU: blocks of ``block_h``) x blocks of ``block_k``
selected keys. The index set is shared by every head of the group, so each
gathered K/V row is loaded once and used by many heads (for MQA, H/G = 128).
Online (flash) softmax over the K blocks, f32 accumulators, output in the
input dtype; the forward also returns the log-sum-exp used by the backward.

Layout of the package:
* ``reference.py``: :func:`gathered_attention_reference` (pure jnp).
* ``tpu.py`` (Mosaic TPU) and ``gpu_triton.py`` (Pallas Triton): the kernels
  of one formulation each, found through :data:`BACKENDS`.
* this module: :class:`BlockSizes`, validation, the custom_vjp wiring shared
  by every formulation and the public :func:`gathered_attention`.

A formulation module provides: ``DEFAULTS`` (its BlockSizes defaults),
``fill_defaults(bs)``, ``check_block_sizes(bs, K)``, ``padded_k(K, bs)``,
``contribution_bytes(bs, G, hg, Kp, D, Dv)``, ``kv_layout(k, v)`` and the
two kernels ``forward(qg, k, v, idxp, *, scale, bs, interpret) -> (o, lse)``
and ``backward(qg, k, v, idxp, do, lse, delta, *, scale, bs, interpret) ->
(dq, dk_slots, dv_slots)`` on grouped queries qg [B, T, G, H/G, D].

Backward (jax.custom_vjp): the kernel recomputes p = exp(s - lse), produces dq
in-kernel (accumulated over K blocks) and, for every (query, slot), the
head-summed contributions dK_slot = scale * dS^T q and dV_slot = P^T dO in f32.
These are scatter-added into dK/dV with ``.at[].add`` (XLA segment-sum)
outside the kernel. To bound memory the backward runs over chunks of queries
(lax.scan) sized so the contribution buffer stays under ``bwd_buffer_bytes``.
(A transposed key-major pass or GPU atomics would avoid the buffer; not done.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import cast

import jax
import jax.numpy as jnp

from kernels_pallas import backend as bk_
from kernels_pallas.gathered_attention.reference import (
  gathered_attention_reference,
)

__all__ = [
  "BACKENDS",
  "BlockSizes",
  "backend_module",
  "gathered_attention",
  "gathered_attention_reference",
]

# Formulation -> module of this package. A Mosaic GPU backend is one more
# entry ("gpu_mosaic": "gpu_mosaic"), or replaces "gpu_triton" under "gpu".
BACKENDS = {"tpu": "tpu", "gpu": "gpu_triton"}


def backend_module(platform: str):
  """The module implementing formulation ``platform`` (a key of BACKENDS)."""
  return bk_.backend_module(__name__, BACKENDS, platform)


@dataclasses.dataclass(frozen=True)
class BlockSizes(bk_.PositiveSizes):
  """Tiling of the gathered-attention kernels; None = the platform default.

  block_k: selected keys per step (TPU: multiple of 128 unless it covers all
    of K; GPU: power of two >= 16). bwd_block_k: the same for the backward
    (TPU: equal to block_k; either one sets both).
  block_h: query heads per program on GPU (power of two >= 16; a KV group's
    heads are split into blocks of this size, each re-gathering its keys).
    bwd_block_h: the same for the backward. TPU always takes the whole group.
  bwd_chunk_t: queries per backward chunk; it bounds the dK/dV contribution
    buffer, B*chunk*G*K*(D+Dv)*4 bytes per head block. Default: as many as
    keep that buffer under `bwd_buffer_bytes` (default 256 MiB on TPU, whose
    grid runs sequentially anyway; 4 GiB on GPU, to fill the SMs).
  num_warps / num_stages: Triton launch parameters.

  `get_default(platform, q, k, v, indices)` gives every field for a platform
  and problem shape; `with_defaults` fills only the None fields of an
  instance. Plain dicts of these fields are accepted wherever a BlockSizes
  is (model configs are JSON).
  """

  block_k: int | None = None
  bwd_chunk_t: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  block_h: int | None = None
  bwd_block_h: int | None = None
  bwd_block_k: int | None = None
  bwd_buffer_bytes: int | None = None

  @classmethod
  def get_default(cls, platform: str, q, k, v, indices) -> BlockSizes:
    """Every field for formulation ``platform`` ("tpu" | "gpu") at this shape.

    q, k, v, indices: arrays or ShapeDtypeStructs as passed to
    :func:`gathered_attention` (per shard, under shard_map).
    """
    return cls().with_defaults(platform, q, k, v, indices)

  def with_defaults(self, platform: str, q, k, v, indices) -> BlockSizes:
    """Copy with the None fields resolved for ``platform`` and this shape."""
    mod = backend_module(platform)
    bs = mod.fill_defaults(self)
    B, T, H, D = q.shape
    G, Dv, K = k.shape[2], v.shape[-1], indices.shape[-1]
    if bs.bwd_chunk_t is None:
      per_query = B * mod.contribution_bytes(
        bs, G, H // G, mod.padded_k(K, bs), D, Dv
      )
      most = max(1, min(T, bs.bwd_buffer_bytes // per_query))
      chunk = bk_.cdiv(T, bk_.cdiv(T, most))  # equal chunks: little padding
    else:
      chunk = min(bs.bwd_chunk_t, T)
    return dataclasses.replace(bs, bwd_chunk_t=chunk)

  def validate(self, platform: str, K: int) -> None:
    """Raises ValueError if these sizes (None fields: defaults) do not suit
    ``platform`` with K selected keys."""
    mod = backend_module(platform)
    mod.check_block_sizes(mod.fill_defaults(self), K)


def _validate(q, k, v, indices):
  for name, x, r in (
    ("q", q, 4),
    ("k", k, 4),
    ("v", v, 4),
    ("indices", indices, 3),
  ):
    if getattr(x, "ndim", None) != r:
      raise ValueError(
        f"gathered_attention: {name} must have rank {r}, got shape {getattr(x, 'shape', None)}"
      )
  B, T, H, D = q.shape
  Bk, S, G, Dk = k.shape
  if (Bk, Dk) != (B, D):
    raise ValueError(
      f"gathered_attention: k shape {k.shape} incompatible with q shape {q.shape} "
      "(expected [B,S,G,D])"
    )
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(
      f"gathered_attention: v shape {v.shape} incompatible with k shape {k.shape} "
      "(expected [B,S,G,Dv])"
    )
  if G < 1 or H % G:
    raise ValueError(
      f"gathered_attention: H % G != 0 (q shape {q.shape}, k shape {k.shape})"
    )
  if indices.shape[:2] != (B, T) or indices.shape[2] < 1:
    raise ValueError(
      f"gathered_attention: indices shape {indices.shape} must be [B={B},T={T},K>=1]"
    )
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(
      f"gathered_attention: indices must be integer, got {indices.dtype}"
    )
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(
        f"gathered_attention: {name} dtype {x.dtype} not supported (f32/bf16/f16)"
      )
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(
      f"gathered_attention: q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    )


# --------------------------------------------------------------------------
# custom_vjp wiring (shared by every formulation)
# --------------------------------------------------------------------------


def _fwd_impl(qg, k, v, idxp, scale, bs, platform, interpret):
  mod = backend_module(platform)
  return mod.forward(
    qg, *mod.kv_layout(k, v), idxp, scale=scale, bs=bs, interpret=interpret
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ga(qg, k, v, idxp, scale, bs, platform, interpret):
  return _fwd_impl(qg, k, v, idxp, scale, bs, platform, interpret)[0]


def _ga_fwd(qg, k, v, idxp, scale, bs, platform, interpret):
  o, lse = _fwd_impl(qg, k, v, idxp, scale, bs, platform, interpret)
  return o, (qg, k, v, idxp, o, lse)


def _ga_bwd(scale, bs, platform, interpret, res, do):
  qg, k, v, idxp, o, lse = res
  mod = backend_module(platform)
  B, T, G, hg, D = qg.shape
  S, Dv = k.shape[1], v.shape[-1]
  delta = jnp.sum(
    do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True
  )
  do = do.astype(qg.dtype)
  tc = bs.bwd_chunk_t
  nc = bk_.cdiv(T, tc)
  Tp = nc * tc

  def chunked(x, fill=0):
    x = bk_.pad_axis(x, 1, Tp, fill)
    return x.reshape(B, nc, tc, *x.shape[2:]).swapaxes(0, 1)

  xs = (
    chunked(qg),
    chunked(idxp, -1),
    chunked(do),
    chunked(lse),
    chunked(delta),
  )
  bidx = jnp.arange(B)[:, None, None]
  # Made once here, not inside the loop for every chunk (a copy for bf16 on TPU).
  kk, vv = mod.kv_layout(k, v)

  def step(carry, x):
    dk_acc, dv_acc = carry
    qc, ic, doc, lc, dc = x
    dq_c, dk_s, dv_s = mod.backward(
      qc, kk, vv, ic, doc, lc, dc, scale=scale, bs=bs, interpret=interpret
    )
    valid = (ic >= 0) & (ic < S)
    tgt = jnp.where(valid, ic, S)  # out of range -> dropped
    # dk_s: [B, tc, G, Kp, D] -> [B, tc, Kp, G, D] to scatter rows of [B, S, G, D].
    dk_acc = dk_acc.at[bidx, tgt].add(dk_s.swapaxes(2, 3), mode="drop")
    dv_acc = dv_acc.at[bidx, tgt].add(dv_s.swapaxes(2, 3), mode="drop")
    return (dk_acc, dv_acc), dq_c

  # Under shard_map(check_vma=True) the accumulators vary like what they sum.
  like = (qg, k, v, idxp, do, lse)
  init = (
    bk_.varying_like(jnp.zeros((B, S, G, D), jnp.float32), *like),
    bk_.varying_like(jnp.zeros((B, S, G, Dv), jnp.float32), *like),
  )
  (dk, dv), dq = jax.lax.scan(step, init, xs)
  dq = dq.swapaxes(0, 1).reshape(B, Tp, G, hg, D)[:, :T]
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_ga.defvjp(_ga_fwd, _ga_bwd)


def gathered_attention(
  q,
  k,
  v,
  indices,
  *,
  scale=None,
  block_sizes: BlockSizes | dict | None = None,
  interpret: bool | None = None,
  platform: str | None = None,
):
  """Sparse attention of each query over its selected keys.

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv] (same dtype, f32/bf16);
      query head h reads kv group h // (H/G).
    indices: int [B, T, K]; entries < 0 or >= S are ignored.
    scale: softmax scale, default D**-0.5.
    block_sizes: :class:`BlockSizes` or a dict of its fields; None fields
      take the platform defaults (:meth:`BlockSizes.get_default`).
    interpret: None -> interpret on CPU, native on GPU/TPU.
    platform: formulation, a key of :data:`BACKENDS` ("tpu" | "gpu"); None ->
      from the default backend.
  Returns:
    [B, T, H, Dv] in q.dtype. Differentiable w.r.t. q, k, v (custom_vjp).
  """
  _validate(q, k, v, indices)
  block_sizes = bk_.coerce_block_sizes(BlockSizes, block_sizes, "block_sizes")
  platform, interpret = bk_.resolve(interpret, platform, BACKENDS)
  mod = backend_module(platform)
  bs = (block_sizes or BlockSizes()).with_defaults(platform, q, k, v, indices)
  B, T, H, D = q.shape
  G = k.shape[2]
  K = indices.shape[2]
  mod.check_block_sizes(bs, K)
  scale = float(D**-0.5 if scale is None else scale)
  idxp = bk_.pad_axis(indices.astype(jnp.int32), 2, mod.padded_k(K, bs), -1)
  qg = q.reshape(B, T, G, H // G, D)
  o = _ga(qg, k, v, jax.lax.stop_gradient(idxp), scale, bs, platform, interpret)
  # jax.custom_vjp.__new__ (custom_vjp | custom_vjp3) drops the wrapped
  # function's return type; _ga returns the kernel's output array.
  o = cast(jax.Array, o)
  return o.reshape(B, T, H, -1)
