"""XLA references of the lightning indexer scores and top-k selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import backend as bk_

_NEG_INF = float("-inf")


def check_inputs(q_idx, k_idx, weights, k):
  """Raises ValueError for inputs lightning_topk cannot take (names the argument)."""
  for name, x, r in (
    ("q_idx", q_idx, 4),
    ("k_idx", k_idx, 3),
    ("weights", weights, 3),
  ):
    if getattr(x, "ndim", None) != r:
      raise ValueError(
        f"lightning_topk: {name} must have rank {r}, got shape {getattr(x, 'shape', None)}"
      )
  B, T, HI, DI = q_idx.shape
  if k_idx.shape[0] != B or k_idx.shape[2] != DI:
    raise ValueError(
      f"lightning_topk: k_idx shape {k_idx.shape} incompatible with q_idx shape "
      f"{q_idx.shape} (expected [B,S,DI])"
    )
  if weights.shape != (B, T, HI):
    raise ValueError(
      f"lightning_topk: weights shape {weights.shape} must be [B,T,HI]={(B, T, HI)}"
    )
  for name, x in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
        f"lightning_topk: {name} must be floating, got {x.dtype}"
      )
  if q_idx.dtype != k_idx.dtype:
    raise ValueError(
      f"lightning_topk: q_idx/k_idx dtypes differ: {q_idx.dtype} vs {k_idx.dtype}"
    )
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"lightning_topk: k must be a positive int, got {k!r}")


def _visible(q_off, kv_len, T, S):
  t = jnp.arange(T, dtype=jnp.int32)[None, :, None]
  s = jnp.arange(S, dtype=jnp.int32)[None, None, :]
  return (s <= q_off[:, None, None] + t) & (s < kv_len[:, None, None])


def indexer_scores_reference(
  q_idx, k_idx, weights, *, q_offset=None, kv_lengths=None
):
  """f32[B,T,S]: sum_j w * relu(q . k) for visible keys, -inf elsewhere."""
  check_inputs(q_idx, k_idx, weights, 1)
  B, T = q_idx.shape[:2]
  S = k_idx.shape[1]
  q_off, kv_len = bk_.normalize_positions(
    "indexer_scores", q_offset, kv_lengths, B, T, S
  )
  dots = jnp.einsum(
    "btjd,bsd->btjs",
    q_idx.astype(jnp.float32),
    k_idx.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  sc = jnp.einsum(
    "btjs,btj->bts",
    jax.nn.relu(dots),
    weights.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  return jnp.where(_visible(q_off, kv_len, T, S), sc, _NEG_INF)


def select_topk_reference(scores, k):
  """int32[B,T,K] indices of the K largest finite scores, -1 past the visible.

  Tie rule: among equal scores the more recent key (larger index) wins; a
  row lists its keys by descending score, the more recent first among
  equals; -0.0 and 0.0 are equal. (lax.top_k prefers the smaller index and
  ranks -0.0 below 0.0, so it runs on the reversed row, zeros made +0.0.)
  """
  S = scores.shape[-1]
  rev = jnp.where(scores == 0, 0.0, scores).astype(scores.dtype)[..., ::-1]
  if k > S:
    rev = bk_.pad_axis(rev, -1, k, _NEG_INF)
  vals, pos = jax.lax.top_k(rev, k)
  return jnp.where(vals == _NEG_INF, -1, S - 1 - pos).astype(jnp.int32)


def lightning_topk_reference(
  q_idx, k_idx, weights, k, *, q_offset=None, kv_lengths=None
):
  """int32[B,T,K]: select_topk_reference of indexer_scores_reference."""
  return select_topk_reference(
    indexer_scores_reference(
      q_idx, k_idx, weights, q_offset=q_offset, kv_lengths=kv_lengths
    ),
    k,
  )
