"""Argument checks of the data package: ValueError naming the argument.

Integers and fractions arrive from configs, CLIs and notebooks, so numpy
integers are accepted, bools are not, and every message says which
argument was wrong and what it held.
"""

from __future__ import annotations

import operator
from typing import Any

SPLITS = ("train", "validation")


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
  """`value` as a Python int (>= minimum); ValueError otherwise."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  try:
    out = operator.index(value)
  except TypeError:
    raise ValueError(
      f"{name} must be an integer, got {value!r} ({type(value).__name__})"
    ) from None
  if minimum is not None and out < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {out}")
  return out


def as_fraction(name: str, value: Any, lo_open: bool, hi_open: bool) -> float:
  """`value` as a float in [0, 1], each end open or closed as asked."""
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number, got {value!r}") from None
  ok_lo = out > 0 if lo_open else out >= 0
  ok_hi = out < 1 if hi_open else out <= 1
  if not (ok_lo and ok_hi):
    lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
    raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}")
  return out


def check_split(split: str) -> str:
  """`split` if it is one of SPLITS; ValueError otherwise."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split
