"""Reformer LSH attention layer (shared QK; Kitaev et al. 2020)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sparse_attn.kinds.lsh import (
  LOOKBACKS,
  check_lsh_params,
  lsh_attention,
  lsh_nominal_keys_per_query,
)
from sparse_attn.nn.base import AttentionLayer, Context, KVCache, counts_aux
from sparse_attn.nn.kind import AttentionKind, pure_form


@dataclasses.dataclass(frozen=True)
class LSHParams:
  """n_buckets (even), n_hashes rounds, chunk_size, same_bucket, lookback
  ("window": strictly causal; "chunk": the paper's own + previous chunk),
  hash_seed (rotations are fold_in(key(hash_seed), layer_index))."""

  n_buckets: int = 8
  n_hashes: int = 2
  chunk_size: int = 32
  same_bucket: bool = True
  lookback: str = "window"
  hash_seed: int = 0

  def __post_init__(self):
    check_lsh_params(self.n_buckets, self.n_hashes, self.chunk_size)
    if self.lookback not in LOOKBACKS:
      raise ValueError(
        f"lookback must be one of {LOOKBACKS}, got {self.lookback!r}."
      )


@struct.dataclass
class LSHCache(KVCache):
  """k holds the shared-QK vectors of all H heads before RoPE [B, S_max, H,
  D] (hashed as they are, rotated by position when attended)."""

  axes: ClassVar[dict[str, tuple[str, ...]]] = {
    "k": ("batch", "length", "heads", "head_dim"),
    "v": ("batch", "length", "kv_heads", "head_dim"),
  }


def hash_key(hash_seed: int, layer_index: int) -> jax.Array:
  """The layer's fixed rotation key: fold_in(key(hash_seed), layer_index)."""
  return jax.random.fold_in(jax.random.key(hash_seed), layer_index)


def counted_attention(
  q: jax.Array,
  k: jax.Array | None,
  v: jax.Array,
  params: LSHParams,
  *,
  kv_lengths=None,
  layer_index: int = 0,
  hash_qk: jax.Array | None = None,
  **_: Any,
) -> tuple[jax.Array, jax.Array]:
  """Shared-QK LSH self-attention: q is the QK projection; k is ignored.

  hash_qk: the vectors hashed into buckets, [B, T, H, D] (default q); the
  layer passes the QK projection before RoPE (content-only buckets,
  `kinds.lsh.lsh_attention`). Returns (o [B, T, H, Dv], keys per query
  f32[B, T]). Self-attention over one whole sequence only (T == S): LSH has
  no incremental form (the layer decodes by recomputing over its cache).
  """
  del k
  if q.shape[1] != v.shape[1]:
    raise ValueError(
      f"LSH attention is self-attention over a whole sequence "
      f"(T == S): q shape {q.shape}, v shape {v.shape}."
    )
  return lsh_attention(
    q,
    v,
    n_buckets=params.n_buckets,
    n_hashes=params.n_hashes,
    chunk_size=params.chunk_size,
    key=hash_key(params.hash_seed, layer_index),
    same_bucket=params.same_bucket,
    lookback=params.lookback,
    kv_lengths=kv_lengths,
    hash_qk=hash_qk,
    return_counts=True,
  )


class LSHAttention(AttentionLayer):
  """Reformer LSH attention with shared QK (no key projection).

  Queries and keys both come from the query projection `wq` (keys are the
  length-normalised queries), so this layer has no `wk`. Buckets hash the
  projection before RoPE (a token's content, as in Reformer, whose
  position lives in the input embeddings); the logits inside a bucket use
  it after RoPE. Rotations are fixed
  per layer (`hash_key`), drawn at every call: deterministic, no RNG state,
  identical in training and evaluation. Decoding recomputes LSH attention
  over the cached prefix (there is no incremental form); it is exact for
  lookback="window" only, so `init_cache` refuses "chunk".
  """

  projection_options = False
  counted_attention = staticmethod(counted_attention)

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    n_buckets: int = LSHParams.n_buckets,
    n_hashes: int = LSHParams.n_hashes,
    chunk_size: int = LSHParams.chunk_size,
    same_bucket: bool = LSHParams.same_bucket,
    lookback: str = LSHParams.lookback,
    hash_seed: int = LSHParams.hash_seed,
    **kw: Any,
  ):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    del self.wk
    self.params = LSHParams(
      n_buckets, n_hashes, chunk_size, same_bucket, lookback, hash_seed
    )

  def project(self, x, positions):
    """(shared QK after RoPE, shared QK before RoPE (the hashed content, in
    the k slot and the cache), v)."""
    x = x.astype(self.dtype)
    qk = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(self.dtype))
    v = jnp.einsum("bte,egd->btgd", x, self.wv[...].astype(self.dtype))
    return self.rope(qk, positions), qk, v

  def hash_key(self) -> jax.Array:
    return hash_key(self.params.hash_seed, self.layer_index)

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> LSHCache:
    del index_dtype
    if self.params.lookback != "window":
      raise ValueError(
        "LSH decode is only exact with lookback='window' (chunk boundaries "
        "of lookback='chunk' depend on every token); this layer has "
        f"lookback={self.params.lookback!r}."
      )
    dt = self.dtype if dtype is None else dtype
    qk = (batch_size, max_len, self.num_heads, self.head_dim)
    v = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    return LSHCache(k=jnp.zeros(qk, dt), v=jnp.zeros(v, dt))

  def attention_kv(self, k, v):
    # k: the shared QK before RoPE, hashed; q (after RoPE) is also the keys.
    return None, v, {"hash_qk": k}

  def attend(self, q, k, v, ctx: Context):
    if not ctx.decoding:
      return super().attend(q, k, v, ctx)
    # k is the cached prefix [B, view, H, D] before RoPE (cache slot s holds
    # position s): recompute over the prefix, keep the new tokens' rows.
    prefix = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
    o, counts = counted_attention(
      self.rope(k, prefix),
      None,
      v,
      self.params,
      kv_lengths=ctx.kv_lengths,
      layer_index=self.layer_index,
      hash_qk=k,
    )
    rows = jnp.clip(ctx.positions, 0, o.shape[1] - 1)
    o = jnp.take_along_axis(o, rows[:, :, None, None], axis=1)
    counts = jnp.take_along_axis(counts, rows, axis=1)
    return (
      o,
      counts_aux(counts, ctx.positions, k.shape[1], ctx.kv_lengths),
      ctx.cache,
    )


def keys_per_query(seq_len: int, params: LSHParams, **_: Any) -> np.ndarray:
  return lsh_nominal_keys_per_query(
    seq_len,
    n_hashes=params.n_hashes,
    chunk_size=params.chunk_size,
    n_buckets=params.n_buckets,
    same_bucket=params.same_bucket,
  )


KIND = AttentionKind(
  name="lsh",
  layer=LSHAttention,
  params=LSHParams,
  keys_per_query=keys_per_query,
  attention=pure_form(counted_attention),
  budget_param="chunk_size",
  reference="Kitaev et al. 2020 (Reformer)",
)
