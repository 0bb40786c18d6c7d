"""DeepSeek-V4's layer schedule: CSA and HCA layers in one model (kind "csa_hca").

DeepSeek-V4 does not use one compressed attention throughout: its layers
alternate compressed sparse attention (CSA, light compression + the
indexer's top-k) and heavily compressed attention (HCA, heavy compression,
every entry), after a few HCA layers at the bottom. transformers'
DeepseekV4Config builds the default schedule as

    ["hca"] * 2 + ["hca" if i % 2 == 0 else "csa" for i in range(L - 2)]

(`layer_types`, "heavily_compressed_attention" / "compressed_sparse_
attention"). This kind builds layer i as `CSAAttention` or `HCAAttention`
(`sparse_attn.nn.compressed`) by that schedule, each with its own ratio and
the shared window and sinks; `layer_types` gives any other schedule
(cycled over the layers). The layers, their caches and their training
stages are those of the two kinds: the CSA layers' indexers warm up and
train as CSA's, the HCA layers add no indexer loss.

Its key budget is the mean over one CSA and one HCA layer (the
interleaved part of the schedule) unless a layer_index is given; `top_k`
tunes it. Its pure form is the layer's kind at `layer_index`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from sparse_attn.nn.base import AttentionLayer
from sparse_attn.nn.compressed import (
  CSA_KIND,
  HCA_KIND,
  V4_REFERENCE,
  CSAParams,
  HCAParams,
  csa_attention,
  csa_keys_per_query,
  hca_attention,
  hca_keys_per_query,
)
from sparse_attn.nn.kind import AttentionKind

LAYER_TYPES = ("csa", "hca")


@dataclasses.dataclass(frozen=True)
class CSAHCAParams:
  """top_k, window, sinks and the indexer sizes as `CSAParams`; csa_ratio /
  hca_ratio: tokens per entry of the CSA / HCA layers; hca_first: the HCA
  layers at the bottom before the interleave (V4: 2); layer_types: an
  explicit schedule ("csa" / "hca" per layer, cycled), None: V4's."""

  top_k: int = CSAParams.top_k
  csa_ratio: int = CSAParams.ratio
  hca_ratio: int = HCAParams.ratio
  window: int = CSAParams.window
  sinks: bool = CSAParams.sinks
  indexer_heads: int = CSAParams.indexer_heads
  indexer_dim: int = CSAParams.indexer_dim
  indexer_rope_dim: int | None = CSAParams.indexer_rope_dim
  detach_indexer_input: bool = CSAParams.detach_indexer_input
  hca_first: int = 2
  layer_types: tuple[str, ...] | None = None

  def __post_init__(self):
    self.csa  # validates the CSA layers' parameters  # noqa: B018
    self.hca  # noqa: B018
    if not isinstance(self.hca_first, int) or self.hca_first < 0:
      raise ValueError(
        f"hca_first must be an int >= 0, got {self.hca_first!r}."
      )
    if self.layer_types is not None:
      types = tuple(self.layer_types)
      bad = [t for t in types if t not in LAYER_TYPES]
      if not types or bad:
        raise ValueError(
          f"layer_types must be a non-empty list of {LAYER_TYPES}, got "
          f"{self.layer_types!r}."
        )
      object.__setattr__(self, "layer_types", types)

  @property
  def csa(self) -> CSAParams:
    return CSAParams(
      top_k=self.top_k,
      ratio=self.csa_ratio,
      window=self.window,
      sinks=self.sinks,
      indexer_heads=self.indexer_heads,
      indexer_dim=self.indexer_dim,
      indexer_rope_dim=self.indexer_rope_dim,
      detach_indexer_input=self.detach_indexer_input,
    )

  @property
  def hca(self) -> HCAParams:
    return HCAParams(ratio=self.hca_ratio, window=self.window, sinks=self.sinks)

  def layer_type(self, layer_index: int) -> str:
    """ "csa" or "hca": the kind of layer `layer_index`."""
    if (
      isinstance(layer_index, bool)
      or not isinstance(layer_index, (int, np.integer))
      or layer_index < 0
    ):
      raise ValueError(f"layer_index must be an int >= 0, got {layer_index!r}.")
    i = int(layer_index)
    if self.layer_types is not None:
      return self.layer_types[i % len(self.layer_types)]
    if i < self.hca_first:
      return "hca"
    return "csa" if (i - self.hca_first) % 2 else "hca"

  def layer_params(self, layer_index: int) -> CSAParams | HCAParams:
    return self.csa if self.layer_type(layer_index) == "csa" else self.hca


def build_layer(
  cfg: Any, *, layer_index: int = 0, rngs: nnx.Rngs
) -> AttentionLayer:
  """Layer `layer_index` of a csa_hca model: CSA's or HCA's own layer, built
  from the config of that kind (every generic option kept)."""
  p = KIND.params_from_config(cfg)
  kind = CSA_KIND if p.layer_type(layer_index) == "csa" else HCA_KIND
  sub = p.layer_params(layer_index)
  values = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)}
  fields = {f: values.pop(f) for f in kind.config_fields}
  layer_cfg = dataclasses.replace(
    cfg, attention=kind.name, attention_params=values, **fields
  )
  return kind.build(layer_cfg, layer_index=layer_index, rngs=rngs)


def csa_hca_keys_per_query(
  seq_len: int, params: CSAHCAParams, *, layer_index: int | None = None, **_
) -> np.ndarray:
  if layer_index is not None:
    if params.layer_type(layer_index) == "csa":
      return csa_keys_per_query(seq_len, params.csa)
    return hca_keys_per_query(seq_len, params.hca)
  return 0.5 * (
    csa_keys_per_query(seq_len, params.csa)
    + hca_keys_per_query(seq_len, params.hca)
  )


def csa_hca_attention(
  q, k, v, params: CSAHCAParams, *, layer_index: int = 0, **kw: Any
):
  """The pure form of layer `layer_index`'s kind (`csa_attention`, which
  takes q_idx / k_idx / weights, or `hca_attention`)."""
  if params.layer_type(layer_index) == "csa":
    return csa_attention(q, k, v, params.csa, **kw)
  for name in ("q_idx", "k_idx", "weights"):
    kw.pop(name, None)
  return hca_attention(q, k, v, params.hca, **kw)


KIND = AttentionKind(
  name="csa_hca",
  layer=None,
  factory=build_layer,
  params=CSAHCAParams,
  keys_per_query=csa_hca_keys_per_query,
  attention=csa_hca_attention,
  budget_param="top_k",
  has_indexer=True,
  config_fields=CSA_KIND.config_fields,
  reference=f"{V4_REFERENCE}: CSA and HCA layers interleaved",
)
