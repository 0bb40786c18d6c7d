"""A decoder-only transformer whose attention kind is a config field.

One forward serves training, evaluation, chunked prefill and decode steps:

    logits, aux = model(tokens[B, T], mode="sparse", kv_lengths=None)
    cache = model.init_cache(batch_size, max_len)
    logits, aux, cache = model(tokens, cache=cache, num_valid=n)  # prefill/decode

Pre-norm blocks: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)), the MLP a
SwiGLU or, with `cfg.moe`, DeepSeek's MoE after the first
`first_dense_layers` blocks; token embedding scaled by sqrt(E) (unless
`scale_embeddings=False`, as in the HF families); final RMSNorm; output
tied to the embedding or a separate [E, V] matrix. RoPE lives inside the
attention layers. GQA/MQA via num_kv_heads; MLA (DeepSeek-V3/V3.2) via the
"mla" / "mla_dsa" kinds. `aux` sums the layers' aux dicts (indexer_kl, attended_keys,
visible_keys) and adds attended_fraction = attended_keys / visible_keys.

Each block's attention layer is built from the kinds registry
(`sparse_attn.registry.get(cfg.attention).build(cfg, ...)`). Every parameter
carries `logical_axes` metadata (vocab, embed, heads, kv_heads, head_dim,
mlp, indexer_*) that `sparse_attn.sharding` maps to mesh axes.
"""

from __future__ import annotations

from typing import Any, overload

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn import registry
from sparse_attn.config import ModelConfig
from sparse_attn.models.cache import Cache
from sparse_attn.nn.base import MODES, Aux, check_mode
from sparse_attn.nn.index_share import group_sizes
from sparse_attn.nn.mlp import SwiGLU
from sparse_attn.nn.moe import MoE
from sparse_attn.nn.norm import RMSNorm
from sparse_attn.nn.params import param


