"""Choosing which DSA layers keep an indexer (IndexCache's two ways).

A trained DSA model has an indexer in every DSA layer. IndexCache keeps
some ("full") and lets the others reuse the nearest preceding full layer's
top-k (`sparse_attn.nn.index_share`). Which ones:

  fixed pattern   one full layer every N (`every_n_pattern`), no search;
  greedy search   training-free (`greedy_index_share`): starting with every
                  layer full, flip one layer per step to shared, the one
                  whose flip gives the lowest LM loss on calibration
                  batches, until `num_shared` layers share;
then optionally the training-aware variant: train the model of the chosen
pattern with `index_share_distill` on (the default), so each full indexer
learns from the attention of every layer it serves.

    steps = greedy_index_share(model, batches, num_shared=2)
    shared_model = with_index_pattern(model, steps[-1].indexer_layers)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn.config import ModelConfig
from sparse_attn.models.transfer import transfer_params
from sparse_attn.models.transformer import Transformer, build_model
from sparse_attn.nn.index_share import every_n_pattern
from sparse_attn.ops import losses

__all__ = [
  "SearchStep",
  "calibration_loss",
  "dsa_layers",
  "every_n_pattern",
  "greedy_index_share",
  "with_index_pattern",
]


class SearchStep(NamedTuple):
  """One step of the greedy search: the pattern after it and its loss."""

  indexer_layers: tuple[int, ...]  # the full layers
  flipped: int | None  # the layer made shared at this step (None: start)
  loss: float  # mean LM loss on the calibration batches


def dsa_layers(model: Transformer) -> tuple[int, ...]:
  """Indices of the model's layers that take part in top-k reuse (DSA)."""
  return tuple(
    i
    for i, b in enumerate(model.blocks)
    if getattr(b.attn, "index_role", None) is not None
  )


def _pattern_config(cfg: ModelConfig, layers: Sequence[int]) -> ModelConfig:
  params = dict(cfg.attention_kwargs)
  params.pop("indexer_every", None)
  params["indexer_layers"] = tuple(sorted(int(i) for i in layers))
  return dataclasses.replace(cfg, attention_params=params)


def with_index_pattern(
  model: Transformer, indexer_layers: Sequence[int]
) -> Transformer:
  """A copy of `model` whose full DSA layers are `indexer_layers`: every
  parameter is model's, the indexers of the layers made shared are dropped.
  (A layer made full that had no indexer keeps a fresh one.)"""
  new = build_model(_pattern_config(model.cfg, indexer_layers))
  moved = transfer_params(
    nnx.state(model, nnx.Param), nnx.state(new, nnx.Param)
  )
  nnx.update(new, moved.params)
  return new


def calibration_loss(
  model: Transformer, batches: Sequence[Any], *, mode: str = "sparse"
) -> float:
  """Mean next-token loss of `model` over calibration batches: token
  arrays int[B, T + 1], or the training loader's dicts (inputs, targets,
  loss_mask [B, T])."""

  @nnx.jit
  def loss(model, inputs, targets, mask):
    logits, _ = model(inputs, mode=mode)
    return losses.lm_loss(logits, targets, mask)[0]

  total = 0.0
  for b in batches:
    if isinstance(b, dict):
      inputs, targets, mask = b["inputs"], b["targets"], b["loss_mask"]
    else:
      b = jnp.asarray(b)
      inputs, targets, mask = b[:, :-1], b[:, 1:], None
    total += float(loss(model, inputs, targets, mask))
  return total / max(len(batches), 1)


def greedy_index_share(
  model: Transformer,
  batches: Sequence[jax.Array],
  *,
  num_shared: int | None = None,
  mode: str = "sparse",
  log: Callable[[str], Any] | None = None,
) -> list[SearchStep]:
  """IndexCache's training-free greedy search for the layers to share.

  model: a DSA model whose layers all own an indexer (as trained); batches:
  calibration token batches int[B, T + 1]. Each step tries flipping every
  remaining full layer but the first DSA layer (it has nothing to reuse)
  and keeps the flip with the lowest `calibration_loss` (ties: the earlier
  layer). Stops after `num_shared` flips (default: all but the first).
  Returns the start and every step (`SearchStep`), the last one the chosen
  pattern.
  """
  layers = dsa_layers(model)
  if not layers:
    raise ValueError("greedy_index_share: the model has no DSA layer.")
  shared = [
    i
    for i in layers
    if getattr(model.blocks[i].attn, "index_role", None) != "full"
  ]
  if shared:
    raise ValueError(
      f"greedy_index_share starts from a model whose DSA layers all own an "
      f"indexer; layers {shared} already reuse one."
    )
  most = len(layers) - 1
  num_shared = most if num_shared is None else int(num_shared)
  if not 0 <= num_shared <= most:
    raise ValueError(
      f"num_shared must be in [0, {most}] (DSA layers {list(layers)}, the "
      f"first always keeps its indexer), got {num_shared}."
    )
  full = list(layers)
  steps = [
    SearchStep(tuple(full), None, calibration_loss(model, batches, mode=mode))
  ]
  if log:
    log(f"index share search: all {len(full)} full, loss {steps[0].loss:.4f}")
  for _ in range(num_shared):
    tried = []
    for layer in full[1:]:
      pattern = [i for i in full if i != layer]
      trial = with_index_pattern(model, pattern)
      tried.append((calibration_loss(trial, batches, mode=mode), layer))
    loss, layer = min(tried)
    full.remove(layer)
    steps.append(SearchStep(tuple(full), layer, loss))
    if log:
      log(
        f"index share search: layer {layer} shares, full {full}, loss "
        f"{loss:.4f} (tried {len(tried)})"
      )
  return steps
