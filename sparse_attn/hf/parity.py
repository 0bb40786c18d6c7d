"""Comparing this library's model with a reference run (transformers) of the same checkpoint.

    run = indexer_run(model, tokens, lengths)   # logits + each layer's scores/top-k
    agreement = selection_agreement(run.scores[i], run.indices[i], theirs, lengths)

Top-k sets are compared up to ties: two selections of query t agree when
they hold the same keys among those whose score is clearly above the k-th
score and differ only among keys whose score is within `rtol` (relative to
the row's largest |score|) of it. Only visible keys count: the reference may
fill slots past the visible keys with masked positions (transformers does),
this library fills them with -1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from sparse_attn import registry
from sparse_attn.models import Transformer
from sparse_attn.ops.indexer import indexer_scores, lightning_topk


@dataclasses.dataclass
class IndexerRun:
  """logits f32[B, T, V]; per indexed layer: scores f32[B, T, S] (-inf where
  not visible) and indices int32[B, T, K] (-1 = empty)."""

  logits: np.ndarray
  scores: list[np.ndarray]
  indices: list[np.ndarray]


def indexer_run(
  model: Transformer,
  tokens: np.ndarray,
  lengths: np.ndarray | None = None,
  *,
  mode: str = "sparse",
) -> IndexerRun:
  """The forward pass of `model` with each DSA layer's index scores and top-k.

  lengths int32[B]: real tokens per row (right padding after them).
  """
  toks = jnp.asarray(tokens)
  kv = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  logits, _ = model(toks, mode=mode, kv_lengths=kv)
  batch, length = toks.shape
  positions = jnp.broadcast_to(
    jnp.arange(length, dtype=jnp.int32), (batch, length)
  )
  x = model.embed_tokens(toks)
  scores, indices = [], []
  for i, block in enumerate(model.blocks):
    attn: Any = block.attn  # a DSA kind: has index() and top_k
    if registry.has_indexer(model.cfg.layer_attention(i)):
      q_idx, k_idx, w = attn.index(block.attn_norm(x), positions)
      scores.append(np.asarray(indexer_scores(q_idx, k_idx, w, kv_lengths=kv)))
      indices.append(
        np.asarray(
          lightning_topk(
            q_idx, k_idx, w, attn.top_k, kv_lengths=kv, implementation="xla"
          )
        )
      )
    x, _ = block(x, positions=positions, kv_lengths=kv, mode=mode)
  return IndexerRun(np.asarray(logits), scores, indices)


@dataclasses.dataclass
class Agreement:
  """Queries compared, those whose sets agree up to ties, those equal
  exactly, and those with a tie at the k-th score (where a different
  tie-break is legitimate, and changes every later layer's input)."""

  queries: int
  agree: int
  identical: int
  ties: int = 0

  @property
  def ok(self) -> bool:
    return self.agree == self.queries


def selection_agreement(
  scores: np.ndarray,
  ours: np.ndarray,
  theirs: np.ndarray,
  lengths: np.ndarray | None = None,
  *,
  rtol: float = 1e-5,
) -> Agreement:
  """Compares two top-k selections of the same scores f32[B, T, S] (see the
  module docstring). ours / theirs int[B, T, K]; lengths int[B]: only the
  queries of real tokens are compared."""
  batch, length, _ = scores.shape
  lengths = np.full(batch, length) if lengths is None else np.asarray(lengths)
  queries = agree = identical = ties = 0
  for b in range(batch):
    for t in range(int(lengths[b])):
      row = scores[b, t]
      visible = np.isfinite(row)
      mine = _visible_set(ours[b, t], visible)
      other = _visible_set(theirs[b, t], visible)
      queries += 1
      identical += mine == other
      k = min(len(ours[b, t]), int(visible.sum()))
      kth = np.sort(row[visible])[::-1][k - 1]
      tol = rtol * max(float(np.max(np.abs(row[visible]))), 1e-30)
      sure = {int(s) for s in np.flatnonzero(visible & (row > kth + tol))}
      allowed = {int(s) for s in np.flatnonzero(visible & (row >= kth - tol))}
      ties += len(allowed) > k
      agree += all(
        sure <= sel <= allowed and len(sel) == k for sel in (mine, other)
      )
  return Agreement(queries, agree, identical, ties)


def _visible_set(row: np.ndarray, visible: np.ndarray) -> set[int]:
  return {int(s) for s in row if 0 <= s < len(visible) and visible[s]}


def max_abs_error(
  ours: np.ndarray, theirs: np.ndarray, lengths: np.ndarray | None = None
) -> tuple[float, float]:
  """(max |ours - theirs|, max |theirs|) over the real tokens' rows."""
  batch, length = theirs.shape[:2]
  lengths = np.full(batch, length) if lengths is None else np.asarray(lengths)
  mask = np.arange(length)[None, :] < lengths[:, None]
  diff = np.abs(np.asarray(ours, np.float64) - theirs)[mask]
  return float(diff.max()), float(np.abs(theirs[mask]).max())


__all__ = [
  "Agreement",
  "IndexerRun",
  "indexer_run",
  "max_abs_error",
  "selection_agreement",
]
