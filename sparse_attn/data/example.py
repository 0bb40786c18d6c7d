"""What a model sees: the byte vocabulary, `Example` and `Batch`.

One vocabulary of 256 tokens, token id == byte value, so the same byte-level
model trains on text and on every synthetic task.

Every example is built as one sequence `seq` of seq_len + 1 tokens and
returned shifted: inputs = seq[:-1], targets = seq[1:], and loss_mask[i] = 1
exactly when targets[i] is an answer token (text: all ones). The loss mask is
therefore aligned with `targets`: it marks the positions whose *prediction*
is the answer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

VOCAB_SIZE = 256


class Example(NamedTuple):
  """One example for next-token prediction (every array has length L)."""

  inputs: np.ndarray  # int32[L]   tokens fed to the model
  targets: np.ndarray  # int32[L]   inputs shifted left by one (next token)
  loss_mask: np.ndarray  # float32[L] 1.0 where targets[i] is an answer token


class Batch(NamedTuple):
  """A batch for next-token prediction."""

  inputs: np.ndarray  # int32[B, L]
  targets: np.ndarray  # int32[B, L]
  loss_mask: np.ndarray  # float32[B, L]


def decode(tokens) -> str:
  """Tokens (any int array/sequence of byte ids) -> str, for display only."""
  return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode(
    "utf-8", errors="replace"
  )


def shifted(seq: np.ndarray, answer: np.ndarray) -> Example:
  """seq int[T], answer bool[T] (True where seq[j] is an answer) -> Example.

  The Example has length T - 1: inputs seq[:-1], targets seq[1:].
  """
  seq = np.asarray(seq, dtype=np.int32)
  return Example(seq[:-1].copy(), seq[1:].copy(), answer[1:].astype(np.float32))


def stack(rows: list[Example]) -> Batch:
  """B Examples of length L -> one Batch of [B, L] arrays."""
  return Batch(*(np.stack(x) for x in zip(*rows)))
