"""A small decoder-only transformer whose attention kind is a config field.

    logits, aux = model(tokens[B, T], mode="sparse", kv_lengths=None)

Pre-norm blocks: x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x)); token
embedding scaled by sqrt(E); final RMSNorm; output tied to the embedding or
a separate [E, V] matrix. RoPE lives inside the attention layers. GQA/MQA via
num_kv_heads. `aux` sums the layers' aux dicts (indexer_kl, attended_keys,
visible_keys) and adds attended_fraction = attended_keys / visible_keys.

Attention kinds are built by `ATTENTION_KINDS[name](cfg, rngs=rngs)`; a new
kind only needs a layer with the `sparse_attn.layers` call signature and one
`register_attention` call. Every parameter carries `logical_axes` metadata
(vocab, embed, heads, kv_heads, head_dim, mlp, indexer_*) that
`sparse_attn.sharding` maps to mesh axes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn.baseline_layers import BASELINE_LAYERS
from sparse_attn.config import ModelConfig
from sparse_attn.layers import MODES, DenseAttention, DSAAttention, param

AttentionFactory = Callable[..., nnx.Module]
ATTENTION_KINDS: dict[str, AttentionFactory] = {}
# Kinds whose layers own a lightning indexer (and so have a warm-up stage).
_KINDS_WITH_INDEXER: set[str] = set()


_KIND_PARAMS: dict[str, frozenset[str]] = {}


def register_attention(name: str, factory: AttentionFactory, *,
                       has_indexer: bool = False,
                       params: frozenset[str] = frozenset()) -> None:
  """Adds an attention kind: factory(cfg, *, layer_index, rngs) -> layer.

  `params` names the kind-specific arguments accepted in
  `cfg.attention_params` (checked by `config.validate`).
  """
  accepted = inspect.signature(factory).parameters
  if "layer_index" not in accepted and not any(
      p.kind == p.VAR_KEYWORD for p in accepted.values()):
    # Factories written as factory(cfg, *, rngs) keep working.
    plain = factory
    factory = lambda cfg, *, layer_index=0, rngs: plain(cfg, rngs=rngs)
  ATTENTION_KINDS[name] = factory
  _KIND_PARAMS[name] = frozenset(params)
  if has_indexer:
    _KINDS_WITH_INDEXER.add(name)
  else:
    _KINDS_WITH_INDEXER.discard(name)


def kind_has_indexer(name: str) -> bool:
  return name in _KINDS_WITH_INDEXER


def attention_param_names(name: str) -> frozenset[str]:
  return _KIND_PARAMS.get(name, frozenset())


def _common(cfg: ModelConfig) -> dict[str, Any]:
  return dict(rope_base=cfg.rope_base, dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype))


def _dense(cfg: ModelConfig, *, layer_index: int = 0,
           rngs: nnx.Rngs) -> nnx.Module:
  del layer_index
  return DenseAttention(cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, rngs=rngs, **_common(cfg))


def _dsa(cfg: ModelConfig, *, layer_index: int = 0,
         rngs: nnx.Rngs) -> nnx.Module:
  del layer_index
  return DSAAttention(cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, top_k=cfg.top_k,
                      indexer_heads=cfg.indexer_heads,
                      indexer_dim=cfg.indexer_dim,
                      indexer_rope_dim=cfg.indexer_rope_dim,
                      implementation=cfg.implementation, rngs=rngs,
                      **_common(cfg))


register_attention("dense", _dense)
register_attention("dsa", _dsa, has_indexer=True)


def _baseline_factory(kind: str) -> AttentionFactory:
  def factory(cfg: ModelConfig, *, layer_index: int = 0,
              rngs: nnx.Rngs) -> nnx.Module:
    return BASELINE_LAYERS[kind](
        cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
        layer_index=layer_index, rngs=rngs, **_common(cfg),
        **cfg.attention_kwargs)
  return factory


def _constructor_params(cls) -> frozenset[str]:
  skip = {"self", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
          "layer_index", "rngs", "rope_base", "dtype", "param_dtype"}
  sig = inspect.signature(cls.__init__)
  return frozenset(n for n, p in sig.parameters.items()
                   if n not in skip and p.kind == p.KEYWORD_ONLY)


for _kind, _cls in BASELINE_LAYERS.items():
  register_attention(_kind, _baseline_factory(_kind),
                     params=_constructor_params(_cls))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale, statistics in f32."""

  def __init__(self, dim: int, *, eps: float = 1e-6,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype),
                           logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
  """down(silu(x @ gate) * (x @ up))."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.dtype = dtype
    self.gate = param(rngs, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
    self.up = param(rngs, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
    self.down = param(rngs, (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    g = jnp.einsum("bte,em->btm", x, self.gate[...].astype(self.dtype))
    u = jnp.einsum("bte,em->btm", x, self.up[...].astype(self.dtype))
    return jnp.einsum("btm,me->bte", jax.nn.silu(g) * u,
                      self.down[...].astype(self.dtype))


class Block(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU, both residual."""

  def __init__(self, cfg: ModelConfig, *, layer_index: int = 0,
               rngs: nnx.Rngs):
    pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pd,
                             rngs=rngs)
    self.attn = ATTENTION_KINDS[cfg.attention](cfg, layer_index=layer_index,
                                               rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pd,
                            rngs=rngs)
    self.mlp = SwiGLU(cfg.embed_dim, cfg.mlp_dim, dtype=dt, param_dtype=pd,
                      rngs=rngs)

  def __call__(self, x, *, positions, kv_lengths, mode):
    y, aux = self.attn(self.attn_norm(x), positions=positions,
                       kv_lengths=kv_lengths, mode=mode)
    x = x + y.astype(x.dtype)
    x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return x, aux


