"""The lightning indexer: scores, top-k selection, and the NNX module.

For query t and key s the index score is
    I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s])
over HI indexer heads j, with one shared indexer key per token. Each query
keeps the top-k visible keys; the main attention reads only those.

Shapes: B batch, T queries, S keys, HI indexer heads, DI indexer dim, K top-k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn import _checks, chunking, dispatch, masking
from sparse_attn.params import param, tag
from sparse_attn.rope import apply_rope

# Bound on the [chunk, S, HI] intermediate of one query block (elements).
_TOPK_BUDGET = 1 << 23


def _check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths):
  qs = _checks.check_rank("q_idx", q_idx, 4, "[B, T, HI, DI]")
  ks = _checks.check_rank("k_idx", k_idx, 3, "[B, S, DI]")
  ws = _checks.check_rank("weights", weights, 3, "[B, T, HI]")
  for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
    _checks.check_floating(name, x)
  if ks[0] != qs[0] or ks[2] != qs[3]:
    raise ValueError(
        f"k_idx shape {ks} must be [B, S, DI] matching q_idx shape {qs} "
        f"(B={qs[0]}, DI={qs[3]})."
    )
  if ws != qs[:3]:
    raise ValueError(
        f"weights shape {ws} must be [B, T, HI] = {qs[:3]} to match q_idx "
        f"shape {qs}."
    )
  _checks.check_q_offset(q_offset, qs[0])
  _checks.check_kv_lengths(kv_lengths, qs[0])
  return qs, ks


def _scores_block(q_idx, k_idx, weights, q_pos, kv_lengths):
  """f32[B, C, S] index scores of one query block, -inf where not visible."""
  acc = _checks.acc_dtype(q_idx, k_idx, weights)
  dots = jnp.einsum("bthd,bsd->bths", q_idx, k_idx, preferred_element_type=acc)
  scores = jnp.einsum("bths,bth->bts", jax.nn.relu(dots), weights.astype(acc))
  mask = masking.visible(q_pos, k_idx.shape[1], kv_lengths)
  return jnp.where(mask, scores, -jnp.inf)


def indexer_scores(q_idx: jax.Array, k_idx: jax.Array, weights: jax.Array, *,
                   q_offset: Any = None,
                   kv_lengths: jax.Array | None = None) -> jax.Array:
  """Index scores f32[B, T, S]: sum_j w*relu(q.k) where visible, -inf elsewhere.

  Args:
    q_idx: [B, T, HI, DI] indexer queries.
    k_idx: [B, S, DI] indexer keys (one per token, shared by all heads).
    weights: [B, T, HI] per-query head weights (any scale is the caller's:
      no hidden scale is applied here).
    q_offset: absolute position of query 0 (int or int32[B]); default S - T.
    kv_lengths: optional int32[B]; keys >= kv_lengths[b] are padding.
  """
  qs, ks = _check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths)
  q_pos = masking.query_positions(qs[0], qs[1], ks[1], q_offset)
  return _scores_block(q_idx, k_idx, weights, q_pos, kv_lengths)


def _topk_of_scores(scores: jax.Array, k: int) -> jax.Array:
  """int32[..., K] indices of the K largest finite scores, -1 for the rest."""
  num_keys = scores.shape[-1]
  kk = min(k, num_keys)
  values, idx = jax.lax.top_k(scores, kk)
  idx = jnp.where(jnp.isneginf(values), -1, idx).astype(jnp.int32)
  if kk < k:
    pad = [(0, 0)] * (idx.ndim - 1) + [(0, k - kk)]
    idx = jnp.pad(idx, pad, constant_values=-1)
  return idx


def select_topk(scores: jax.Array, k: int) -> jax.Array:
  """int32[B, T, K]: indices of the K largest visible (finite) scores.

  Slots beyond the number of visible keys hold -1. Order within a row is
  unspecified; ties may go either way. -inf marks a key as not visible.
  """
  _checks.check_rank("scores", scores, 3, "[B, T, S]")
  _checks.check_floating("scores", scores)
  k = _checks.check_k(k)
  return _topk_of_scores(scores, k)


def lightning_topk(q_idx: jax.Array, k_idx: jax.Array, weights: jax.Array,
                   k: int, *, q_offset: Any = None,
                   kv_lengths: jax.Array | None = None,
                   implementation: str | None = None,
                   query_chunk: int | None = None) -> jax.Array:
  """int32[B, T, K]: top-k of the index scores without materialising [T, S].

  Selects the same set as `select_topk(indexer_scores(...), k)`. The XLA path
  scores `query_chunk` queries at a time (default: as many as fit a fixed
  budget of chunk*S*HI elements), so peak memory is O(T*K + chunk*S*HI).
  The Pallas path fuses scoring and selection in one kernel.
  """
  qs, ks = _check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths)
  k = _checks.check_k(k)
  impl = dispatch.resolve(implementation)
  if impl == "pallas":
    return dispatch.kernel_module("topk").lightning_topk(
        q_idx, k_idx, weights, k, q_offset=q_offset, kv_lengths=kv_lengths)
  batch, num_q, num_heads, _ = qs
  num_keys = ks[1]
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(num_q, num_keys * num_heads,
                                      _TOPK_BUDGET)

  def block(start, qb, wb):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    scores = _scores_block(qb, k_idx, wb, q_pos, kv_lengths)
    return _topk_of_scores(scores, k)

  return chunking.map_query_chunks(block, query_chunk, q_idx, weights)


class LightningIndexer(nnx.Module):
  """NNX lightning indexer: x[B, T, E] -> (q_idx, k_idx, weights).

  - q_idx [B, T, HI, DI] is projected from the layer input, or from a query
    latent (MLA's compressed query) when `query_input_dim` is given and
    `q_latent` is passed.
  - k_idx [B, T, DI]: one key per token shared by all indexer heads,
    LayerNorm-ed.
  - Partial RoPE, non-interleaved (rotate-half), on the first `rope_dim`
    dims of both q_idx and k_idx, as in DeepSeek-V3.2.
  - weights [B, T, HI] = proj(x) * HI**-0.5 * DI**-0.5: DeepSeek's reference
    folds the dot-product scale DI**-0.5 into the head weights, so the pure
    `indexer_scores` stays scale-free.
  """

  def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *,
               rope_dim: int | None = None, query_input_dim: int | None = None,
               rope_base: float = 10000.0, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if rope_dim is None:
      rope_dim = head_dim // 2
    if rope_dim < 0 or rope_dim > head_dim or rope_dim % 2:
      raise ValueError(
          f"rope_dim must be even and in [0, head_dim={head_dim}], got "
          f"{rope_dim}.")
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.rope_dim = rope_dim
    self.rope_base = rope_base
    self.dtype = dtype
    q_in = query_input_dim or embed_dim
    q_axis = "q_latent" if query_input_dim else "embed"
    self.wq = param(rngs, (q_in, num_heads, head_dim),
                    (q_axis, "indexer_heads", "indexer_dim"), param_dtype)
    self.wk = param(rngs, (embed_dim, head_dim), ("embed", "indexer_dim"),
                    param_dtype)
    self.k_norm = nnx.LayerNorm(head_dim, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    tag(self.k_norm, {"scale": ("indexer_dim",), "bias": ("indexer_dim",)})
    self.w_weights = param(rngs, (embed_dim, num_heads),
                           ("embed", "indexer_heads"), param_dtype)
    self.has_query_latent = query_input_dim is not None

  def __call__(self, x: jax.Array, positions: jax.Array,
               q_latent: jax.Array | None = None):
    """x [B, T, E], positions int32[B, T] -> q_idx, k_idx, weights."""
    x = x.astype(self.dtype)
    q_src = x
    if self.has_query_latent:
      if q_latent is None:
        raise ValueError("this indexer was built with query_input_dim; pass "
                         "q_latent [B, T, query_input_dim].")
      q_src = q_latent.astype(self.dtype)
    q = jnp.einsum("bte,ehd->bthd", q_src, self.wq[...].astype(self.dtype))
    k = jnp.einsum("bte,ed->btd", x, self.wk[...].astype(self.dtype))
    k = self.k_norm(k)
    q = apply_rope(q, positions, rope_dim=self.rope_dim, base=self.rope_base)
    k = apply_rope(k[:, :, None, :], positions, rope_dim=self.rope_dim,
                   base=self.rope_base)[:, :, 0, :]
    scale = (self.num_heads ** -0.5) * (self.head_dim ** -0.5)
    w = jnp.einsum("bte,eh->bth", x, self.w_weights[...].astype(self.dtype))
    return q, k, w * scale
