"""Parameters carried from one model to another (dense -> DSA conversion).

This is how a dense model becomes a DSA (or any other kind of) model: a new
model of the same dimensions shares every parameter of the dense one
(embeddings, projections, MLPs, norms) at the same path and shape; what only
the new kind has (the lightning indexer, NSA's gates, ...) is absent from the
dense checkpoint and keeps its initial value (`models.transfer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sparse_attn.models.transfer import Transfer, transfer_params

__all__ = ["Transfer", "init_from", "transfer_params"]


def init_from(
  state, src_params, group: str = "main", *, repeat: Iterable[str] = ()
) -> tuple[Any, Transfer]:
  """A training state whose `group` parameters are taken from src_params.

  state: a training state (`init_state`); src_params: the same group of
  another model's state (e.g. dense_state["params"]["main"]). repeat: as
  `transfer_params` (e.g. `registry.dense_copies(cfg)`). The optimiser
  state is left as it is (fresh). Returns (new state, the Transfer).
  """
  t = transfer_params(src_params, state["params"][group], repeat=repeat)
  new_params = dict(state["params"], **{group: t.params})
  return dict(state, params=new_params), t