class Transformer(nnx.Module):
  """Decoder-only LM: tokens int[B, T] -> (logits f32[B, T, V], aux)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.attention not in ATTENTION_KINDS:
      raise ValueError(f"unknown attention kind {cfg.attention!r}; known: "
                       f"{sorted(ATTENTION_KINDS)}.")
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.embed_dim),
                       ("vocab", "embed"), pd,
                       init=nnx.initializers.normal(cfg.embed_dim ** -0.5))
    self.blocks = nnx.List([Block(cfg, layer_index=i, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pd,
                              rngs=rngs)
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (cfg.embed_dim, cfg.vocab_size),
                           ("embed", "vocab"), pd)

  def __call__(self, tokens: jax.Array, *, mode: str = "sparse",
               kv_lengths: jax.Array | None = None,
               positions: jax.Array | None = None):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int[B, T], got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers, got {tokens.dtype}.")
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                   (batch, length))
    table = self.embed[...]
    x = table[tokens].astype(self.dtype) * jnp.asarray(
        self.cfg.embed_dim ** 0.5, self.dtype)
    totals = None
    for block in self.blocks:
      x, aux = block(x, positions=positions, kv_lengths=kv_lengths, mode=mode)
      totals = aux if totals is None else jax.tree.map(jnp.add, totals, aux)
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = jnp.einsum("bte,ve->btv", x, table.astype(self.dtype))
    else:
      logits = jnp.einsum("bte,ev->btv", x,
                          self.unembed[...].astype(self.dtype))
    totals = dict(totals)
    totals["attended_fraction"] = totals["attended_keys"] / jnp.maximum(
        totals["visible_keys"], 1.0)
    return logits.astype(jnp.float32), totals


def build_model(cfg: ModelConfig, *, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


# Parameter groups: indexer parameters (trained on the indexer KL) vs the
# main model (trained on the LM loss).
INDEXER = nnx.All(nnx.Param, nnx.PathContains("indexer"))
MAIN = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("indexer")))


def count_params(model: nnx.Module) -> dict[str, int]:
  _, idx, main = nnx.split(model, INDEXER, MAIN)
  size = lambda s: sum(int(x.size) for x in jax.tree.leaves(s))
  return {"indexer": size(idx), "main": size(main)}
