"""Attention with the sequence sharded over a mesh axis (context parallelism).

Every function here runs *inside* shard_map (or any map that binds
`axis_name`, the context axis of C shards). Each shard holds the rows of its
chunks of the sequence in layout order (`sparse_attn.ops.context_layout`):
its queries, keys, values and indexer keys, and returns the outputs of its
own queries. Positions are implicit in the layout, so causality, the top-k
selection and every loss equal the unsharded computation on the same
tokens (the tests compare them on 8 devices, gradients included). Indices
(the -1 sentinel included) always name natural positions in [0, S).

How each piece crosses shards:

* indexer keys (DI values per token): all-gathered, so each shard scores
  and selects the top-k of its own queries over all S keys exactly as the
  unsharded `lightning_topk` does (`TIE_RULE` included);
* sparse attention, two strategies:
  - "all_gather": K and V are all-gathered (O(S) K/V per device);
  - "fetch": K and V stay sharded; a ring pass brings each block past
    every shard, whose queries attend the selected slots that block holds
    and fold them into an online softmax (O(S/C) K/V per device; no
    [Tc, K, D] copy of the selected rows is ever built). Its custom VJP
    recomputes each hop in a second ring pass that carries the K/V
    gradients home;
* dense attention: ring attention (each K/V block visits every shard and an
  online softmax accumulates the blocks; a custom VJP recomputes each block
  in a second ring pass that carries the K/V gradients home), or
  "all_gather";
* the indexer KL losses: the main keys (stop-gradient) are all-gathered for
  the dense warm-up KL, which needs every key's attention weight; the
  sparse KL reads the selected rows with the chosen strategy ("fetch":
  one ring pass collects the main logits of the selected slots, the
  indexer keys are all-gathered anyway).

Shapes are per shard: B batch, Tc = S/C local queries and keys, H heads,
G kv heads, D head dim, Dv value dim, HI indexer heads, DI indexer dim,
K top-k. Without `kv_lengths` every query sees at least itself, which the
loss means rely on.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from sparse_attn.ops import chunking, context_layout, losses
from sparse_attn.ops.attention import (
  ATTN_BUDGET,
  default_scale,
  dense_attention,
  dense_block,
  dsa_attention,
  gather_rows,
  gathered_attention,
  group_heads,
)
from sparse_attn.ops.indexer import lightning_topk

STRATEGIES = ("all_gather", "fetch")
DENSE_STRATEGIES = ("ring", "all_gather")


def check_strategy(strategy: str, allowed=STRATEGIES) -> str:
  if strategy not in allowed:
    raise ValueError(f"strategy must be one of {allowed}, got {strategy!r}.")
  return strategy


def _ring(axis_name: str, num_shards: int):
  perm = [(i, (i + 1) % num_shards) for i in range(num_shards)]
  return lambda tree: jax.tree.map(
    lambda x: jax.lax.ppermute(x, axis_name, perm), tree
  )


def _ring_pass(axis_name: str, blocks, carry, visit):
  """Shows every shard's `blocks` (a pytree) to this shard once.

  carry = visit(j, blocks_of_shard_j, carry) for each j in ring order,
  starting with this shard's own; the blocks move one hop between visits
  (C - 1 ppermutes). Returns the final carry.
  """
  num_shards = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  send = _ring(axis_name, num_shards)

  def step(s, state):
    b, c = state
    return send(b), visit((me - s) % num_shards, b, c)

  b, carry = jax.lax.fori_loop(0, num_shards - 1, step, (blocks, carry))
  return visit((me - num_shards + 1) % num_shards, b, carry)


def _local_chunks(seq_len: int, num_shards: int, layout: str, axis_name: str):
  """[(row slice, natural offset)] of this shard's chunks."""
  length = context_layout.chunk_length(seq_len, num_shards, layout)
  me = jax.lax.axis_index(axis_name)
  ids = context_layout.shard_chunk_ids(me, num_shards, layout)
  return [
    (slice(n * length, (n + 1) * length), c * length) for n, c in enumerate(ids)
  ]


def gather_sequence(
  x: jax.Array, axis_name: str, layout: str = "zigzag"
) -> jax.Array:
  """[B, Tc, ...] shards in layout order -> [B, S, ...] in natural order."""
  num_shards = jax.lax.axis_size(axis_name)
  full = jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  return context_layout.from_layout(full, num_shards, layout)


