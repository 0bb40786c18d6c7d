"""Flax NNX attention layers: thin modules around the pure functions.

Every attention kind has the same call signature,

    y, aux = layer(x, positions=None, kv_lengths=None, mode="sparse")

with x [B, T, E] -> y [B, T, E] and `aux` a dict of f32 scalars that the
training loop sums over layers:
  - "indexer_kl": the indexer loss of this layer (0 for kinds without one);
  - "attended_keys": query-key pairs attended (summed over B and T);
  - "visible_keys": query-key pairs a dense causal layer would attend.
`mode` selects the DSA training stage: "dense" (dense attention, no indexer
loss: the dense twin / evaluation), "warmup" (dense attention + dense KL
for the indexer), "sparse" (top-k attention + sparse KL). Kinds without an
indexer ignore it.

Parameters carry logical axis names in their `logical_axes` metadata
(embed, heads, kv_heads, head_dim, indexer_heads, indexer_dim), which
`sparse_attn.sharding` maps to mesh axes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn import masking
from sparse_attn.attention import dense_attention, dsa_attention
from sparse_attn.indexer import LightningIndexer
from sparse_attn.losses import dense_indexer_kl, sparse_indexer_kl
from sparse_attn.params import param
from sparse_attn.rope import apply_rope

MODES = ("dense", "warmup", "sparse")


def default_positions(x: jax.Array) -> jax.Array:
  batch, length = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def dense_key_counts(positions: jax.Array, num_keys: int,
                     kv_lengths: Any) -> jax.Array:
  """Number of query-key pairs a dense causal layer attends (f32 scalar)."""
  return jnp.sum(masking.num_visible(positions, num_keys, kv_lengths)).astype(
      jnp.float32)


class AttentionLayer(nnx.Module):
  """GQA/MQA projections shared by every kind: x -> (q, k, v), o -> y.

  Subclasses implement `attend(q, k, v, x, positions, kv_lengths, mode)`
  returning (o [B, T, H, Dv], aux).
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, rope_base: float = 10000.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads={num_heads} must be a multiple of num_kv_heads="
          f"{num_kv_heads}.")
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
    self.rope_base, self.dtype = rope_base, dtype
    e, h, g, d = embed_dim, num_heads, num_kv_heads, head_dim
    self.wq = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), param_dtype)
    self.wk = param(rngs, (e, g, d), ("embed", "kv_heads", "head_dim"),
                    param_dtype)
    self.wv = param(rngs, (e, g, d), ("embed", "kv_heads", "head_dim"),
                    param_dtype)
    self.wo = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), param_dtype)

  def project(self, x: jax.Array, positions: jax.Array):
    """x [B, T, E] -> q [B, T, H, D], k [B, T, G, D], v [B, T, G, D] (RoPE-d)."""
    x = x.astype(self.dtype)
    q = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(self.dtype))
    k = jnp.einsum("bte,egd->btgd", x, self.wk[...].astype(self.dtype))
    v = jnp.einsum("bte,egd->btgd", x, self.wv[...].astype(self.dtype))
    q = apply_rope(q, positions, base=self.rope_base)
    k = apply_rope(k, positions, base=self.rope_base)
    return q, k, v

  def output(self, o: jax.Array) -> jax.Array:
    return jnp.einsum("bthd,hde->bte", o, self.wo[...].astype(self.dtype))

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               kv_lengths: jax.Array | None = None, mode: str = "sparse"):
    _check_mode(mode)
    if x.ndim != 3 or x.shape[-1] != self.embed_dim:
      raise ValueError(
          f"x must be [B, T, E={self.embed_dim}], got shape {x.shape}.")
    if positions is None:
      positions = default_positions(x)
    q, k, v = self.project(x, positions)
    o, aux = self.attend(q, k, v, x, positions, kv_lengths, mode)
    return self.output(o), aux

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    raise TypeError(f"{type(self).__name__} must implement attend().")


class DenseAttention(AttentionLayer):
  """Causal dense softmax attention (the baseline every kind is compared to)."""

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    o = dense_attention(q, k, v, kv_lengths=kv_lengths)
    keys = dense_key_counts(positions, k.shape[1], kv_lengths)
    aux = {"indexer_kl": jnp.zeros((), jnp.float32), "attended_keys": keys,
           "visible_keys": keys}
    return o, aux


class DSAAttention(AttentionLayer):
  """DeepSeek Sparse Attention layer: GQA/MQA attention + lightning indexer.

  The indexer reads a stop-gradient copy of x (`detach_indexer_input`), so
  its KL loss never reaches the trunk, and it receives no gradient from the
  LM loss because the only thing it passes on is an integer selection.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, top_k: int, indexer_heads: int = 4,
               indexer_dim: int = 32, indexer_rope_dim: int | None = None,
               implementation: str | None = None,
               detach_indexer_input: bool = True, rope_base: float = 10000.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim,
                     rope_base=rope_base, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}.")
    self.top_k = top_k
    self.implementation = implementation
    self.detach_indexer_input = detach_indexer_input
    self.indexer = LightningIndexer(
        embed_dim, indexer_heads, indexer_dim, rope_dim=indexer_rope_dim,
        rope_base=rope_base, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def index(self, x: jax.Array, positions: jax.Array):
    """Indexer inputs (q_idx, k_idx, weights) for x [B, T, E]."""
    if self.detach_indexer_input:
      x = jax.lax.stop_gradient(x)
    return self.indexer(x, positions)

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    q_idx, k_idx, w = self.index(x, positions)
    visible = dense_key_counts(positions, k.shape[1], kv_lengths)
    if mode == "sparse":
      o, idx = dsa_attention(q, k, v, q_idx, k_idx, w, top_k=self.top_k,
                             kv_lengths=kv_lengths,
                             implementation=self.implementation,
                             return_indices=True)
      kl = sparse_indexer_kl(q, k, q_idx, k_idx, w, idx)
      attended = jnp.sum(idx >= 0).astype(jnp.float32)
    else:
      o = dense_attention(q, k, v, kv_lengths=kv_lengths)
      kl = (dense_indexer_kl(q, k, q_idx, k_idx, w, kv_lengths=kv_lengths)
            if mode == "warmup" else jnp.zeros((), jnp.float32))
      attended = visible
    return o, {"indexer_kl": kl, "attended_keys": attended,
               "visible_keys": visible}
