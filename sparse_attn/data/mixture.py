"""Mixture specs: text and tasks in one stream, drawn per row.

A mixture is named by a spec string, `"text+passkey+vartrack"` (equal
weights) or `"text:2+passkey:1+vartrack:1"` (relative weights), so a run's
config stays one string. Every component shares the byte vocabulary, so one
model trains on all of them (e.g. a dense model pretrained on text and
retrieval tasks, which a DSA retrofit must then keep able to retrieve).
`make_dataset(spec, ...)` builds the `dataset.MixtureDataset` of a spec.
"""

from __future__ import annotations

import numpy as np


def parse_mixture(spec: str) -> list[tuple[str, float]]:
  """`"a:2+b"` -> [("a", 2.0), ("b", 1.0)]; weights > 0, names distinct."""
  parts = []
  for item in str(spec).split("+"):
    name, _, weight = item.strip().partition(":")
    name = name.strip()
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      w = float("nan")
    if not name or not w > 0 or not np.isfinite(w):
      raise ValueError(
        f"dataset mixture {spec!r}: each part must be NAME or NAME:WEIGHT "
        f"with a weight > 0, got {item!r}"
      )
    parts.append((name, w))
  names = [n for n, _ in parts]
  if len(set(names)) != len(names):
    raise ValueError(f"dataset mixture {spec!r} names a dataset twice")
  return parts


def is_mixture(name: str) -> bool:
  """Whether `name` is a mixture spec ("a+b", "a:2") rather than one name."""
  return "+" in name or ":" in name


def canonical(spec: str) -> str:
  """The one spelling of a spec: no spaces, weight 1 left out
  ("text : 2 + passkey:1" -> "text:2+passkey"); a single name stays a name.
  A mixture's random stream is keyed by it, so equal specs draw equal data."""
  return "+".join(
    name if w == 1 else f"{name}:{w:g}" for name, w in parse_mixture(spec)
  )
