"""Pure-functional attention: dense causal reference, gathered top-k, DSA.

Shapes: B batch, T queries, S keys, H query heads, G kv heads (H = G * R),
D head dim, Dv value dim, K selected keys per query. Causality follows
`sparse_attn.ops.masking`. All functions are jit/vmap/grad compatible; softmax
statistics are kept in f32 whatever the input dtype, and a query that sees
no key returns zeros (never NaN) with zero gradients.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp

from sparse_attn import dispatch
from sparse_attn.ops import checks, chunking, kernel_sharding, masking
from sparse_attn.ops.indexer import lightning_topk

# Bound on the per-block intermediates (elements) of the chunked XLA paths.
ATTN_BUDGET = 1 << 24

# Kept here too: they were first defined in this module.
CAUSAL_SEGMENTS = chunking.CAUSAL_SEGMENTS
MIN_CAUSAL_SEGMENT = chunking.MIN_CAUSAL_SEGMENT
causal_segments = chunking.causal_segments
static_q_offset = chunking.static_q_offset


def check_qkv(q, k, v, q_offset=None, kv_lengths=None):
  qs = checks.check_rank("q", q, 4, "[B, T, H, D]")
  ks = checks.check_rank("k", k, 4, "[B, S, G, D]")
  vs = checks.check_rank("v", v, 4, "[B, S, G, Dv]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    checks.check_floating(name, x)
  checks.check_same_dtype(q=q, k=k, v=v)
  if ks[0] != qs[0] or ks[3] != qs[3]:
    raise ValueError(
      f"k shape {ks} must be [B, S, G, D] with B={qs[0]} and D={qs[3]} of "
      f"q shape {qs}."
    )
  if vs[:3] != ks[:3]:
    raise ValueError(
      f"v shape {vs} must be [B, S, G, Dv] with [B, S, G] = {ks[:3]} of "
      f"k shape {ks}."
    )
  checks.check_heads(qs[2], ks[2], qs, ks)
  checks.check_q_offset(q_offset, qs[0])
  checks.check_kv_lengths(kv_lengths, qs[0])
  return qs, ks, vs


def check_indexed_qkv(q, k, v, q_idx, k_idx, q_offset=None, kv_lengths=None):
  """check_qkv, and indexer inputs q_idx [B, T, HI, DI], k_idx [B, S, DI]
  over the same tokens (DSA and its variants)."""
  qs, ks, _ = check_qkv(q, k, v, q_offset, kv_lengths)
  iq = checks.check_rank("q_idx", q_idx, 4, "[B, T, HI, DI]")
  ik = checks.check_rank("k_idx", k_idx, 3, "[B, S, DI]")
  if iq[:2] != qs[:2] or ik[:2] != ks[:2]:
    raise ValueError(
      f"indexer inputs must cover the same tokens as the attention: q_idx "
      f"{iq} vs q {qs} ([B, T]), k_idx {ik} vs k {ks} ([B, S])."
    )


def default_scale(scale: float | None, head_dim: int) -> float:
  return head_dim**-0.5 if scale is None else scale


def masked_softmax(
  logits: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis of f32 logits where `valid`.

  Returns (probs, lse). Rows with no valid entry get all-zero probabilities
  and lse = -inf; no NaN reaches the output or the gradient because masked
  logits are replaced (not added to) before the exponential.
  """
  logits = jnp.where(valid, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  # The shift cancels in probs and lse alike; stopping its gradient keeps
  # d lse / d logits = probs (else the argmax gets an extra one).
  row_max = jax.lax.stop_gradient(
    jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  )
  unnorm = jnp.exp(logits - row_max)
  denom = jnp.sum(unnorm, axis=-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  probs = unnorm / safe
  lse = jnp.where(denom > 0, jnp.log(safe) + row_max, -jnp.inf)[..., 0]
  return probs, lse


def group_heads(q, num_kv_heads):
  b, t, h, d = q.shape
  return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def dense_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  query_chunk: int | None = None,
) -> jax.Array:
  """Causal softmax attention [B, T, H, Dv] (the dense reference).

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv]; H % G == 0 (GQA/MQA).
    q_offset: absolute position of query 0 (int or int32[B]); default S - T.
    kv_lengths: optional int32[B]; keys >= kv_lengths[b] are padding.
    scale: logit scale, default D**-0.5.
    query_chunk: queries per block (default: bounded by a memory budget).

  With q_offset known when tracing (None or an integer, as in training)
  and all T x S logits within the memory budget, the queries are split
  into `chunking.causal_segments`, each over only the keys it can see,
  which skips most masked logits. Past the budget in causal
  self-attention (T == S, offset 0), each step takes two chunks of
  query_chunk/2 queries, c and n-1-c, over the n+1 key blocks they see
  (`chunking.map_causal_pairs`): one dense block per key block, merged
  per chunk by `merge_partials` (when each step's per-slot copies of
  q, k, v and the partial outputs, ~S * (H + G) * (D + Dv) elements, fit
  the budget; not at MLA's absorbed width). Otherwise past the budget,
  and with a traced or per-row offset (decoding, prefill into a cache),
  every query block scans all S keys.
  All give the same result up to rounding (bf16 k/v gradients are summed
  over the segments or blocks).
  """
  qs, ks, vs = check_qkv(q, k, v, q_offset, kv_lengths)
  batch, num_q, num_heads, head_dim = qs
  num_keys = ks[1]
  scale = default_scale(scale, head_dim)
  offset = masking.resolve_q_offset(q_offset, batch, num_q, num_keys)
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(num_q, num_keys * num_heads, ATTN_BUDGET)

  value_dim = vs[3]
  # Per slot row: q, k, v and the partial outputs.
  slot_elems = (num_heads + ks[2]) * (head_dim + value_dim)
  if chunking.use_causal_pairs(
    q_offset, num_q, num_keys, query_chunk, slot_elems, ATTN_BUDGET
  ):

    def pair_attention(pair, queries, keys):
      (qb,), (kb, vb) = queries, keys
      # Each slot is one dense block over its C keys; the owners' softmax
      # over all their slots is the merge of the slots' partial results.
      slot = functools.partial(
        dense_block, scale=scale, out_dtype=checks.acc_dtype(qb)
      )
      valid = pair.visible(batch, kv_lengths)[:, :, :, None, None]
      out, lse = jax.vmap(slot, in_axes=(1, 1, 1, 2), out_axes=1)(
        qb, kb, vb, valid
      )
      return merge_partials(out, lse, pair.owners())[0].astype(q.dtype)

    return chunking.map_causal_pairs(
      pair_attention, chunking.pair_chunk(query_chunk), (q,), (k, v)
    )

  def block(start, seen, qb):
    q_pos = offset[:, None] + start + jnp.arange(qb.shape[1], dtype=jnp.int32)
    valid = masking.visible(q_pos, seen, kv_lengths)[:, :, None, None, :]
    return dense_block(qb, k[:, :seen], v[:, :seen], valid, scale)[0]

  return chunking.map_causal_segments(block, query_chunk, q_offset, num_keys, q)


def merge_partials(
  out: jax.Array, lse: jax.Array, owners: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Merges softmax attention over disjoint key sets into one per group.

  out f32[B, J, ..., Dv] and lse f32[B, J, ...] are J partial results, each
  normalised over its own keys (lse -inf, out 0 where it has none);
  owners [J, O] is the one-hot group of each. Returns (out f32[B, O, ...,
  Dv], lse f32[B, O, ...]): attention over the union of each group's keys,
  zero and -inf for a row whose group has no key, with no NaN in the
  gradient.
  """
  member = owners.T.astype(bool).reshape(
    1, *owners.T.shape, *(1,) * (lse.ndim - 2)
  )
  top = jnp.max(jnp.where(member, lse[:, None], -jnp.inf), axis=2)
  # The shift cancels in the merge; it only keeps the exponentials finite.
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  finite = jnp.isfinite(lse)
  # One-hot sums as einsums at full precision: the default on TPU (one
  # bf16 pass) or GPU (TF32) would round the f32 softmax statistics.
  onehot = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
  shift = onehot("bo...,jo->bj...", top, owners)
  weight = jnp.where(finite, jnp.exp(jnp.where(finite, lse, 0.0) - shift), 0.0)
  total = onehot("bj...,jo->bo...", weight, owners)
  merged = onehot("bj...v,jo->bo...v", out * weight[..., None], owners)
  safe = jnp.where(total > 0, total, 1.0)
  lse_out = jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)
  return merged / safe[..., None], lse_out


def dense_block(
  qb: jax.Array,
  k: jax.Array,
  v: jax.Array,
  valid: jax.Array,
  scale: float,
  bias: jax.Array | None = None,
  out_dtype: Any = None,
):
  """Softmax attention of a query block over all S keys under a mask.

  The one dense body shared by dense_attention, the counted gathered form
  and the pattern kinds. qb [B, C, H, D], k [B, S, G, D], v [B, S, G, Dv];
  valid bool broadcastable to [B, C, G, H/G, S]; bias (same broadcast) is
  added to the logits. Returns (out [B, C, H, Dv] in `out_dtype`, default
  q's dtype,
  lse f32[B, C, H], -inf for rows with no valid key).
  """
  num_kv = k.shape[2]
  acc = checks.acc_dtype(qb)
  logits = (
    jnp.einsum(
      "btgrd,bsgd->btgrs",
      group_heads(qb, num_kv),
      k,
      preferred_element_type=acc,
    )
    * scale
  )
  if bias is not None:
    logits = logits + bias
  probs, lse = masked_softmax(logits, valid)
  out = jnp.einsum(
    "btgrs,bsgv->btgrv", probs.astype(v.dtype), v, preferred_element_type=acc
  )
  out_dtype = qb.dtype if out_dtype is None else out_dtype
  out = out.reshape(*qb.shape[:3], v.shape[3]).astype(out_dtype)
  return out, lse.reshape(qb.shape[:3])


def check_indices(indices, batch, num_q):
  ishape = checks.check_rank("indices", indices, 3, "[B, T, K]")
  checks.check_integer("indices", indices)
  if ishape[:2] != (batch, num_q):
    raise ValueError(
      f"indices shape {ishape} must be [B, T, K] with [B, T] = "
      f"{(batch, num_q)} of q."
    )
  if ishape[2] < 1:
    raise ValueError(f"indices must select K >= 1 keys, got shape {ishape}.")
  return ishape


def gather_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x[B, S, ...] rows at indices int[B, T, K] -> [B, T, K, ...] (per batch)."""
  return jax.vmap(lambda xb, ib: xb[ib])(x, indices)


def _gathered_block(qb, k, v, ib, scale):
  num_keys, num_kv = k.shape[1], k.shape[2]
  valid = (ib >= 0) & (ib < num_keys)
  safe = jnp.where(valid, ib, 0)
  kg = gather_rows(k, safe)  # [B, C, K, G, D]
  vg = gather_rows(v, safe)  # [B, C, K, G, Dv]
  qg = group_heads(qb, num_kv)
  acc = checks.acc_dtype(qb)
  logits = (
    jnp.einsum("btgrd,btkgd->btgrk", qg, kg, preferred_element_type=acc) * scale
  )
  probs, lse = masked_softmax(logits, valid[:, :, None, None, :])
  out = jnp.einsum(
    "btgrk,btkgv->btgrv", probs.astype(v.dtype), vg, preferred_element_type=acc
  )
  out = out.reshape(*qb.shape[:3], v.shape[3]).astype(qb.dtype)
  return out, lse.reshape(qb.shape[:3])


def selection_counts(indices: jax.Array, num_keys: int, dtype=jnp.float32):
  """(present bool[B, T, S], log multiplicity [B, T, S]) of a selection.

  Adding log(count) to a logit weighs a key selected c times by c, so a
  dense softmax over `present` keys equals the softmax over the gathered
  slots (duplicates included). Indices outside [0, S) are ignored.
  """
  batch, num_q, _ = indices.shape
  valid = (indices >= 0) & (indices < num_keys)
  rows = jnp.arange(batch)[:, None, None]
  cols = jnp.arange(num_q)[None, :, None]
  counts = (
    jnp.zeros((batch, num_q, num_keys), jnp.int32)
    .at[rows, cols, jnp.where(valid, indices, num_keys)]
    .add(1, mode="drop")
  )
  return counts > 0, jnp.log(jnp.maximum(counts, 1).astype(dtype))


def use_counted(num_keys: int, top_k: int) -> bool:
  """Whether the dense counted form beats gathering (S within 8x of K)."""
  return num_keys <= _COUNTED_MAX_RATIO * top_k


def _counted_block(qb, k, v, ib, scale):
  """Same result as `_gathered_block`, computed densely over all S keys.

  counts[b, t, s] = how often s occurs in ib[b, t]; the softmax weighs key s
  by counts * exp(logit), which is exactly the gathered softmax (duplicates
  included). When S is within a small multiple of K this beats gathering:
  XLA's gather, and above all the scatter-add of its gradient, cost far more
  per element on CPU than the matmuls they avoid.
  """
  present, log_counts = selection_counts(ib, k.shape[1], checks.acc_dtype(qb))
  return dense_block(
    qb,
    k,
    v,
    present[:, :, None, None, :],
    scale,
    bias=log_counts[:, :, None, None, :],
  )


# Use the dense counted form while S <= this many times K.
_COUNTED_MAX_RATIO = 8


@overload
def gathered_attention_reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_lse: Literal[False] = False,
  method: str | None = None,
) -> jax.Array: ...


@overload
def gathered_attention_reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_lse: Literal[True],
  method: str | None = None,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def gathered_attention_reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_lse: bool = False,
  method: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def gathered_attention_reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  scale: float | None = None,
  query_chunk: int | None = None,
  return_lse: bool = False,
  method: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """XLA reference of `gathered_attention`; optionally also lse f32[B, T, H].

  method: "gather" (gather the K selected rows per query, O(T*K) memory),
  "counted" (dense over S with per-key multiplicities, no gather), or None:
  "counted" when S <= 8*K, else "gather". Both give the same result.
  """
  qs, ks, vs = check_qkv(q, k, v)
  ishape = check_indices(indices, qs[0], qs[1])
  scale = default_scale(scale, qs[3])
  if method is None:
    method = "counted" if use_counted(ks[1], ishape[2]) else "gather"
  if method not in ("gather", "counted"):
    raise ValueError(
      f"method must be 'gather', 'counted' or None, got {method!r}."
    )
  if method == "gather":
    per_query = ishape[2] * ks[2] * (qs[3] + vs[3]) + ishape[2] * qs[2]
    block_fn = _gathered_block
  else:
    per_query = ks[1] * (qs[2] + 2)
    block_fn = _counted_block
  if query_chunk is None:
    query_chunk = chunking.auto_chunk(qs[1], per_query, ATTN_BUDGET)
  out, lse = chunking.map_query_chunks(
    lambda start, qb, ib: block_fn(qb, k, v, ib, scale), query_chunk, q, indices
  )
  return (out, lse) if return_lse else out


def gathered_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  scale: float | None = None,
  implementation: str | None = None,
  block_sizes: Any = None,
) -> jax.Array:
  """Softmax attention [B, T, H, Dv] of each query over its selected keys only.

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv]; H % G == 0.
    indices: int32[B, T, K] key positions per query, shared by all heads;
      -1 (or any value outside [0, S)) is ignored. A query with no valid
      index returns zeros. Duplicate indices count twice.
    scale: logit scale, default D**-0.5.
    implementation: None (best for the platform), "xla" or "pallas".
    block_sizes: tiling of the Pallas kernel,
      `kernels_pallas.gathered_attention.BlockSizes` or a dict of its fields;
      None fields (or None) take the platform defaults. Ignored by "xla".
  """
  block_sizes = dispatch.block_sizes(
    "gathered_attention", block_sizes, "block_sizes"
  )
  impl = dispatch.resolve(implementation)
  if impl == "pallas":
    qs, _, _ = check_qkv(q, k, v)
    check_indices(indices, qs[0], qs[1])
    kernel = dispatch.kernel("gathered_attention", "gathered_attention")
    # q's heads and k/v's kv heads split together: query head h reads kv
    # group h // (H/G), so a split that divides G keeps whole groups.
    heads = ("batch", None, "heads", None)
    return kernel_sharding.call_kernel_sharded(
      lambda q, k, v, i: kernel(
        q, k, v, i, scale=scale, block_sizes=block_sizes
      ),
      (q, k, v, indices),
      roles=[heads, heads, heads, ("batch", None, None)],
      out_roles=heads,
    )
  return gathered_attention_reference(q, k, v, indices, scale=scale)


