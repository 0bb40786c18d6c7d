"""Training losses: LM cross-entropy and the two indexer KL losses of DSA.

DeepSeek-V3.2-Exp trains the lightning indexer to imitate the main attention:
the target distribution p[t, :] is the main attention summed over heads and
L1-normalised per query; the indexer distribution is softmax(I[t, :]).

Both KL losses stop gradients into the main attention's q and k: the main
model never learns from them. Detaching the indexer's *input* hidden state
(so the indexer loss does not reach the shared trunk) is the layer's job
(`sparse_attn.nn.DSAAttention`), since only the layer sees that input.

Reduction: the mean over queries that have at least one key in the support
(queries with none contribute nothing and are not counted). DeepSeek writes
the loss as a sum over t; a mean keeps the loss scale independent of B*T, and
`indexer_loss_scale` in the training config restores any weighting wanted.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_attn.ops import checks, chunking, masking
from sparse_attn.ops.attention import (
  check_indices,
  check_qkv,
  default_scale,
  gather_rows,
  group_heads,
  masked_softmax,
  selection_counts,
  use_counted,
)
from sparse_attn.ops.indexer import (
  check_indexer_inputs,
  masked_scores,
  pair_scores,
  relu_scores,
)

_KL_BUDGET = 1 << 24


def _kl_rows(p: jax.Array, index_logits: jax.Array, valid: jax.Array):
  """Per-row KL(p || softmax(index_logits)) over `valid` entries, f32[...]."""
  log_q, _ = _log_softmax_masked(index_logits, valid)
  p_safe = jnp.where(valid & (p > 0), p, 1.0)
  terms = jnp.where(valid & (p > 0), p * (jnp.log(p_safe) - log_q), 0.0)
  return jnp.sum(terms, axis=-1)


def _log_softmax_masked(logits, valid):
  logits = jnp.where(valid, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(
    jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  )
  shifted = jnp.where(valid, logits - row_max, 0.0)
  denom = jnp.sum(jnp.where(valid, jnp.exp(shifted), 0.0), -1, keepdims=True)
  log_denom = jnp.log(jnp.where(denom > 0, denom, 1.0))
  return jnp.where(valid, shifted - log_denom, 0.0), denom[..., 0] > 0


def _head_summed_target(probs: jax.Array) -> jax.Array:
  """probs [..., G, R, N] per-head distributions -> p [..., N], L1-normalised."""
  summed = jnp.sum(probs, axis=(-3, -2))
  total = jnp.sum(summed, axis=-1, keepdims=True)
  return summed / jnp.where(total > 0, total, 1.0)


def _pair_probs(pair, qb, kb, kv_lengths, scale):
  """Per-head attention of a `chunking.CausalPair`'s rows over visible keys.

  qb [B, J, C, H, D] and kb [B, J, C, G, D] per slot. Returns (probs
  f32[B, 2, C, G, H/G, J*C], zero outside the row's owner and where not
  visible; valid bool[B, 2, C, J*C]): what `masked_softmax` gives for rows
  of S keys, in the rows `_kl_rows` reduces.
  """
  logits = (
    jnp.einsum(
      "bjtgrd,bjsgd->btgrjs",
      qb.reshape(*qb.shape[:3], kb.shape[3], -1, qb.shape[4]),
      kb,
      preferred_element_type=checks.acc_dtype(qb),
    )
    * scale
  )
  valid = pair.rows(pair.visible(qb.shape[0], kv_lengths), False)
  probs, _ = masked_softmax(
    pair.rows(logits, 0.0), valid[:, :, :, None, None, :]
  )
  return probs, valid


def _masked_mean(values, mask):
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1)


def dense_indexer_kl(
  q: jax.Array,
  k: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
) -> jax.Array:
  """Dense warm-up loss: mean_t KL(p[t, :] || softmax(I[t, :])) over visible keys.

  p[t, :] = sum_h softmax_s(scale * q[t, h] . k[s, g(h)]) over visible s,
  L1-normalised (per-head softmax over all visible keys, summed over the H
  heads, divided by H): the main attention distribution averaged over heads.
  Gradients reach only q_idx, k_idx and weights; q and k are stop-gradient.

  Shapes: q [B, T, H, D], k [B, S, G, D], q_idx [B, T, HI, DI],
  k_idx [B, S, DI], weights [B, T, HI]. Returns a scalar f32. Memory is
  O(chunk * S * (H + HI)) with queries processed in chunks; with q_offset
  known when tracing and T x S within the budget, the queries go in
  causal segments that skip most masked pairs, and past the budget in
  causal self-attention (T == S, offset 0) query chunks c and n-1-c go
  in pairs over the key blocks they see, as in `dense_attention` (the
  same value up to rounding: bf16 k_idx gradients are summed over the
  segments or blocks).
  """
  qs, ks, _ = check_qkv(q, k, k, q_offset, kv_lengths)
  iq, ik = check_indexer_inputs(q_idx, k_idx, weights, q_offset, kv_lengths)
  _check_same_tokens(qs, ks, iq, ik)
  batch, num_q, num_heads, head_dim = qs
  num_keys, num_kv = ks[1], ks[2]
  scale = default_scale(scale, head_dim)
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(
      num_q, num_keys * (num_heads + iq[2]), _KL_BUDGET
    )

  # Per slot row: q, k, q_idx, the head weights and k_idx.
  slot_elems = (num_heads + num_kv) * head_dim + iq[2] * (iq[3] + 1) + iq[3]
  if chunking.use_causal_pairs(
    q_offset, num_q, num_keys, query_chunk, slot_elems, _KL_BUDGET
  ):

    def pair_kl(pair, queries, keys):
      (qb, qib, wb), (kb, kib) = queries, keys
      probs, valid = _pair_probs(pair, qb, kb, kv_lengths, scale)
      index_logits = pair.rows(
        pair_scores(pair, qib, wb, kib, kv_lengths), -jnp.inf
      )
      kl = _kl_rows(_head_summed_target(probs), index_logits, valid)
      return kl, jnp.any(valid, axis=-1)

    kl, has_keys = chunking.map_causal_pairs(
      pair_kl, chunking.pair_chunk(query_chunk), (q, q_idx, weights), (k, k_idx)
    )
    return _masked_mean(kl, has_keys)

  def block(start, seen, qb, qib, wb):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    valid = masking.visible(q_pos, seen, kv_lengths)
    logits = (
      jnp.einsum(
        "btgrd,bsgd->btgrs",
        group_heads(qb, num_kv),
        k[:, :seen],
        preferred_element_type=checks.acc_dtype(qb),
      )
      * scale
    )
    probs, _ = masked_softmax(logits, valid[:, :, None, None, :])
    p = _head_summed_target(probs)
    index_logits = masked_scores(qib, k_idx[:, :seen], wb, q_pos, kv_lengths)
    kl = _kl_rows(p, index_logits, valid)
    return kl, jnp.any(valid, axis=-1)

  kl, has_keys = chunking.map_causal_segments(
    block, query_chunk, q_offset, num_keys, q, q_idx, weights
  )
  return _masked_mean(kl, has_keys)


def sparse_indexer_kl(
  q: jax.Array,
  k: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  indices: jax.Array,
  *,
  scale: float | None = None,
  method: str | None = None,
) -> jax.Array:
  """Sparse-stage loss: mean_t KL(p[t, S_t] || softmax(I[t, S_t])).

  S_t = the valid entries of indices[b, t] (the indexer's own top-k). Both
  distributions live on S_t only and are computed from gathered logits, so
  cost and memory are O(T * K * (H + HI)), never [T, S]. (When S <= 8*K the
  same value is computed densely over S with the selection as a mask,
  which is cheaper on CPU than gather + scatter-add at those sizes;
  `method` = "gather" / "counted" forces one form.)

  Normalisation (the DeepSeek report leaves room here): each main head's
  softmax is taken over S_t first, the H per-head distributions are summed
  and then L1-normalised, i.e. p is the head-average of per-head softmaxes
  restricted to S_t. (The alternative, restricting the full-sequence
  distribution to S_t and renormalising, needs the dense softmax denominator
  and so the [T, S] logits this stage exists to avoid.)

  Gradients reach only q_idx, k_idx and weights; q and k are stop-gradient.
  Shapes: q [B, T, H, D], k [B, S, G, D], q_idx [B, T, HI, DI],
  k_idx [B, S, DI], weights [B, T, HI], indices int32[B, T, K].
  """
  qs, ks, _ = check_qkv(q, k, k)
  iq, ik = check_indexer_inputs(q_idx, k_idx, weights, None, None)
  _check_same_tokens(qs, ks, iq, ik)
  ishape = check_indices(indices, qs[0], qs[1])
  num_keys, num_kv = ks[1], ks[2]
  scale = default_scale(scale, qs[3])
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  acc = checks.acc_dtype(q, q_idx)
  if method not in (None, "gather", "counted"):
    raise ValueError(
      f"method must be 'gather', 'counted' or None, got {method!r}."
    )
  counted = (
    use_counted(num_keys, ishape[2]) if method is None else method == "counted"
  )

  def block(start, qb, qib, wb, ib):
    del start
    if counted:
      # Dense over S with log-multiplicities: same value, no gather/scatter.
      valid, log_counts = selection_counts(ib, num_keys, acc)
      logits = (
        jnp.einsum(
          "btgrd,bsgd->btgrs",
          group_heads(qb, num_kv),
          k,
          preferred_element_type=acc,
        )
        * scale
      )
      logits = logits + log_counts[:, :, None, None, :]
      index_logits = relu_scores(qib, k_idx, wb) + log_counts
    else:
      valid = (ib >= 0) & (ib < num_keys)
      safe = jnp.where(valid, ib, 0)
      kg = gather_rows(k, safe)  # [B, C, K, G, D]
      logits = (
        jnp.einsum(
          "btgrd,btkgd->btgrk",
          group_heads(qb, num_kv),
          kg,
          preferred_element_type=acc,
        )
        * scale
      )
      kig = gather_rows(k_idx, safe)  # [B, C, K, DI]
      dots = jnp.einsum("bthd,btkd->bthk", qib, kig, preferred_element_type=acc)
      index_logits = jnp.einsum(
        "bthk,bth->btk", jax.nn.relu(dots), wb.astype(acc)
      )
    return slot_kl(logits, index_logits, valid)

  width = num_keys if counted else ishape[2]
  chunk = chunking.auto_chunk(qs[1], width * (qs[2] + iq[2]), _KL_BUDGET)
  kl, has_keys = chunking.map_query_chunks(
    block, chunk, q, q_idx, weights, indices
  )
  return _masked_mean(kl, has_keys)


def slot_kl(
  logits: jax.Array, index_logits: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The sparse KL of each query from its slots' logits (the body of
  `sparse_indexer_kl`, for callers that computed the logits elsewhere).

  logits f32[B, T, G, H/G, K] main-attention logits of the K slots (scaled),
  index_logits f32[B, T, K], valid bool[B, T, K]. Returns (kl f32[B, T],
  has_keys bool[B, T]); the loss is the mean of kl over has_keys.
  """
  probs, _ = masked_softmax(logits, valid[:, :, None, None, :])
  p = _head_summed_target(probs)
  return _kl_rows(p, index_logits, valid), jnp.any(valid, axis=-1)


def _check_same_tokens(qs, ks, iq, ik):
  if iq[:2] != qs[:2] or ik[:2] != ks[:2]:
    raise ValueError(
      f"indexer inputs must cover the same tokens as the attention: q_idx "
      f"{iq} vs q {qs} ([B, T]), k_idx {ik} vs k {ks} ([B, S])."
    )


def lm_loss(
  logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over mask; returns (loss, token_count).

  logits [B, T, V] (any float dtype, reduced in f32), targets int[B, T],
  mask [B, T] (1 where the token counts; default all ones).
  """
  ls = checks.check_rank("logits", logits, 3, "[B, T, V]")
  ts = checks.check_rank("targets", targets, 2, "[B, T]")
  if ts != ls[:2]:
    raise ValueError(f"targets shape {ts} must be [B, T] = {ls[:2]} of logits.")
  if mask is None:
    mask = jnp.ones(ts, jnp.float32)
  elif checks.shape_of(mask) != ts:
    raise ValueError(f"mask shape {checks.shape_of(mask)} must be {ts}.")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(
    logp, targets[..., None].astype(jnp.int32), axis=-1
  )[..., 0]
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count
