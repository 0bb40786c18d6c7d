"""DeepSeek-V4's compressed attention (CSA and HCA) as pure functions.

DeepSeek-V4 (2026, sec. 2.3) interleaves two attention layers over
*compressed entries*, each pooling `ratio` consecutive tokens:

- CSA, compressed sparse attention (eqs. 9-17, ratio m = 4): two series
  (a, b) of per-token contents C and gate logits Z are projected from the
  hidden state; entry w pools series a of group w-1 with series b of group
  w (2m slots, stride m, so neighbouring windows overlap):
      c_w = sum_j softmax_j(Z_j + B_j) * C_j      (per channel, over slots)
  with B a learned bias per position inside the group. A lightning
  indexer with its own (smaller) compressor scores the entries,
      I[t, w] = sum_h w[t, h] * relu(q_I[t, h] . k_I[w]),
  and each query attends its top-k visible entries.
- HCA, heavily compressed attention (eqs. 20-23, ratio m' = 128): one
  series, non-overlapping groups, no indexer: every visible entry is
  attended.

Both add a sliding window over the last `window` tokens (128 in the paper,
the query itself included) and a per-head attention sink, a learned logit
in the softmax denominator that carries no value. The entries are
RMS-normalised and get RoPE at the position of their group's first token
(`pool_groups` does the pooling; the norm and RoPE are the layer's).

Causality: an entry exists once its group is complete, so the query at
absolute position p sees entry w iff (w + 1) * ratio - 1 <= p
(`entry_visible`). Groups align to absolute positions 0, ratio, 2 ratio, ...

Shapes: B batch, T queries, S tokens, N = S // ratio entries, H heads,
G kv heads, D head dim, P series (2 for CSA, 1 for HCA), K entries kept,
HI / DI indexer heads / dim, W window.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.ops import checks, chunking, masking
from sparse_attn.ops.attention import (
  check_indices,
  check_qkv,
  default_scale,
  gather_rows,
  group_heads,
  masked_softmax,
)
from sparse_attn.ops.indexer import relu_scores, two_stage_topk
from sparse_attn.ops.losses import slot_kl

# The paper's sizes (DeepSeek-V4-Flash; V4-Pro keeps 1024 entries).
PAPER_CSA_RATIO = 4
PAPER_HCA_RATIO = 128
PAPER_WINDOW = 128
PAPER_CSA_TOP_K = 512

_BUDGET = 1 << 23


def check_compress_sizes(ratio: int, window: int, top_k: int | None = None):
  """ValueError unless ratio, window (and top_k when given) are ints >= 1."""
  checks.check_positive_int("ratio", ratio)
  checks.check_positive_int("window", window)
  if top_k is not None:
    checks.check_positive_int("top_k", top_k)


def pool_groups(
  kv: jax.Array,
  gate: jax.Array,
  bias: jax.Array,
  ratio: int,
) -> jax.Array:
  """Compressed entries [B, N, G, D] of the N = S // ratio complete groups.

  kv, gate: [B, S, G, P, D] per-token contents C and gate logits Z;
  P = 2 pools with overlap (CSA: entry w = series 0 of group w-1 and
  series 1 of group w; group -1 is empty), P = 1 without (HCA). bias:
  [ratio, G, P, D], added to the gate logit of the token at that offset
  inside its group. The softmax runs per channel over the slots, in f32;
  tokens of an incomplete trailing group are left out.
  """
  ks = checks.check_rank("kv", kv, 5, "[B, S, G, P, D]")
  if tuple(gate.shape) != ks:
    raise ValueError(f"gate shape {gate.shape} must equal kv shape {ks}.")
  series = ks[3]
  if series not in (1, 2):
    raise ValueError(f"kv must have P = 1 or 2 series, got shape {ks}.")
  ratio = checks.check_positive_int("ratio", ratio)
  if tuple(bias.shape) != (ratio, *ks[2:]):
    raise ValueError(
      f"bias shape {bias.shape} must be [ratio, G, P, D] = {(ratio, *ks[2:])}."
    )
  b, s = ks[:2]
  n = s // ratio
  if n == 0:  # shorter than one group: no entry yet
    return jnp.zeros((b, 0, ks[2], ks[4]), kv.dtype)
  grouped = (b, n, ratio, *ks[2:])
  c = kv[:, : n * ratio].reshape(grouped)
  z = gate[:, : n * ratio].reshape(grouped).astype(jnp.float32)
  z = z + bias.astype(jnp.float32)
  if series == 2:
    # Series 0 of group w-1 followed by series 1 of group w (2m slots).
    prev_c = jnp.pad(
      c[:, :-1, :, :, 0], [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)]
    )
    prev_z = jnp.pad(
      z[:, :-1, :, :, 0],
      [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)],
      constant_values=-jnp.inf,
    )
    c = jnp.concatenate([prev_c, c[:, :, :, :, 1]], axis=2)
    z = jnp.concatenate([prev_z, z[:, :, :, :, 1]], axis=2)
  else:
    c, z = c[:, :, :, :, 0], z[:, :, :, :, 0]
  weights = jax.nn.softmax(z, axis=2)
  acc = checks.acc_dtype(kv)
  out = jnp.einsum("bnjgd,bnjgd->bngd", weights.astype(acc), c.astype(acc))
  return out.astype(kv.dtype)


def group_span(
  first: jax.Array, count: int, ratio: int, series: int
) -> jax.Array:
  """int32[B, (count + series - 1) * ratio]: the positions of the tokens
  the entries of groups first[b] .. first[b] + count - 1 pool (with
  overlap, series = 2, also the group before the first). Positions below 0
  name no token."""
  lead = series - 1
  first = jnp.asarray(first, jnp.int32)
  span = (count + lead) * ratio
  return (first[:, None] - lead) * ratio + jnp.arange(span, dtype=jnp.int32)


def pool_span(
  kv: jax.Array,
  gate: jax.Array,
  valid: jax.Array,
  bias: jax.Array,
  ratio: int,
) -> jax.Array:
  """Entries [B, count, G, D] from the tokens at `group_span`'s positions.

  kv, gate: [B, span, G, P, D] those tokens' contents and gate logits;
  valid: bool[B, span], False where no token exists (before position 0).
  A missing token weighs nothing (as `pool_groups`' empty group -1); its
  logit is finite, so a group with no token at all stays finite.
  """
  ks = checks.check_rank("kv", kv, 5, "[B, span, G, P, D]")
  if tuple(gate.shape) != ks:
    raise ValueError(f"gate shape {gate.shape} must equal kv shape {ks}.")
  if tuple(valid.shape) != ks[:2]:
    raise ValueError(f"valid shape {valid.shape} must be [B, span] = {ks[:2]}.")
  lead = ks[3] - 1
  if ks[1] % ratio or ks[1] // ratio <= lead:
    raise ValueError(
      f"kv shape {ks}: span must be (count + {lead}) * ratio={ratio} tokens."
    )
  ok = valid[:, :, None, None, None]
  c = jnp.where(ok, kv, 0)
  # In f32, where -1e30 is finite (pool_groups computes the gates in f32).
  z = jnp.where(ok, gate.astype(jnp.float32), -1e30)
  return pool_groups(c, z, bias, ratio)[:, lead:]


def pool_group_range(
  kv: jax.Array,
  gate: jax.Array,
  bias: jax.Array,
  ratio: int,
  first: jax.Array,
  count: int,
) -> jax.Array:
  """Entries [B, count, G, D] of groups first[b] .. first[b] + count - 1.

  The same entries as `pool_groups(kv, gate, bias, ratio)[b, first[b]:
  first[b] + count]` at the cost of those groups alone: their tokens are
  gathered from kv / gate [B, S, G, P, D] (`group_span`) and pooled
  (`pool_span`). first: int32[B]. A group reaching past S is pooled from
  the rows that exist (finite, for the caller to mask).
  """
  ks = checks.check_rank("kv", kv, 5, "[B, S, G, P, D]")
  ratio = checks.check_positive_int("ratio", ratio)
  count = checks.check_positive_int("count", count)
  first = jnp.asarray(first, jnp.int32)
  if first.shape != (ks[0],):
    raise ValueError(f"first shape {first.shape} must be [B] = ({ks[0]},).")
  t = group_span(first, count, ratio, ks[3])
  rows = jnp.clip(t, 0, ks[1] - 1)[:, :, None, None, None]
  return pool_span(
    jnp.take_along_axis(kv, rows, axis=1),
    jnp.take_along_axis(gate, rows, axis=1),
    (t >= 0) & (t < ks[1]),
    bias,
    ratio,
  )


def entry_positions(num_entries: int, ratio: int) -> jax.Array:
  """int32[N]: the position of each entry's first token (its RoPE position)."""
  return jnp.arange(num_entries, dtype=jnp.int32) * ratio


def entry_visible(
  q_pos: jax.Array, num_entries: int, ratio: int, kv_lengths: Any = None
) -> jax.Array:
  """bool[B, T, N]: entry w is complete for the query at position q_pos
  ((w + 1) * ratio - 1 <= q_pos) and lies inside kv_lengths."""
  last = (jnp.arange(num_entries, dtype=jnp.int32) + 1) * ratio - 1
  mask = last[None, None, :] <= q_pos[:, :, None]
  if kv_lengths is not None:
    kv = jnp.asarray(kv_lengths, jnp.int32)
    mask = mask & (last[None, None, :] < kv[:, None, None])
  return mask


def selected_visible(
  indices: jax.Array,
  num_entries: int,
  ratio: int,
  q_pos: jax.Array,
  kv_lengths: Any = None,
) -> jax.Array:
  """bool[B, T, K]: the slots of indices int32[B, T, K] naming an entry
  that `entry_visible` allows (-1 slots and incomplete entries are not)."""
  last = (indices + 1) * ratio - 1
  ok = (indices >= 0) & (indices < num_entries) & (last <= q_pos[:, :, None])
  if kv_lengths is not None:
    ok = ok & (last < jnp.asarray(kv_lengths, jnp.int32)[:, None, None])
  return ok


def compressed_scores(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  q_pos: jax.Array,
  ratio: int,
  kv_lengths: Any = None,
) -> jax.Array:
  """f32[B, T, N] index scores of the entries, -inf where not visible.

  q_idx [B, T, HI, DI], k_idx [B, N, DI] (the indexer's entries), weights
  [B, T, HI], q_pos int32[B, T] absolute query positions.
  """
  scores = relu_scores(q_idx, k_idx, weights)
  mask = entry_visible(q_pos, k_idx.shape[1], ratio, kv_lengths)
  return jnp.where(mask, scores, -jnp.inf)


def compressed_topk(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  k: int,
  *,
  ratio: int,
  q_pos: jax.Array,
  kv_lengths: Any = None,
) -> jax.Array:
  """int32[B, T, K]: the K visible entries of largest index score, -1 past
  the visible ones; ties go to the more recent entry (DSA's rule)."""
  checks.check_rank("q_idx", q_idx, 4, "[B, T, HI, DI]")
  checks.check_rank("k_idx", k_idx, 3, "[B, N, DI]")
  k = checks.check_k(k)
  if k_idx.shape[1] == 0:  # no complete group yet
    return jnp.full((*q_idx.shape[:2], k), -1, jnp.int32)
  # Query blocks bound the [chunk, N, HI] intermediates, as DSA's top-k.
  chunk = chunking.auto_chunk(
    q_idx.shape[1], k_idx.shape[1] * q_idx.shape[2], _BUDGET
  )

  def block(start, qb, wb, pb):
    del start
    return two_stage_topk(
      compressed_scores(qb, k_idx, wb, pb, ratio, kv_lengths), k
    )

  return chunking.map_query_chunks(block, chunk, q_idx, weights, q_pos)


def _check_entries(ck, cv, ks, vs):
  cks = checks.check_rank("ck", ck, 4, "[B, N, G, D]")
  cvs = checks.check_rank("cv", cv, 4, "[B, N, G, Dv]")
  if cks[0] != ks[0] or cks[2:] != ks[2:]:
    raise ValueError(
      f"ck shape {cks} must be [B, N, G, D] with B, G, D of k {ks}."
    )
  if cvs[:3] != cks[:3] or cvs[3] != vs[3]:
    raise ValueError(
      f"cv shape {cvs} must be [B, N, G, Dv] matching ck {cks} and v {vs}."
    )
  return cks


def compressed_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ck: jax.Array,
  cv: jax.Array,
  *,
  ratio: int,
  window: int,
  indices: jax.Array | None = None,
  sinks: jax.Array | None = None,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_counts: bool = False,
) -> Any:
  """Window + compressed-entry attention with sinks, [B, T, H, Dv].

  One softmax per query and head over: its last `window` tokens (keys k,
  values v [B, S, G, D]; the query itself included), the compressed
  entries (keys ck, values cv [B, N, G, D]) listed in `indices`
  int32[B, T, K] (CSA; -1 slots and entries not yet complete are skipped)
  or, with indices None, every visible entry (HCA), and the sink logit
  sinks[h] (f32[H]; None: no sink), which takes probability mass and adds
  no value. A row with nothing visible (padding) returns zeros.

  q_offset / kv_lengths follow the library's convention over the S
  tokens (default q_offset S - T); entry w is visible to the query at
  position p iff (w + 1) * ratio - 1 <= p. return_counts: also f32[B, T],
  the keys each query attends (window tokens + entries; the sink is not
  a key).
  """
  qs, ks, vs = check_qkv(q, k, v, q_offset, kv_lengths)
  check_compress_sizes(ratio, window)
  cks = _check_entries(ck, cv, ks, vs)
  batch, num_q, num_heads, head_dim = qs
  num_keys, num_kv, num_entries = ks[1], ks[2], cks[1]
  if indices is not None:
    check_indices(indices, batch, num_q)
  if sinks is not None and tuple(sinks.shape) != (num_heads,):
    raise ValueError(f"sinks shape {sinks.shape} must be [H] = ({num_heads},).")
  scale = default_scale(scale, head_dim)
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  acc = checks.acc_dtype(q)
  empty = num_entries == 0
  if empty:  # no complete group yet: one placeholder entry, never visible
    ck = jnp.zeros((batch, 1, num_kv, head_dim), ck.dtype)
    cv = jnp.zeros((batch, 1, num_kv, vs[3]), cv.dtype)
    num_entries = 1
  width = min(window, num_keys)
  slots = width + (num_entries if indices is None else indices.shape[2])
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(
      num_q, slots * num_heads * max(head_dim, vs[3]), _BUDGET
    )

  def block(start, qb, ib):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    qg = group_heads(qb, num_kv)  # [B, C, G, R, D]
    w_idx = masking.window_indices(q_pos, width, num_keys, kv_lengths)
    w_ok = w_idx >= 0
    w_safe = jnp.where(w_ok, w_idx, 0)
    kw, vw = gather_rows(k, w_safe), gather_rows(v, w_safe)
    logits_w = jnp.einsum(
      "btgrd,btkgd->btgrk", qg, kw, preferred_element_type=acc
    )
    if ib is None:
      c_ok = entry_visible(q_pos, num_entries, ratio, kv_lengths)
      logits_c = jnp.einsum(
        "btgrd,bngd->btgrn", qg, ck, preferred_element_type=acc
      )
      cv_b = None
    else:
      c_ok = selected_visible(ib, num_entries, ratio, q_pos, kv_lengths)
      c_safe = jnp.where(c_ok, ib, 0)
      logits_c = jnp.einsum(
        "btgrd,btkgd->btgrk",
        qg,
        gather_rows(ck, c_safe),
        preferred_element_type=acc,
      )
      cv_b = gather_rows(cv, c_safe)
    if empty:
      c_ok = jnp.zeros_like(c_ok)
    parts = [logits_w * scale, logits_c * scale]
    valid = [
      jnp.broadcast_to(w_ok[:, :, None, None, :], logits_w.shape),
      jnp.broadcast_to(c_ok[:, :, None, None, :], logits_c.shape),
    ]
    if sinks is not None:
      sink = sinks.astype(acc).reshape(num_kv, num_heads // num_kv, 1)
      parts.append(jnp.broadcast_to(sink, (*logits_w.shape[:-1], 1)))
      # A sink only where the row has a key, so padded rows stay zero.
      has_key = jnp.any(w_ok, -1) | jnp.any(c_ok, -1)
      valid.append(
        jnp.broadcast_to(has_key[:, :, None, None, None], parts[-1].shape)
      )
    probs, _ = masked_softmax(
      jnp.concatenate(parts, -1), jnp.concatenate(valid, -1)
    )
    p_w = probs[..., :width].astype(v.dtype)
    p_c = probs[..., width : width + logits_c.shape[-1]].astype(v.dtype)
    out = jnp.einsum("btgrk,btkgv->btgrv", p_w, vw, preferred_element_type=acc)
    if cv_b is None:
      out = out + jnp.einsum(
        "btgrn,bngv->btgrv", p_c, cv, preferred_element_type=acc
      )
    else:
      out = out + jnp.einsum(
        "btgrk,btkgv->btgrv", p_c, cv_b, preferred_element_type=acc
      )
    out = out.reshape(*qb.shape[:3], vs[3]).astype(q.dtype)
    counts = jnp.sum(w_ok, -1) + jnp.sum(c_ok, -1)
    return out, counts.astype(jnp.float32)

  out, counts = chunking.map_query_chunks(block, query_chunk, q, indices)
  return (out, counts) if return_counts else out


def compressed_indexer_kl(
  q: jax.Array,
  ck: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  ratio: int,
  indices: jax.Array | None = None,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  num_tokens: int | None = None,
  scale: float | None = None,
) -> jax.Array:
  """The indexer's KL to the main attention over the compressed entries.

  Target p[t, :]: each head's softmax of scale * q . ck over the entries in
  the support, summed over heads and L1-normalised (DSA's target, on the
  entries); the indexer's distribution is the softmax of its scores over
  the same support. Support: every visible entry with indices None (the
  warm-up), else the valid entries of indices int32[B, T, K] (the sparse
  stage). Returns the mean over queries with a non-empty support (f32);
  gradients reach q_idx, k_idx and weights only.

  q [B, T, H, D], ck [B, N, G, D], q_idx [B, T, HI, DI], k_idx [B, N, DI],
  weights [B, T, HI]; q_offset is over num_tokens tokens (default T).
  """
  qs = checks.check_rank("q", q, 4, "[B, T, H, D]")
  cks = checks.check_rank("ck", ck, 4, "[B, N, G, D]")
  iks = checks.check_rank("k_idx", k_idx, 3, "[B, N, DI]")
  if iks[:2] != cks[:2]:
    raise ValueError(
      f"k_idx shape {iks} must have the [B, N] of ck {cks} (one indexer "
      "key per entry)."
    )
  batch, num_q = qs[:2]
  num_entries, num_kv = cks[1], cks[2]
  if num_entries == 0:  # no entry yet: an empty support everywhere
    return jnp.zeros((), jnp.float32)
  scale = default_scale(scale, qs[3])
  offset = masking.resolve_q_offset(
    q_offset, batch, num_q, num_q if num_tokens is None else num_tokens
  )
  q, ck = jax.lax.stop_gradient(q), jax.lax.stop_gradient(ck)
  acc = checks.acc_dtype(q, q_idx)
  width = num_entries if indices is None else indices.shape[2]
  chunk = chunking.auto_chunk(num_q, width * (qs[2] + q_idx.shape[2]), _BUDGET)

  def block(start, qb, qib, wb, ib):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    qg = group_heads(qb, num_kv)
    if ib is None:
      valid = entry_visible(q_pos, num_entries, ratio, kv_lengths)
      logits = jnp.einsum(
        "btgrd,bngd->btgrn", qg, ck, preferred_element_type=acc
      )
      index_logits = relu_scores(qib, k_idx, wb)
    else:
      valid = selected_visible(ib, num_entries, ratio, q_pos, kv_lengths)
      safe = jnp.where(valid, ib, 0)
      logits = jnp.einsum(
        "btgrd,btkgd->btgrk",
        qg,
        gather_rows(ck, safe),
        preferred_element_type=acc,
      )
      dots = jnp.einsum(
        "bthd,btkd->bthk",
        qib,
        gather_rows(k_idx, safe),
        preferred_element_type=acc,
      )
      index_logits = jnp.einsum(
        "bthk,bth->btk", jax.nn.relu(dots), wb.astype(acc)
      )
    return slot_kl(logits * scale, index_logits, valid)

  kl, has = chunking.map_query_chunks(block, chunk, q, q_idx, weights, indices)
  return jnp.sum(jnp.where(has, kl, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def compressed_keys_per_query(
  seq_len: int, *, ratio: int, window: int, top_k: int | None = None
) -> np.ndarray:
  """float64[seq_len]: keys attended by the query at position i of a causal
  sequence: min(window, i + 1) tokens plus its visible entries
  ((i + 1) // ratio; at most top_k of them for CSA)."""
  i = np.arange(seq_len)
  entries = (i + 1) // ratio
  if top_k is not None:
    entries = np.minimum(entries, top_k)
  return (np.minimum(window, i + 1) + entries).astype(np.float64)
