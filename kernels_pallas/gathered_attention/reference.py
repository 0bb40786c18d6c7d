"""XLA reference of the gathered sparse attention (the kernels' oracle)."""

from __future__ import annotations

import jax.numpy as jnp

_NEG_INF = float("-inf")


def gathered_attention_reference(
  q, k, v, indices, *, scale=None, return_lse=False
):
  """Pure-jnp reference (materialises the gathered [B,T,K,G,D] keys).

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv]; H % G == 0, query
      head h reads kv group h // (H/G).
    indices: int [B, T, K]; entries < 0 or >= S are ignored.
    scale: softmax scale, default D**-0.5.
    return_lse: also return the f32 [B, T, H] log-sum-exp (0 for empty rows).
  """
  B, T, H, D = q.shape
  S, G = k.shape[1], k.shape[2]
  hg = H // G
  scale = D**-0.5 if scale is None else scale
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
