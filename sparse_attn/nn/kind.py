"""`AttentionKind`: everything the library knows about one attention kind.

A kind is one spec: its name, its NNX layer class, a frozen dataclass of its
parameters (with defaults), its keys-per-query budget, the parameter that
tunes that budget, whether it has a lightning indexer (and so a warm-up
stage), and its pure-function form. `sparse_attn.registry` holds the specs;
config validation, the model, decoding, key budgets, the experiments and
the notebooks all read them from there.

Parameters reach a layer in one of two ways: from the `ModelConfig` fields
named in `config_fields` (DSA's top_k and indexer sizes, which have their
own config fields), and from `ModelConfig.attention_params` for the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

if TYPE_CHECKING:
  from sparse_attn.config import ModelConfig
  from sparse_attn.nn.base import AttentionLayer


KeysPerQuery = Callable[..., np.ndarray]
PROJECTIONS = ("gqa", "mla")


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  """The spec of one attention kind.

  Attributes:
    name: the registry key (`ModelConfig.attention`).
    layer: the NNX layer class, constructed as
      layer(E, H, G, D, **params, layer_index=, implementation=, block_sizes=,
      rope_base=, dtype=, param_dtype=, rngs=) (+ rope_scaling= when the
      config scales RoPE, and qkv_bias= / out_bias= / qk_norm= + norm_eps=
      when the config sets them: `AttentionLayer` takes them).
    params: a frozen dataclass of the kind's parameters with defaults; its
      `__post_init__` raises ValueError on invalid values.
    keys_per_query: fn(seq_len, params, *, num_heads=None, layer_index=None)
      -> float64[seq_len], keys attended by the query at position i of a
      causal sequence (no padding); None when the kind states no budget.
    attention: the pure-function form, fn(q, k, v, params, *, q_offset=None,
      kv_lengths=None, layer_index=0, implementation=None, **inputs) ->
      [B, T, H, Dv]; kind-specific inputs (DSA's q_idx / k_idx / weights,
      NSA's gates) come as keywords.
    budget_param: the parameter `match_budget` tunes by default.
    has_indexer: the layer owns a lightning indexer (warm-up stage, "warmup"
      and "sparse" modes differ).
    config_fields: parameters taken from ModelConfig fields of the same name.
    projections: "gqa" (the layer projects x to per-head q and kv-head
      k/v, and the pure form takes q [B, T, H, D], k/v [B, S, G, D] of any
      D: the kinds compared with DSA at equal budgets) or "mla" (latent
      projections, DeepSeek's MLA: the pure form takes MLA's q/k/v).
    reference: the paper (for docs and tables).
    dense_copies: names of layer parameters holding several copies of the
      dense twin's parameter of the same name, repeated along one axis
      (NSA's per-branch wk / wv): a dense checkpoint fills each copy
      (`models.transfer.transfer_params(repeat=)`).
    factory: optional fn(cfg, *, layer_index, rngs) -> layer replacing the
      default construction (used by `register_attention` for old-style
      registrations).
  """

  name: str
  layer: type | None
  params: type
  keys_per_query: KeysPerQuery | None = None
  attention: Callable[..., Any] | None = None
  budget_param: str | None = None
  has_indexer: bool = False
  config_fields: tuple[str, ...] = ()
  reference: str = ""
  factory: Callable[..., AttentionLayer] | None = None
  projections: str = "gqa"
  dense_copies: tuple[str, ...] = ()

  def __post_init__(self):
    if self.projections not in PROJECTIONS:
      raise ValueError(
        f"projections must be one of {PROJECTIONS}, got {self.projections!r}."
      )

  @property
  def param_names(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self.params))

  @property
  def defaults(self) -> dict[str, Any]:
    """The parameters' default values (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(self.params):
      if f.default is not dataclasses.MISSING:
        out[f.name] = f.default
      elif f.default_factory is not dataclasses.MISSING:
        out[f.name] = f.default_factory()
    return out

  def make_params(self, **values: Any) -> Any:
    """The params dataclass from keyword values; ValueError on unknown names."""
    unknown = sorted(set(values) - set(self.param_names))
    if unknown:
      raise ValueError(
        f"{unknown} are not parameters of attention kind "
        f"{self.name!r}; its parameters: "
        f"{list(self.param_names)}."
      )
    try:
      return self.params(**values)
    except TypeError as e:  # a field without a default left out
      raise ValueError(f"attention kind {self.name!r}: {e}") from e

  def params_from_config(self, cfg: ModelConfig) -> Any:
    """Parameters of this kind for a ModelConfig (config fields + attention_params)."""
    extra = cfg.attention_kwargs
    clash = sorted(set(extra) & set(self.config_fields))
    if clash:
      raise ValueError(
        f"model.attention_params {clash} of kind {self.name!r} "
        f"are model config fields: set model.{clash[0]} "
        f"instead."
      )
    values = {f: getattr(cfg, f) for f in self.config_fields}
    values.update(extra)
    return self.make_params(**values)

  def build(
    self, cfg: ModelConfig, *, layer_index: int = 0, rngs: nnx.Rngs
  ) -> AttentionLayer:
    """The layer of this kind for a ModelConfig."""
    if self.factory is not None:
      return self.factory(cfg, layer_index=layer_index, rngs=rngs)
    if self.layer is None:
      raise ValueError(f"attention kind {self.name!r} has no layer class.")
    params = self.params_from_config(cfg)
    extra: dict[str, Any] = {}
    # Only when set, so layers of user kinds that predate them still build.
    if cfg.rope_scaling_config is not None:
      extra["rope_scaling"] = cfg.rope_scaling_config
    for option in ("qkv_bias", "out_bias", "qk_norm"):
      if getattr(cfg, option):
        extra[option] = True
    if cfg.qk_norm:
      extra["norm_eps"] = cfg.norm_eps
    return self.layer(
      cfg.embed_dim,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      **as_kwargs(params),
      layer_index=layer_index,
      implementation=cfg.implementation,
      block_sizes=cfg.kernel_block_sizes_dict or None,
      rope_base=cfg.rope_base,
      dtype=jnp.dtype(cfg.dtype),
      param_dtype=jnp.dtype(cfg.param_dtype),
      rngs=rngs,
      **extra,
    )


def as_kwargs(params: Any) -> dict[str, Any]:
  """A params dataclass as constructor keywords (shallow: values kept as is)."""
  return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def pure_form(counted: Callable[..., tuple[Any, Any]]) -> Callable[..., Any]:
  """The registry's pure form of a layer's `counted_attention`: the output
  only (the counts are dropped; under jit they are never computed)."""

  def attention(q, k, v, params, **kw: Any):
    return counted(q, k, v, params, **kw)[0]

  attention.__doc__ = counted.__doc__
  return attention
