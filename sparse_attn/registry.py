"""The registry of attention kinds: one `AttentionKind` spec per kind.

Config validation, the model, decoding, key budgets (`sparse_attn.budgets`),
the experiments and the notebooks all read kinds from here, so adding a kind
is one module (a layer class, a params dataclass, a budget function, a pure
form and an `AttentionKind`) plus one `register` call:

    from sparse_attn import registry
    registry.register(my_module.KIND)
    cfg = ModelConfig(attention="my_kind", attention_params={"width": 8})

See docs/adding_a_kind.md for a worked example.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flax import nnx

from sparse_attn.nn import (
  compressed,
  compressed_hybrid,
  dense,
  dsa,
  hisa,
  indexcache,
  lsh,
  mla,
  mla_dsa,
  moba,
  nsa,
  sliding_window,
  sparse_transformer,
)
from sparse_attn.nn.base import AttentionLayer
from sparse_attn.nn.kind import AttentionKind

__all__ = [
  "AttentionKind",
  "comparable_names",
  "get",
  "dense_twin",
  "has_indexer",
  "kinds",
  "names",
  "register",
  "unregister",
  "KindView",
  "ATTENTION_KINDS",
  "BASELINE_LAYERS",
  "register_attention",
  "kind_has_indexer",
  "attention_param_names",
]

_KINDS: dict[str, AttentionKind] = {}


def register(kind: AttentionKind, *, replace: bool = False) -> AttentionKind:
  """Adds a kind; ValueError if the name is taken (unless replace=True)."""
  if not isinstance(kind, AttentionKind):
    raise ValueError(f"register takes an AttentionKind, got {type(kind)}.")
  if kind.name in _KINDS and not replace:
    raise ValueError(
      f"attention kind {kind.name!r} is already registered "
      f"(pass replace=True to override it)."
    )
  if (
    kind.budget_param is not None and kind.budget_param not in kind.param_names
  ):
    raise ValueError(
      f"budget_param {kind.budget_param!r} of kind "
      f"{kind.name!r} is not one of its parameters "
      f"{list(kind.param_names)}."
    )
  _KINDS[kind.name] = kind
  return kind


def unregister(name: str) -> None:
  """Removes a kind (for tests and notebooks that register temporary kinds)."""
  _KINDS.pop(name, None)


def get(name: str) -> AttentionKind:
  """The spec of kind `name`; ValueError listing the known kinds otherwise."""
  try:
    return _KINDS[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"unknown attention kind {name!r}; known: {list(_KINDS)}."
    ) from None


def names() -> tuple[str, ...]:
  """Registered kind names, in registration order."""
  return tuple(_KINDS)


def kinds() -> tuple[AttentionKind, ...]:
  return tuple(_KINDS.values())


def has_indexer(name: str) -> bool:
  """Whether kind `name` owns a lightning indexer (and so a warm-up stage)."""
  return get(name).has_indexer


#: projections -> the dense kind of those projections (a layer of a model's
#: `sparse_layers` complement, the dense original of a retrofit).
_DENSE_OF_PROJECTIONS = {"gqa": "dense", "mla": "mla"}


def dense_twin(name: str) -> str:
  """The dense kind with kind `name`'s projections and parameter tensors
  minus the kind's own ("dense" for GQA kinds, "mla" for MLA kinds)."""
  kind = get(name)
  twin = _DENSE_OF_PROJECTIONS[kind.projections]
  if twin not in _KINDS:
    raise ValueError(
      f"kind {name!r} has no dense twin: {twin!r} is not registered."
    )
  return twin


for _builtin in (
  dense.KIND,
  dsa.KIND,
  sliding_window.KIND,
  sparse_transformer.STRIDED,
  sparse_transformer.FIXED,
  lsh.KIND,
  nsa.KIND,
  moba.KIND,
  mla.KIND,
  mla_dsa.KIND,
  hisa.KIND,
  indexcache.KIND,
  compressed.CSA_KIND,
  compressed.HCA_KIND,
  compressed_hybrid.KIND,
):
  register(_builtin)

# ---------------------------------------------------------------------------
# The names of the first API (kept working; new code uses the specs above).


class KindView(Mapping):
  """A live read-only mapping name -> value(kind) over the registered kinds."""

  def __init__(
    self,
    value: Callable[[AttentionKind], Any],
    include: Callable[[AttentionKind], bool] = lambda k: True,
  ):
    self._value, self._include = value, include

  def __getitem__(self, name: str) -> Any:
    kind = _KINDS.get(name)
    if kind is None or not self._include(kind):
      raise KeyError(name)
    return self._value(kind)

  def __iter__(self) -> Iterator[str]:
    return (n for n, k in _KINDS.items() if self._include(k))

  def __len__(self) -> int:
    return sum(1 for _ in self)


#: name -> factory(cfg, *, layer_index=0, rngs) -> layer.
ATTENTION_KINDS: Mapping[str, Callable[..., nnx.Module]] = KindView(
  lambda k: k.build
)
#: name -> layer class of the older families DSA is compared with (GQA
#: projections, no indexer: DSA's own variants such as HISA are left out).
BASELINE_LAYERS: Mapping[str, type] = KindView(
  lambda k: k.layer,
  lambda k: (
    k.name not in ("dense", "dsa")
    and not k.has_indexer
    and k.layer is not None
    and k.projections == "gqa"
  ),
)


def comparable_names() -> tuple[str, ...]:
  """The kinds compared at equal key budgets on one GQA layer (dense, DSA
  and the families DSA is compared with; not the MLA kinds, nor the kinds
  built by a factory, whose layer depends on its index: csa_hca's is CSA's
  or HCA's)."""
  return tuple(
    n
    for n, k in _KINDS.items()
    if k.projections == "gqa" and k.layer is not None
  )


def register_attention(
  name: str,
  factory: Callable[..., AttentionLayer],
  *,
  has_indexer: bool = False,
  params: frozenset[str] | tuple[str, ...] = frozenset(),
) -> AttentionKind:
  """Registers a kind from a layer factory (the first API's form).

  factory(cfg, *, layer_index, rngs) -> layer (factories without
  layer_index are accepted); `params` names the arguments it reads from
  cfg.attention_params. Prefer `register(AttentionKind(...))`, which also
  gives the kind a key budget and a pure form.
  """
  accepted = inspect.signature(factory).parameters
  takes_index = "layer_index" in accepted or any(
    p.kind == p.VAR_KEYWORD for p in accepted.values()
  )

  def build(cfg, *, layer_index: int = 0, rngs: nnx.Rngs) -> AttentionLayer:
    if takes_index:
      return factory(cfg, layer_index=layer_index, rngs=rngs)
    return factory(cfg, rngs=rngs)

  fields = [(p, Any, dataclasses.field(default=None)) for p in sorted(params)]
  params_cls = dataclasses.make_dataclass(
    f"{name.title()}Params", fields, frozen=True
  )
  return register(
    AttentionKind(
      name=name,
      layer=None,
      params=params_cls,
      has_indexer=has_indexer,
      factory=build,
    ),
    replace=True,
  )


def kind_has_indexer(name: str) -> bool:
  """First-API name of `has_indexer` (False for unknown kinds)."""
  return name in _KINDS and _KINDS[name].has_indexer


def attention_param_names(name: str) -> frozenset[str]:
  """First-API: the parameter names kind `name` accepts in attention_params."""
  kind = _KINDS.get(name)
  if kind is None:
    return frozenset()
  return frozenset(kind.param_names) - set(kind.config_fields)