def context_topk(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  top_k: int,
  *,
  axis_name: str,
  layout: str = "zigzag",
  implementation: str | None = None,
  block_sizes: Any = None,
) -> jax.Array:
  """int32[B, Tc, K]: `lightning_topk` of this shard's queries over all keys.

  q_idx [B, Tc, HI, DI], k_idx [B, Tc, DI], weights [B, Tc, HI] (this
  shard's rows). The indexer keys are all-gathered; each of the shard's
  chunks is selected with its own offset, so rows equal the unsharded
  selection (natural key positions, -1 slots, `TIE_RULE`).
  """
  keys = gather_sequence(k_idx, axis_name, layout)
  num_shards = jax.lax.axis_size(axis_name)
  parts = [
    lightning_topk(
      q_idx[:, rows],
      keys,
      weights[:, rows],
      top_k,
      q_offset=offset,
      implementation=implementation,
      block_sizes=block_sizes,
    )
    for rows, offset in _local_chunks(
      keys.shape[1], num_shards, layout, axis_name
    )
  ]
  return jnp.concatenate(parts, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fetch_rows(
  x: jax.Array, indices: jax.Array, axis_name: str, layout: str = "zigzag"
) -> jax.Array:
  """x's rows at natural positions `indices`, from whichever shard holds them.

  x [B, Tc, ...] this shard's rows (layout order); indices int[B, T', K]
  natural positions in [0, S) (anything else reads zeros). Returns
  [B, T', K, ...]. The blocks of x pass around the ring once; each shard
  keeps only the rows it asked for, so no device holds more than two
  blocks of x. The VJP sends the row gradients around the ring to the
  shards that own the rows (scatter-add, duplicates summed).
  """
  return _fetch_fwd(x, indices, axis_name, layout)[0]


def _fetch_plan(indices, seq_len, num_shards, layout):
  valid = (indices >= 0) & (indices < seq_len)
  safe = jnp.where(valid, indices, 0)
  owner, row = context_layout.owner_and_row(safe, seq_len, num_shards, layout)
  return valid, owner, row


def _fetch_fwd(x, indices, axis_name, layout):
  num_shards = jax.lax.axis_size(axis_name)
  seq_len = x.shape[1] * num_shards
  valid, owner, row = _fetch_plan(indices, seq_len, num_shards, layout)
  trailing = (None,) * (x.ndim - 2)

  def visit(j, block, out):
    take = valid & (owner == j)
    rows = gather_rows(block, jnp.where(take, row, 0))
    return jnp.where(take[(...,) + trailing], rows, out)

  out = jnp.zeros(indices.shape + x.shape[2:], x.dtype)
  return _ring_pass(axis_name, x, out, visit), (indices, x.shape)


def _fetch_bwd(axis_name, layout, res, g):
  indices, shape = res
  num_shards = jax.lax.axis_size(axis_name)
  seq_len = shape[1] * num_shards
  valid, owner, row = _fetch_plan(indices, seq_len, num_shards, layout)
  me = jax.lax.axis_index(axis_name)
  send = _ring(axis_name, num_shards)
  trailing = (None,) * (len(shape) - 2)
  # Per-row scatter under vmap (a batched scatter): XLA's SPMD partitioner
  # rejects the equivalent explicit batch-index scatter when the auto axes
  # (data, fsdp, tensor) shard the operand.
  scatter = jax.vmap(lambda gb, ib, cb: gb.at[ib].add(cb))

  def step(s, grad):
    take = valid & (owner == (me - s) % num_shards)
    contrib = jnp.where(take[(...,) + trailing], g, 0).astype(grad.dtype)
    grad = scatter(grad, jnp.where(take, row, 0), contrib)
    # The accumulator travels with its block: after C hops it is home.
    return send(grad)

  grad = jax.lax.fori_loop(0, num_shards, step, jnp.zeros(shape, jnp.float32))
  return grad.astype(g.dtype), None


fetch_rows.defvjp(_fetch_fwd, _fetch_bwd)


def _slot_block_fn(q, indices, axis_name, layout, scale):
  """block(j, kb, vb) of the sparse ring: each query over its selected slots
  that shard j holds (the others masked), in query chunks whose gathered
  rows fit ATTN_BUDGET; each chunk is rematerialised in the backward pass,
  so only q, k, v, the output and the lse are kept."""
  num_shards = jax.lax.axis_size(axis_name)
  seq_len = q.shape[1] * num_shards
  valid, owner, row = _fetch_plan(indices, seq_len, num_shards, layout)
  k_sel = indices.shape[2]

  def block(j, kb, vb, q_=None):
    q_ = q if q_ is None else q_
    take = valid & (owner == j)
    rows = jnp.where(take, row, 0)
    per_query = k_sel * (kb.shape[2] * kb.shape[3] + vb.shape[2] * vb.shape[3])
    chunk = chunking.auto_chunk(q_.shape[1], per_query, ATTN_BUDGET)

    @jax.checkpoint
    def one(start, qb, rb, tb):
      del start
      b, c = qb.shape[:2]
      fold = lambda x: x.reshape(b * c, *x.shape[2:])  # noqa: E731
      out, lse = dense_block(
        fold(qb)[:, None],
        fold(gather_rows(kb, rb)),
        fold(gather_rows(vb, rb)),
        fold(tb)[:, None, None, None, :],
        scale,
      )
      return out.reshape(b, c, *out.shape[2:]), lse.reshape(b, c, -1)

    return chunking.map_query_chunks(one, chunk, q_, rows, take)

  return block


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_sparse(q, k, v, indices, axis_name, layout, scale):
  return _ring_sparse_fwd(q, k, v, indices, axis_name, layout, scale)[0]


def _ring_sparse_fwd(q, k, v, indices, axis_name, layout, scale):
  block = _slot_block_fn(q, indices, axis_name, layout, scale)
  out, lse = _ring_fwd(q, k, v, axis_name, block)
  return out, (q, k, v, indices, out, lse)


def _ring_sparse_bwd(axis_name, layout, scale, res, g):
  q, k, v, indices, out, lse = res
  block = _slot_block_fn(q, indices, axis_name, layout, scale)
  return (*_ring_bwd(q, k, v, out, lse, g, axis_name, block), None)


_ring_sparse.defvjp(_ring_sparse_fwd, _ring_sparse_bwd)


def context_gathered_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  axis_name: str,
  layout: str = "zigzag",
  strategy: str = "fetch",
  scale: float | None = None,
  implementation: str | None = None,
  block_sizes: Any = None,
) -> jax.Array:
  """`gathered_attention` of this shard's queries [B, Tc, H, Dv].

  q [B, Tc, H, D], k [B, Tc, G, D], v [B, Tc, G, Dv] (this shard's rows),
  indices int32[B, Tc, K] natural key positions (-1 ignored). strategy:
  "fetch" (K/V stay sharded, see the module docstring) or "all_gather".
  """
  check_strategy(strategy)
  if strategy == "all_gather":
    return gathered_attention(
      q,
      gather_sequence(k, axis_name, layout),
      gather_sequence(v, axis_name, layout),
      indices,
      scale=scale,
      implementation=implementation,
      block_sizes=block_sizes,
    )
  del implementation, block_sizes  # the ring's blocks are XLA (see above)
  scale = default_scale(scale, q.shape[-1])
  return _ring_sparse(q, k, v, indices, axis_name, layout, scale)


