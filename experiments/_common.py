"""Helpers shared by the experiment scripts (retrieval, bench_attention, indexer_analysis).

Nothing here is part of the library: CSV/markdown writing, a fast key-budget
matcher, matplotlib (Agg) setup and a short environment line for reports.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
from typing import Any, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

BASELINE_KINDS = ("sliding_window", "strided", "fixed", "lsh", "nsa", "moba")


def add_layer_shape_args(p) -> None:
  """The benchmark layer shape flags shared by bench_attention / bench_decode
  (defaults: the shape the efficiency targets are stated for)."""
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=1)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--indexer-heads", type=int, default=4)
  p.add_argument("--indexer-dim", type=int, default=32)
  p.add_argument("--top-k", type=int, default=128)


def fmt(value: Any, digits: int = 3) -> str:
  """Compact cell text: floats to `digits` significant places, None -> ''."""
  if value is None:
    return ""
  if isinstance(value, float):
    if math.isnan(value):
      return "nan"
    if value == 0:
      return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
      return f"{value:.{digits}g}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}g}"
  return str(value)


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({c: r.get(c, "") for c in columns})


def read_csv(path: str) -> list[dict]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def markdown_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(fmt(x) for x in r) + " |")
  return "\n".join(lines)


def pyplot():
  """matplotlib.pyplot with the Agg backend (None if matplotlib is missing)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt
  except Exception:  # pylint: disable=broad-except
    return None


def env_line() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    load = "load avg %.1f/%.1f/%.1f" % os.getloadavg()
  except OSError:
    load = ""
  return (f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, {load}")


def _candidates(seq_len: int, limit: int = 1024) -> list[int]:
  small = list(range(1, min(seq_len, limit) + 1))
  big = []
  v = limit
  while v < seq_len:
    v = int(v * 1.25) + 1
    big.append(min(v, seq_len))
  return small + big


def match_budget(kind: str, seq_len: int, target: float,
                 **params) -> dict[str, Any]:
  """Like `baseline_layers.match_budget` but searches a bounded candidate set.

  The library version scans every value 1..seq_len (O(L^2) numpy work, too
  slow at 32K+); here: every value up to 1024, then a 1.25x geometric grid.
  Kinds: "dsa" (top_k = round(target)) and the baseline kinds. Returns the
  full kind-parameter dict.
  """
  from sparse_attn import baseline_layers as bl  # pylint: disable=g-import-not-at-top
  if kind == "dense":
    return {}
  free = bl.BUDGET_PARAM[kind]
  base = dict(bl.DEFAULTS[kind])
  base.update(params)
  best, best_err = None, np.inf
  for value in _candidates(seq_len):
    p = dict(base, **{free: value})
    if kind == "fixed" and p["summary"] > value:
      continue
    if kind == "nsa" and p["cmp_stride"] > p["cmp_block"]:
      continue
    err = abs(bl.key_budget(kind, seq_len, **p) - target)
    if err < best_err - 1e-9:
      best, best_err = value, err
  out = dict(base)
  out[free] = best
  return out


def layer_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
  """Kind params minus entries that are not constructor arguments of the layer."""
  return {k: v for k, v in params.items() if k not in ("layer_index",)}
