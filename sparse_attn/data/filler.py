"""The ASCII text the retrieval tasks are made of: filler, numbers, names.

Filler sentences contain no digits and none of `= ; ? :`, so the needles,
assignments and questions inserted into them (and their digit answers) are
never confused with filler.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Classic passkey filler (Mohtashami & Jaggi 2023), cycled in order.
PASSKEY_FILLER = tuple(
  s.encode()
  for s in (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
  )
)
# Varied filler for niah / vartrack: sentences drawn at random.
SENTENCES = tuple(
  s.encode()
  for s in (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
    "A quiet river runs through the old town. ",
    "Birds sing in the early morning. ",
    "The library opens after lunch. ",
    "Snow covers the distant hills. ",
    "A cat sleeps on the warm windowsill. ",
    "The market is busy on weekends. ",
    "Clouds drift slowly over the valley. ",
    "The train leaves from the northern station. ",
    "Tea tastes better in a blue cup. ",
    "Old maps hang on the kitchen wall. ",
    "The garden needs water in summer. ",
  )
)


def filler(
  rng: np.random.Generator | None, n: int, bank: Sequence[bytes]
) -> tuple[bytes, np.ndarray]:
  """n filler bytes and the sentence start offsets (int64[k], from 0, <= n).

  Sentences of `bank` are cycled in order if rng is None, else drawn at
  random.
  """
  if n <= 0:
    return b"", np.zeros(1, np.int64)
  k = n // min(len(s) for s in bank) + 1
  idx = (
    np.arange(k) % len(bank) if rng is None else rng.integers(0, len(bank), k)
  )
  chosen = [bank[int(i)] for i in idx]
  starts = np.concatenate([[0], np.cumsum([len(s) for s in chosen])])
  return b"".join(chosen)[:n], starts[starts <= n]


def compose(
  rng: np.random.Generator,
  total: int,
  pieces: Sequence[bytes],
  fractions: Sequence[float] | np.ndarray,
  suffix: bytes,
  bank: Sequence[bytes],
  cycle: bool = False,
) -> np.ndarray:
  """int32[total]: filler with `pieces` inserted, then `suffix`.

  The pieces go in order at the sentence boundaries nearest below the given
  depth fractions (non-decreasing) of the filler.
  """
  n_fill = total - sum(len(p) for p in pieces) - len(suffix)
  assert n_fill >= 0, (total, n_fill)
  fill, starts = filler(None if cycle else rng, n_fill, bank)
  want = np.asarray(fractions, np.float64) * n_fill
  cuts = starts[np.searchsorted(starts, want, side="right") - 1]
  parts, prev = [], 0
  for piece, cut in zip(pieces, cuts):
    parts += [fill[prev:cut], piece]
    prev = int(cut)
  parts += [fill[prev:], suffix]
  out = b"".join(parts)
  assert len(out) == total, (len(out), total)
  return np.frombuffer(out, np.uint8).astype(np.int32)


def digits(values: np.ndarray, base: int, width: int) -> np.ndarray:
  """int[N] -> int[N, width] base-`base` digits, most significant first."""
  powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
  return (np.asarray(values, np.int64)[:, None] // powers) % base


def numbers(
  rng: np.random.Generator, n: int, num_digits: int, distinct: bool = True
) -> list[bytes]:
  """n random decimal strings of exactly num_digits digits (leading zeros)."""
  vals = rng.choice(10**num_digits, n, replace=not distinct)
  return [str(v).zfill(num_digits).encode() for v in vals]


def names(rng: np.random.Generator, n: int, chars: int) -> list[bytes]:
  """n distinct random lowercase names of `chars` letters."""
  vals = rng.choice(26**chars, n, replace=False)
  return [
    bytes((digits(np.array([v]), 26, chars)[0] + ord("a")).tolist())
    for v in vals
  ]