def context_dsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  top_k: int,
  axis_name: str,
  layout: str = "zigzag",
  strategy: str = "fetch",
  scale: float | None = None,
  implementation: str | None = None,
  return_indices: bool = False,
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """`dsa_attention` of this shard's queries: context top-k, then attention."""
  indices = context_topk(
    q_idx,
    k_idx,
    weights,
    top_k,
    axis_name=axis_name,
    layout=layout,
    implementation=implementation,
    block_sizes=topk_block_sizes,
  )
  out = context_gathered_attention(
    q,
    k,
    v,
    indices,
    axis_name=axis_name,
    layout=layout,
    strategy=strategy,
    scale=scale,
    implementation=implementation,
    block_sizes=attention_block_sizes,
  )
  return (out, indices) if return_indices else out


def _merge(acc, lse, out_b, lse_b):
  """Online-softmax merge of two partial results (f32, -inf safe)."""
  top = jnp.maximum(lse, lse_b)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  wa, wb = jnp.exp(lse - top), jnp.exp(lse_b - top)
  total = wa + wb
  safe = jnp.where(total > 0, total, 1.0)
  acc = (acc * wa[..., None] + out_b.astype(jnp.float32) * wb[..., None]) / (
    safe[..., None]
  )
  return acc, jnp.where(total > 0, jnp.log(safe) + top, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ring_dense(q, k, v, axis_name, layout, scale):
  return _ring_dense_fwd(q, k, v, axis_name, layout, scale)[0]


def _ring_geometry(q, axis_name, layout):
  num_shards = jax.lax.axis_size(axis_name)
  seq_len = q.shape[1] * num_shards
  me = jax.lax.axis_index(axis_name)
  q_pos = context_layout.shard_positions(me, seq_len, num_shards, layout)
  return num_shards, seq_len, me, q_pos


def _block_attention(q, kb, vb, q_pos, k_pos, scale):
  """Dense causal attention of queries at q_pos over keys at k_pos: (out, lse)."""
  num_keys = kb.shape[1]
  chunk = chunking.auto_chunk(q.shape[1], num_keys * q.shape[2], ATTN_BUDGET)
  q_pos = jnp.broadcast_to(q_pos, q.shape[:2])

  def one(start, qb, pb):
    del start
    valid = k_pos[None, None, :] <= pb[:, :, None]
    return dense_block(qb, kb, vb, valid[:, :, None, None, :], scale)

  return chunking.map_query_chunks(one, chunk, q, q_pos)


def _ring_fwd(q, k, v, axis_name, block):
  """One ring pass of the K/V blocks; block(j, kb, vb) -> (out, lse) of the
  local queries over shard j's block; merged by online softmax."""

  def visit(j, kv, carry):
    return _merge(*carry, *block(j, *kv))

  acc = jnp.zeros(q.shape[:3] + v.shape[3:], jnp.float32)
  lse = jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
  acc, lse = _ring_pass(axis_name, (k, v), (acc, lse), visit)
  return acc.astype(q.dtype), lse


def _ring_bwd(q, k, v, out, lse, g, axis_name, block):
  """The VJP of `_ring_fwd`: a second ring pass recomputes each block; the
  K/V gradients travel with their blocks and are home after C hops."""
  num_shards = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  send = _ring(axis_name, num_shards)
  g32 = g.astype(jnp.float32)
  delta = jnp.sum(g32 * out.astype(jnp.float32), axis=-1)

  def step(s, carry):
    kb, vb, dkb, dvb, dq = carry
    j = (me - s) % num_shards
    (out_b, lse_b), pull = jax.vjp(
      lambda q_, k_, v_: block(j, k_, v_, q_), q, kb, vb
    )
    # out = sum_b w_b out_b with w_b = exp(lse_b - lse), so
    # d out_b = w_b g and d lse_b = w_b (g . out_b - g . out).
    w = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - lse), 0.0)
    d_out = (w[..., None] * g32).astype(out_b.dtype)
    d_lse = w * (jnp.sum(g32 * out_b.astype(jnp.float32), -1) - delta)
    dq_b, dk_b, dv_b = pull((d_out, d_lse))
    dq = dq + dq_b.astype(jnp.float32)
    dkb = dkb + dk_b.astype(jnp.float32)
    dvb = dvb + dv_b.astype(jnp.float32)
    kb, vb, dkb, dvb = send((kb, vb, dkb, dvb))
    return kb, vb, dkb, dvb, dq

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
  carry = (k, v, zeros(k), zeros(v), zeros(q))
  _, _, dk, dv, dq = jax.lax.fori_loop(0, num_shards, step, carry)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _dense_block_fn(q, axis_name, layout, scale):
  num_shards, seq_len, _, q_pos = _ring_geometry(q, axis_name, layout)

  def block(j, kb, vb, q_=None):
    k_pos = context_layout.shard_positions(j, seq_len, num_shards, layout)
    return _block_attention(
      q if q_ is None else q_, kb, vb, q_pos, k_pos, scale
    )

  return block