@overload
def dsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  top_k: int,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_indices: Literal[False] = False,
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
) -> jax.Array: ...


@overload
def dsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  top_k: int,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_indices: Literal[True],
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def dsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  top_k: int,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_indices: bool = False,
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def dsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  top_k: int,
  q_offset: Any = None,
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  implementation: str | None = None,
  return_indices: bool = False,
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """DeepSeek Sparse Attention [B, T, H, Dv]: indexer top-k, then gathered attention.

  Args:
    q: [B, T, H, D]; k: [B, S, G, D]; v: [B, S, G, Dv].
    q_idx: [B, T, HI, DI]; k_idx: [B, S, DI]; weights: [B, T, HI].
    top_k: keys kept per query (K); with K >= S this equals dense attention.
    return_indices: also return the int32[B, T, K] selection.
    topk_block_sizes: `kernels_pallas.topk.BlockSizes` (or a dict of its
      fields) for the top-k kernel; see `lightning_topk`.
    attention_block_sizes: `kernels_pallas.gathered_attention.BlockSizes`
      (or a dict) for the attention kernel; see `gathered_attention`.
      Both are ignored by implementation "xla".
  """
  topk_block_sizes = dispatch.block_sizes(
    "topk", topk_block_sizes, "topk_block_sizes"
  )
  attention_block_sizes = dispatch.block_sizes(
    "gathered_attention", attention_block_sizes, "attention_block_sizes"
  )
  check_indexed_qkv(q, k, v, q_idx, k_idx, q_offset, kv_lengths)
  indices = lightning_topk(
    q_idx,
    k_idx,
    weights,
    top_k,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    implementation=implementation,
    block_sizes=topk_block_sizes,
  )
  out = gathered_attention(
    q,
    k,
    v,
    indices,
    scale=scale,
    implementation=implementation,
    block_sizes=attention_block_sizes,
  )
  return (out, indices) if return_indices else out
