"""Helpers shared by the experiment scripts (retrieval, retrofit, benchmarks).

Nothing here is part of the library: the retrieval tasks' options, CSV /
markdown writing, matplotlib (Agg) setup and a short environment line for
reports.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Task options of the retrieval experiments (retrieval.py, retrofit.py,
# make_dense_checkpoint.py), fixed across lengths so longer evaluations only
# add filler.
TASK_OPTIONS: dict[str, dict[str, int]] = {
  # 8 keys and 8 values: a 2-layer model learns the binding (not just the
  # value distribution) in a few hundred CPU steps (see notebook 02).
  "mqar": {"key_vocab": 8, "value_vocab": 8},
  "passkey": {"num_digits": 5},
  "niah": {"num_needles": 2, "num_digits": 5, "name_chars": 4},
  "vartrack": {
    "num_hops": 2,
    "num_chains": 2,
    "num_digits": 4,
    "name_chars": 3,
  },
}


def task_options(dataset: str) -> dict[str, dict[str, int]]:
  """TASK_OPTIONS of the tasks a dataset (or mixture spec) names."""
  from sparse_attn.data import parse_mixture

  names = {name for name, _ in parse_mixture(dataset)}
  return {k: v for k, v in TASK_OPTIONS.items() if k in names}


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
  lines = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join("---" for _ in header) + "|",
  ]
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
    load = "load avg {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
  except OSError:
    load = ""
  return (
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{os.cpu_count()} CPUs, {platform.machine()}, {load}"
  )


def eta_text(seconds: float) -> str:
  """'12m05s' (or '1h02m' past an hour)."""
  seconds = max(0.0, seconds)
  if seconds >= 3600:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Eta:
  """Time left of a sequence of work items of known relative cost.

  weights: one number per item, proportional to its expected time (e.g.
  L^2 for a benchmark at length L, steps for a training segment). After
  `done(i)` for the items finished so far, `text()` extrapolates the seconds
  per unit of weight measured since the start to the items not done.
  """

  def __init__(self, weights: Sequence[float]):
    import time  # pylint: disable=g-import-not-at-top

    self._clock = time.perf_counter
    self._weights = [float(w) for w in weights]
    self._done: set[int] = set()
    self._t0 = self._clock()

  def done(self, i: int) -> None:
    self._done.add(i)

  def seconds_left(self) -> float | None:
    spent = sum(self._weights[i] for i in self._done)
    if not spent:
      return None
    left = sum(w for i, w in enumerate(self._weights) if i not in self._done)
    return (self._clock() - self._t0) / spent * left

  def text(self) -> str:
    """'; eta 3m10s' once something is done, '' before (and at the end)."""
    s = self.seconds_left()
    if s is None or len(self._done) == len(self._weights):
      return ""
    return f"; eta {eta_text(s)}"
