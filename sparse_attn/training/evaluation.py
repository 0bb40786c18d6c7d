"""Held-out evaluation of a state: LM loss, indexer KL, fraction attended."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparse_attn.data import Dataset
from sparse_attn.training.loader import BatchLoader
from sparse_attn.training.metrics import host_metrics
from sparse_attn.training.state import Setup
from sparse_attn.training.steps import make_eval_step


def evaluate(
  s: Setup,
  state,
  eval_ds: Dataset,
  mode: str,
  num_batches: int | None = None,
  eval_step: Callable[..., Any] | None = None,
) -> dict[str, float | str]:
  """Held-out LM loss, indexer KL and fraction of keys attended, in `mode`.

  Over the first num_batches (default cfg.train.eval_batches) evaluation
  batches; the KL is per batch, summed over layers.
  eval_step: a `make_eval_step(s, mode)` to reuse (it compiles once).
  """
  eval_step = eval_step or make_eval_step(s, mode)
  loader = BatchLoader(eval_ds, s)
  n = s.cfg.train.eval_batches if num_batches is None else num_batches
  if n < 1:
    raise ValueError(f"num_batches must be >= 1, got {n}.")
  tot = host_metrics(eval_step(state["params"], loader.eval(0)))
  for i in range(1, n):
    out = host_metrics(eval_step(state["params"], loader.eval(i)))
    tot = {k: tot[k] + out[k] for k in tot}
  return {
    "loss": tot["nll"] / max(tot["tokens"], 1.0),
    "indexer_kl": tot["indexer_kl"] / n,
    "attended_fraction": tot["attended_keys"] / max(tot["visible_keys"], 1.0),
    "mode": mode,
  }