def _ring_dense_fwd(q, k, v, axis_name, layout, scale):
  block = _dense_block_fn(q, axis_name, layout, scale)
  out, lse = _ring_fwd(q, k, v, axis_name, block)
  return out, (q, k, v, out, lse)


def _ring_dense_bwd(axis_name, layout, scale, res, g):
  q, k, v, out, lse = res
  block = _dense_block_fn(q, axis_name, layout, scale)
  return _ring_bwd(q, k, v, out, lse, g, axis_name, block)


_ring_dense.defvjp(_ring_dense_fwd, _ring_dense_bwd)


def context_dense_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  axis_name: str,
  layout: str = "zigzag",
  strategy: str = "ring",
  scale: float | None = None,
) -> jax.Array:
  """Causal `dense_attention` of this shard's queries [B, Tc, H, Dv].

  strategy "ring": ring attention (K/V blocks pass around the ring, online
  softmax, O(S/C) K/V per device, a ring-pass VJP); "all_gather": K and V
  gathered, then the dense reference with each chunk's offset.
  """
  check_strategy(strategy, DENSE_STRATEGIES)
  scale = default_scale(scale, q.shape[-1])
  if strategy == "ring":
    return _ring_dense(q, k, v, axis_name, layout, scale)
  k_full = gather_sequence(k, axis_name, layout)
  v_full = gather_sequence(v, axis_name, layout)
  q_pos = _ring_geometry(q, axis_name, layout)[3]
  k_pos = jnp.arange(k_full.shape[1], dtype=jnp.int32)
  return _block_attention(q, k_full, v_full, q_pos, k_pos, scale)[0]


