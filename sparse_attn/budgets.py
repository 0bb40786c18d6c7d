"""Key budgets: how many keys each kind attends per query, and matching them.

    keys_per_query("nsa", 4096, num_selected=8)   # float64[4096]
    key_budget("dsa", 4096, top_k=256)            # mean keys per query
    match_budget("sliding_window", 4096, 255.9)   # {"window": 256}

Budgets are causal and without padding: query i sees i + 1 keys densely.
Parameters not given take the kind's defaults (its params dataclass). For
the Sparse Transformer kinds, `num_heads` (combine="split") and
`layer_index` (combine="alternate"; None averages the two parities) are
structural arguments beside the kind's parameters. LSH's budget is nominal
(data-dependent; the layers report the real count in aux["attended_keys"]).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_attn import registry
from sparse_attn.nn.kind import as_kwargs

# Every value up to this is tried by match_budget; above it, a 1.25x grid.
EXHAUSTIVE_UP_TO = 1024


def _split(kind: registry.AttentionKind, params: dict[str, Any]):
  params = dict(params)
  structural = {
    "num_heads": params.pop("num_heads", None),
    "layer_index": params.pop("layer_index", None),
  }
  return kind.make_params(**params), structural


def keys_per_query(kind: str, seq_len: int, **params: Any) -> np.ndarray:
  """float64[seq_len]: keys attended by the query at position i of `kind`."""
  spec = registry.get(kind)
  if spec.keys_per_query is None:
    raise ValueError(f"attention kind {kind!r} states no key budget.")
  p, structural = _split(spec, params)
  return np.asarray(
    spec.keys_per_query(int(seq_len), p, **structural), np.float64
  )


def key_budget(kind: str, seq_len: int, **params: Any) -> float:
  """Mean keys per query of `kind` on a causal sequence of length seq_len."""
  return float(np.mean(keys_per_query(kind, seq_len, **params)))


def candidates(seq_len: int) -> list[int]:
  """Values match_budget tries: 1..EXHAUSTIVE_UP_TO, then a 1.25x grid."""
  out = list(range(1, min(seq_len, EXHAUSTIVE_UP_TO) + 1))
  v = EXHAUSTIVE_UP_TO
  while v < seq_len:
    v = min(int(v * 1.25) + 1, seq_len)
    out.append(v)
  return out


def match_budget(
  kind: str,
  seq_len: int,
  target: float,
  *,
  free: str | None = None,
  at: str = "mean",
  **params: Any,
) -> dict[str, Any]:
  """Kind parameters whose key budget is closest to `target` keys per query.

  Tries the `free` parameter (default: the kind's budget parameter) at
  every value in `candidates(seq_len)` (all of 1..seq_len up to 1024) with
  the other parameters fixed (`params`, else the defaults), skipping values
  the kind rejects (e.g. fixed: summary > stride); ties go to the smaller
  value. at="mean" matches the mean over the seq_len query positions (a
  training or prefill step); at="last" the keys of the query at position
  seq_len - 1 (a decode step with seq_len - 1 tokens cached). Returns every
  parameter of the kind (a dict for its params
  dataclass or `ModelConfig.with_attention`). Kinds without a budget
  parameter (dense) return their parameters unchanged.
  """
  if at not in ("mean", "last"):
    raise ValueError(f"at must be 'mean' or 'last', got {at!r}.")
  spec = registry.get(kind)
  free = free or spec.budget_param
  base, structural = _split(spec, params)
  given = {
    k: v for k, v in params.items() if k not in ("num_heads", "layer_index")
  }
  if free is None:
    return given
  if free not in spec.param_names:
    raise ValueError(
      f"{free!r} is not a parameter of kind {kind!r}: {list(spec.param_names)}."
    )
  if spec.keys_per_query is None:
    raise ValueError(f"attention kind {kind!r} states no key budget.")
  values = as_kwargs(base)
  best, best_err = None, np.inf
  for value in candidates(int(seq_len)):
    try:
      p = spec.make_params(**dict(values, **{free: value}))
    except ValueError:
      continue
    counts = spec.keys_per_query(int(seq_len), p, **structural)
    got = np.mean(counts) if at == "mean" else np.asarray(counts)[-1]
    err = abs(float(got) - target)
    if err < best_err - 1e-9:
      best, best_err = value, err
  if best is None:
    raise ValueError(f"no value of {free} is valid for {kind} with {params}.")
  return dict(given, **{free: best})


#: First-API names: kind -> default parameters, kind -> budget parameter.
DEFAULTS = registry.KindView(lambda k: k.defaults)
BUDGET_PARAM = registry.KindView(
  lambda k: k.budget_param, lambda k: k.budget_param is not None
)