class Block(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU, both residual."""

  def __init__(self, cfg: ModelConfig, *, layer_index: int = 0, rngs: nnx.Rngs):
    pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pd)
    layer_cfg = cfg.for_layer(layer_index)
    self.attn = registry.get(layer_cfg.attention).build(
      layer_cfg, layer_index=layer_index, rngs=rngs
    )
    self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pd)
    moe = cfg.moe_config
    if moe is not None and layer_index >= moe.first_dense_layers:
      self.mlp: nnx.Module = MoE(
        cfg.embed_dim, moe, dtype=dt, param_dtype=pd, rngs=rngs
      )
    else:
      self.mlp = SwiGLU(
        cfg.embed_dim, cfg.mlp_dim, dtype=dt, param_dtype=pd, rngs=rngs
      )

  @overload
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array,
    kv_lengths: jax.Array | None,
    mode: str,
    cache: None = None,
    view: int | None = None,
    context_parallel: Any = None,
    shared: Any = None,
  ) -> tuple[jax.Array, Aux]: ...

  @overload
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array,
    kv_lengths: jax.Array | None,
    mode: str,
    cache: Any,
    view: int | None = None,
    context_parallel: Any = None,
    shared: Any = None,
  ) -> tuple[jax.Array, Aux, Any]: ...

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array,
    kv_lengths: jax.Array | None,
    mode: str,
    cache: Any = None,
    view: int | None = None,
    context_parallel: Any = None,
    shared: Any = None,
  ) -> tuple[jax.Array, Aux] | tuple[jax.Array, Aux, Any]:
    """(x, aux) without a cache; (x, aux, cache) with one (shared: see
    `AttentionLayer.__call__`)."""
    h = self.attn_norm(x)
    if cache is None:
      y, aux = self.attn(
        h,
        positions=positions,
        kv_lengths=kv_lengths,
        mode=mode,
        context_parallel=context_parallel,
        shared=shared,
      )
    else:
      y, aux, cache = self.attn(
        h,
        positions=positions,
        kv_lengths=kv_lengths,
        mode=mode,
        cache=cache,
        view=view,
        context_parallel=context_parallel,
        shared=shared,
      )
    x = x + y.astype(x.dtype)
    x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return (x, aux) if cache is None else (x, aux, cache)


class Transformer(nnx.Module):
  """Decoder-only LM: tokens int[B, T] -> (logits f32[B, T, V], aux[, cache])."""

  #: The config.json (as JSON text) of the HF checkpoint the weights were
  #: loaded from (`sparse_attn.hf.load_pretrained`), so that save_pretrained
  #: writes back the fields the model does not define (token ids, ...).
  hf_config_json: str | None = None

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    registry.get(cfg.attention)  # a clear error for unknown kinds
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    self.embed = param(
      rngs,
      (cfg.vocab_size, cfg.embed_dim),
      ("vocab", "embed"),
      pd,
      init=nnx.initializers.normal(cfg.embed_dim**-0.5),
    )
    self.blocks = nnx.List(
      [Block(cfg, layer_index=i, rngs=rngs) for i in range(cfg.num_layers)]
    )
    # IndexCache: each DSA layer's sharing group (its full layer + the
    # layers reusing that layer's top-k), for the distillation loss's mean.
    roles = [getattr(b.attn, "index_role", None) for b in self.blocks]
    for block, size in zip(self.blocks, group_sizes(roles)):
      if size:
        block.attn.index_group_size = size  # pyright: ignore[reportAttributeAccessIssue]
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pd)
    if not cfg.tie_embeddings:
      self.unembed = param(
        rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), pd
      )

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> Cache:
    """Zero cache (lengths 0) for batch_size rows of up to max_len tokens.

    dtype: K/V storage (default: the activation dtype); index_dtype: DSA's
    indexer key cache ("float32", "bfloat16" or "float8_e4m3fn").
    """
    if batch_size < 1 or max_len < 1:
      raise ValueError(
        f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}."
      )
    layers = tuple(
      block.attn.init_cache(
        batch_size, max_len, dtype=dtype, index_dtype=index_dtype
      )
      for block in self.blocks
    )
    return Cache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32))

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens int[B, T] -> the first block's input [B, T, E] (times sqrt(E)
    with scale_embeddings)."""
    x = self.embed[...][tokens].astype(self.dtype)
    if self.cfg.scale_embeddings:
      x = x * jnp.asarray(self.cfg.embed_dim**0.5, self.dtype)
    return x

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm + output projection: x [..., E] -> f32[..., V]."""
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      out = jnp.einsum("...e,ve->...v", x, self.embed[...].astype(self.dtype))
    else:
      out = jnp.einsum("...e,ev->...v", x, self.unembed[...].astype(self.dtype))
    return out.astype(jnp.float32)

  @overload
  def __call__(
    self,
    tokens: jax.Array,
    *,
    mode: str = "sparse",
    kv_lengths: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: None = None,
    num_valid: jax.Array | None = None,
    view: int | None = None,
    logits_at: jax.Array | None = None,
    context_parallel: Any = None,
  ) -> tuple[jax.Array, Aux]: ...

  @overload
  def __call__(
    self,
    tokens: jax.Array,
    *,
    mode: str = "sparse",
    kv_lengths: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: Cache,
    num_valid: jax.Array | None = None,
    view: int | None = None,
    logits_at: jax.Array | None = None,
    context_parallel: Any = None,
  ) -> tuple[jax.Array, Aux, Cache]: ...

  def __call__(
    self,
    tokens: jax.Array,
    *,
    mode: str = "sparse",
    kv_lengths: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: Cache | None = None,
    num_valid: jax.Array | None = None,
    view: int | None = None,
    logits_at: jax.Array | None = None,
    context_parallel: Any = None,
  ) -> tuple[jax.Array, Aux] | tuple[jax.Array, Aux, Cache]:
    """The forward pass.

    Without a cache: tokens int[B, T] at `positions` (default 0..T-1), keys
    past kv_lengths int32[B] are padding. Returns (logits, aux).

    With a cache: the T new tokens of row b go to positions
    cache.lengths[b] + arange(T); the first num_valid[b] (default T) are
    real, the rest padding that is written but never attended. `view`
    (static) bounds the cache prefix attention reads. Returns (logits, aux,
    cache) with lengths advanced by num_valid. `positions` / `kv_lengths`
    come from the cache then and must not be passed.

    logits_at int32[B]: return only the logits of token logits_at[b] of each
    row, f32[B, V] (e.g. the last real token of a prefill chunk).

    context_parallel (`sparse_attn.nn.context_parallel.ContextParallel`):
    tokens are in its layout order, sharded over its mesh axis
    (`ContextParallel.layout_batch`); positions default to that layout's
    and logits come back in the same order. Without a cache, no
    kv_lengths. With a cache, a prefill chunk (T splits into the layout):
    the cache is written in natural order, num_valid and logits_at count
    natural positions within the chunk.
    """
    check_mode(mode)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int[B, T], got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got {tokens.dtype}.")
    batch, length = tokens.shape
    if cache is not None:
      if positions is not None or kv_lengths is not None:
        raise ValueError(
          "with a cache, positions and kv_lengths follow from "
          "cache.lengths and num_valid; do not pass them."
        )
      if len(cache.layers) != len(self.blocks):
        raise ValueError(
          f"cache has {len(cache.layers)} layers, the model {len(self.blocks)}."
        )
      if tuple(cache.lengths.shape) != (batch,):
        raise ValueError(
          f"cache holds {cache.lengths.shape[0]} rows, tokens "
          f"{batch} (shape {tokens.shape})."
        )
      if num_valid is None:
        num_valid = jnp.full((batch,), length, jnp.int32)
      within = jnp.arange(length, dtype=jnp.int32)
      if context_parallel is not None:
        context_parallel.check_length(f"tokens of shape {tokens.shape}", length)
        within = context_parallel.layout_positions(1, length)[0]
      positions = cache.lengths[:, None] + within
      kv_lengths = cache.lengths + num_valid
    elif num_valid is not None or view is not None:
      raise ValueError("num_valid and view apply only with a cache.")
    if context_parallel is not None and cache is None:
      if kv_lengths is not None:
        raise ValueError(
          "context_parallel runs full sequences without padding: "
          "kv_lengths must be None without a cache."
        )
      if positions is None:
        positions = context_parallel.layout_positions(batch, length)
    if positions is None:
      positions = jnp.broadcast_to(
        jnp.arange(length, dtype=jnp.int32), (batch, length)
      )
    x = self.embed_tokens(tokens)
    totals: Aux | None = None
    new_layers = []
    shared = None  # the last full DSA layer's selection (IndexCache)
    for i, block in enumerate(self.blocks):
      if cache is None:
        x, aux = block(
          x,
          positions=positions,
          kv_lengths=kv_lengths,
          mode=mode,
          context_parallel=context_parallel,
          shared=shared,
        )
      else:
        x, aux, lc = block(
          x,
          positions=positions,
          kv_lengths=kv_lengths,
          mode=mode,
          cache=cache.layers[i],
          view=view,
          context_parallel=context_parallel,
          shared=shared,
        )
        new_layers.append(lc)
      aux = dict(aux)
      exported = aux.pop("index_share", None)
      if exported is not None:
        shared = exported
      totals = aux if totals is None else jax.tree.map(jnp.add, totals, aux)
    if logits_at is not None:
      at = jnp.clip(jnp.asarray(logits_at, jnp.int32), 0, length - 1)
      if context_parallel is not None:
        at = context_parallel.layout_rows(at, length)
      x = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
    logits = self.logits(x)
    assert totals is not None
    totals = dict(totals)
    totals["attended_fraction"] = totals["attended_keys"] / jnp.maximum(
      totals["visible_keys"], 1.0
    )
    if cache is None:
      return logits, totals
    assert kv_lengths is not None  # with a cache it is lengths + num_valid
    return (
      logits,
      totals,
      Cache(tuple(new_layers), kv_lengths, cache.max_length),
    )


def build_model(cfg: ModelConfig, *, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


# Parameter groups: indexer parameters (trained on the indexer KL) vs the
# main model (trained on the LM loss).
INDEXER = nnx.All(nnx.Param, nnx.PathContains("indexer"))
MAIN = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("indexer")))


def count_params(model: nnx.Module) -> dict[str, int]:
  """Parameter counts of the two groups: {"indexer": n, "main": n}."""
  _, idx, main = nnx.split(model, INDEXER, MAIN)

  def size(s):
    return sum(int(x.size) for x in jax.tree.leaves(s))

  return {"indexer": size(idx), "main": size(main)}


__all__ = [
  "MODES",
  "Block",
  "Transformer",
  "build_model",
  "INDEXER",
  "MAIN",
  "count_params",
]