def _over_local_chunks(fn, q_rows: int, q_offset, axis_name, layout):
  """concat over this shard's chunks of fn(rows, natural offset of row 0)."""
  num_shards = jax.lax.axis_size(axis_name)
  offset = jnp.asarray(q_offset, jnp.int32)
  parts = [
    fn(rows, offset + off)
    for rows, off in _local_chunks(
      q_rows * num_shards, num_shards, layout, axis_name
    )
  ]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)


def context_cached_dense_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_offset: Any,
  kv_lengths: jax.Array | None = None,
  *,
  axis_name: str,
  layout: str = "zigzag",
  scale: float | None = None,
) -> jax.Array:
  """Dense attention of a prefill chunk's sharded queries over a cache.

  The chunk's T tokens are sharded in layout order: q [B, Tc, H, D] this
  shard's rows, at natural positions q_offset (int or int32[B], where the
  chunk starts) + the layout's. k [B, V, G, D], v [B, V, G, Dv]: the cache
  view in natural order, the chunk's own rows already written, the same on
  every shard; kv_lengths int32[B] (keys at or past it are padding).
  Returns [B, Tc, H, Dv], each row equal to the unsharded cached call.
  """
  return _over_local_chunks(
    lambda rows, offset: dense_attention(
      q[:, rows],
      k,
      v,
      q_offset=offset,
      kv_lengths=kv_lengths,
      scale=scale,
    ),
    q.shape[1],
    q_offset,
    axis_name,
    layout,
  )


def context_cached_dsa_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  q_offset: Any,
  kv_lengths: jax.Array | None = None,
  *,
  top_k: int,
  axis_name: str,
  layout: str = "zigzag",
  scale: float | None = None,
  implementation: str | None = None,
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """`dsa_attention` of a prefill chunk's sharded queries over a cache:
  (o [B, Tc, H, Dv], indices int32[B, Tc, K]).

  As `context_cached_dense_attention`; q_idx [B, Tc, HI, DI] and weights
  [B, Tc, HI] are this shard's rows, k_idx [B, V, DI] the indexer key cache
  view. Each chunk of rows runs the unsharded op (kernels included) at its
  own offset, so the selection equals the unsharded one.
  """
  return _over_local_chunks(
    lambda rows, offset: dsa_attention(
      q[:, rows],
      k,
      v,
      q_idx[:, rows],
      k_idx,
      weights[:, rows],
      top_k=top_k,
      q_offset=offset,
      kv_lengths=kv_lengths,
      scale=scale,
      implementation=implementation,
      return_indices=True,
      topk_block_sizes=topk_block_sizes,
      attention_block_sizes=attention_block_sizes,
    ),
    q.shape[1],
    q_offset,
    axis_name,
    layout,
  )


def context_dense_indexer_kl(
  q: jax.Array,
  k: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  axis_name: str,
  layout: str = "zigzag",
  scale: float | None = None,
) -> jax.Array:
  """`dense_indexer_kl` over the whole sequence (same scalar on every shard).

  The main keys (stop-gradient) and the indexer keys are all-gathered; each
  local chunk is scored with its offset, and the chunk means (every query
  sees at least itself, so all chunks count the same) are averaged over
  the context axis.
  """
  num_shards = jax.lax.axis_size(axis_name)
  k_full = gather_sequence(jax.lax.stop_gradient(k), axis_name, layout)
  keys = gather_sequence(k_idx, axis_name, layout)
  parts = [
    losses.dense_indexer_kl(
      q[:, rows],
      k_full,
      q_idx[:, rows],
      keys,
      weights[:, rows],
      q_offset=offset,
      scale=scale,
    )
    for rows, offset in _local_chunks(
      keys.shape[1], num_shards, layout, axis_name
    )
  ]
  return jax.lax.pmean(sum(parts) / len(parts), axis_name)


def _slot_logits(q, k, indices, axis_name, layout, scale):
  """f32[B, Tc, G, H/G, K]: the main logits of each query's selected slots,
  from one ring pass of the (stop-gradient) key blocks; invalid slots 0."""
  num_shards = jax.lax.axis_size(axis_name)
  seq_len = k.shape[1] * num_shards
  valid, owner, row = _fetch_plan(indices, seq_len, num_shards, layout)
  num_kv, k_sel = k.shape[2], indices.shape[2]
  scale = default_scale(scale, q.shape[-1])
  chunk = chunking.auto_chunk(
    q.shape[1], k_sel * (num_kv * k.shape[3] + q.shape[2]), ATTN_BUDGET
  )

  def visit(j, kb, out):
    take = valid & (owner == j)

    def one(start, qb, rb, tb, ob):
      del start
      logits = jnp.einsum(
        "btgrd,btkgd->btgrk",
        group_heads(qb, num_kv),
        gather_rows(kb, rb),
        preferred_element_type=jnp.float32,
      )
      return jnp.where(tb[:, :, None, None, :], logits * scale, ob)

    return chunking.map_query_chunks(
      one, chunk, q, jnp.where(take, row, 0), take, out
    )

  group = q.shape[2] // num_kv
  out = jnp.zeros(q.shape[:2] + (num_kv, group, k_sel), jnp.float32)
  return _ring_pass(axis_name, k, out, visit)


def context_sparse_indexer_kl(
  q: jax.Array,
  k: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  indices: jax.Array,
  *,
  axis_name: str,
  layout: str = "zigzag",
  strategy: str = "fetch",
  scale: float | None = None,
) -> jax.Array:
  """`sparse_indexer_kl` over the whole sequence (same scalar on every shard).

  The selected main-key rows come by `strategy` (stop-gradient); the
  indexer keys are all-gathered (their gradient returns by the all-gather's
  transpose). The local mean is weighted by its query count across shards.
  """
  check_strategy(strategy)
  num_shards = jax.lax.axis_size(axis_name)
  seq_len = k.shape[1] * num_shards
  keys = gather_sequence(k_idx, axis_name, layout)
  k = jax.lax.stop_gradient(k)
  valid = (indices >= 0) & (indices < seq_len)
  if strategy == "all_gather":
    local = losses.sparse_indexer_kl(
      q,
      gather_sequence(k, axis_name, layout),
      q_idx,
      keys,
      weights,
      indices,
      scale=scale,
    )
  else:
    logits = _slot_logits(
      jax.lax.stop_gradient(q), k, indices, axis_name, layout, scale
    )
    acc = jnp.promote_types(q_idx.dtype, jnp.float32)

    # Query chunks, rematerialised in the backward pass: the gathered
    # indexer keys [B, Tc, K, DI] are never held whole.
    @jax.checkpoint
    def one(start, qib, wb, ib, tb, lb):
      del start
      kig = gather_rows(keys, jnp.where(tb, ib, 0))  # [B, c, K, DI]
      dots = jnp.einsum("bthd,btkd->bthk", qib, kig, preferred_element_type=acc)
      index_logits = jnp.einsum(
        "bthk,bth->btk", jax.nn.relu(dots), wb.astype(acc)
      )
      kl, has_keys = losses.slot_kl(lb, index_logits, tb)
      return jnp.where(has_keys, kl, 0.0), has_keys

    k_sel = indices.shape[2]
    per_query = k_sel * (keys.shape[-1] + q_idx.shape[2] + q.shape[2])
    chunk = chunking.auto_chunk(q.shape[1], per_query, ATTN_BUDGET)
    kl, has_keys = chunking.map_query_chunks(
      one, chunk, q_idx, weights, indices, valid, logits
    )
    local = jnp.sum(kl) / jnp.maximum(jnp.sum(has_keys), 1)
  count = jnp.sum(jnp.any(valid, axis=-1)).astype(jnp.float32)
  total = jnp.asarray(
    jax.lax.psum(jnp.stack([local * count, count]), axis_name)
  )
  return total[0] / jnp.maximum(total[1], 1.0)
