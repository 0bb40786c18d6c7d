"""Context parallelism for the layers: the sequence sharded over a mesh axis.

A `ContextParallel` says which mesh axis splits the sequence, in which
layout (`sparse_attn.ops.context_layout`), and how sparse and dense
attention cross the shards (`sparse_attn.ops.context_parallel`). Layers that
support it (dense, DSA, MLA, DSA on MLA) take it as `context_parallel=` and
run their attention inside a shard_map that is manual over that axis only:
the batch and head axes stay under XLA's automatic partitioning, so the
same layer code runs on any (data, fsdp, tensor, context) mesh.

Tokens, positions and every activation are [B, S, ...] arrays in layout
order, sharded P(batch, context); the projections, norms, MLPs and the loss
are position-wise, so only attention needs to know. `layout_batch` puts a
natural-order batch into that order (the loss is a mean over tokens, so it
is unchanged); `layout_positions` gives the positions RoPE and causality
use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_attn import sharding as shd
from sparse_attn.ops import context_layout
from sparse_attn.ops import context_parallel as cp_ops


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """The sequence split over `mesh`'s `axis_name` (C shards).

  layout: "zigzag" (causal load balance: shard i holds chunks i and
  2C-1-i) or "contiguous". strategy: how sparse attention and the sparse
  KL read the selected K/V rows, "fetch" (K/V stay sharded, O(S/C) per
  device) or "all_gather" (O(S)). dense_strategy: "ring" (ring attention)
  or "all_gather", for dense attention and the warm-up stage.
  """

  mesh: Any  # jax.sharding.Mesh (or AbstractMesh, for lowering)
  axis_name: str = shd.CONTEXT_AXIS
  layout: str = "zigzag"
  strategy: str = "fetch"
  dense_strategy: str = "ring"

  def __post_init__(self):
    context_layout.check_layout(self.layout)
    cp_ops.check_strategy(self.strategy)
    cp_ops.check_strategy(self.dense_strategy, cp_ops.DENSE_STRATEGIES)
    if self.axis_name not in self.mesh.axis_names:
      raise ValueError(
        f"axis_name {self.axis_name!r} is not an axis of the mesh "
        f"{tuple(self.mesh.axis_names)}."
      )

  @property
  def size(self) -> int:
    """C, the number of context shards."""
    return dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))[self.axis_name]

  def check_length(self, name: str, length: int) -> None:
    """ValueError unless a sequence of `length` splits into this layout."""
    try:
      context_layout.chunk_length(length, self.size, self.layout)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None

  # -- the batch ---------------------------------------------------------------

  def sequence_sharding(self) -> NamedSharding:
    """[B, S, ...] arrays: rows over data x fsdp, the sequence over C."""
    return NamedSharding(self.mesh, P(shd.BATCH_AXES, self.axis_name))

  def layout_positions(self, batch: int, length: int) -> jax.Array:
    """int32[B, S]: the natural position of each row of the layout."""
    order = context_layout.layout_order(length, self.size, self.layout)
    return jnp.broadcast_to(jnp.asarray(order, jnp.int32), (batch, length))

  def layout_batch(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Every [B, S] entry of `batch` in layout order, sequence-sharded, plus
    "positions" (the natural position of each row). Inside jit."""
    out = {}
    for name, x in batch.items():
      self.check_length(f"batch[{name!r}] of shape {x.shape}", x.shape[1])
      x = context_layout.to_layout(x, self.size, self.layout)
      out[name] = jax.lax.with_sharding_constraint(x, self.sequence_sharding())
    b, s = next(iter(batch.values())).shape[:2]
    out["positions"] = jax.lax.with_sharding_constraint(
      self.layout_positions(b, s), self.sequence_sharding()
    )
    return out

  def to_natural(self, tree: Any) -> Any:
    """Every [B, T, ...] leaf from layout order to natural order (the rows a
    cache stores). Inside jit: XLA moves the rows between shards."""
    return jax.tree.map(
      lambda x: context_layout.from_layout(x, self.size, self.layout), tree
    )

  def layout_rows(self, natural: jax.Array, length: int) -> jax.Array:
    """The layout row holding each natural position in [0, length)."""
    order = context_layout.layout_order(length, self.size, self.layout)
    inverse = jnp.asarray(np.argsort(order), jnp.int32)
    return inverse[natural]

  # -- attention ----------------------------------------------------------------

  def _map(self, fn, num_inputs: int, out_specs, num_replicated: int = 0):
    """jit(shard_map) manual over the context axis: the first num_inputs
    arguments are sequence-sharded, the next num_replicated the same on
    every context shard (a cache view, offsets)."""
    seq = P(None, self.axis_name)
    # jit: eager shard_map with automatic axes left is not supported.
    return jax.jit(
      jax.shard_map(
        fn,
        mesh=self.mesh,
        in_specs=(seq,) * num_inputs + (P(),) * num_replicated,
        out_specs=out_specs,
        axis_names={self.axis_name},
        check_vma=False,
      )
    )

  def _cached(self, q, q_offset, kv_lengths):
    """Checks of a cached call; (q_offset, kv_lengths) as int32[B]."""
    self.check_length(f"q of shape {q.shape}", q.shape[1])
    b = q.shape[0]
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    if kv_lengths is None:
      kv_lengths = q_offset + q.shape[1]
    return q_offset, jnp.asarray(kv_lengths, jnp.int32)

  def dense_attention(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    q_offset: Any = None,
    kv_lengths: jax.Array | None = None,
  ) -> jax.Array:
    """Causal dense attention of sequence-sharded q [B, S, H, D], k
    [B, S, G, D], v [B, S, G, Dv] -> [B, S, H, Dv] (layout order).

    With q_offset (int32[B], a prefill chunk into a cache): q [B, T, H, D]
    is the chunk in layout order, sharded; k [B, V, G, D] and v the cache
    view in natural order (the chunk's rows written), read whole on every
    shard; kv_lengths int32[B] (default q_offset + T).
    """
    if q_offset is not None:
      q_offset, kv_lengths = self._cached(q, q_offset, kv_lengths)
      cached = lambda q, k, v, off, kvl: cp_ops.context_cached_dense_attention(
        q,
        k,
        v,
        off,
        kvl,
        axis_name=self.axis_name,
        layout=self.layout,
        scale=scale,
      )
      return self._map(cached, 1, P(None, self.axis_name), num_replicated=4)(
        q, k, v, q_offset, kv_lengths
      )
    self.check_length(f"q of shape {q.shape}", q.shape[1])
    fn = lambda q, k, v: cp_ops.context_dense_attention(
      q,
      k,
      v,
      axis_name=self.axis_name,
      layout=self.layout,
      strategy=self.dense_strategy,
      scale=scale,
    )
    return self._map(fn, 3, P(None, self.axis_name))(q, k, v)

  def indexed_attention(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_idx: jax.Array,
    k_idx: jax.Array,
    weights: jax.Array,
    *,
    mode: str,
    top_k: int,
    scale: float | None = None,
    implementation: str | None = None,
    topk_block_sizes: Any = None,
    attention_block_sizes: Any = None,
    q_offset: Any = None,
    kv_lengths: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """DSA's stage `mode` with the sequence sharded: (o, indices, kl).

    "sparse": context top-k + sparse attention + the sparse KL (indices
    int32[B, S, K], natural key positions); "warmup": dense attention + the
    dense KL (indices None); "dense": dense attention (indices and kl None).
    Shapes as `sparse_attn.nn.dsa.indexed_attention`, all in layout order.

    With q_offset (a prefill chunk into a cache, see `dense_attention`):
    k, v and k_idx are the cache views (natural order, read whole on every
    shard), no loss (kl None, as when decoding without context
    parallelism); "warmup" and "dense" attend densely.
    """
    seq = P(None, self.axis_name)
    if q_offset is not None:
      if mode != "sparse":
        o = self.dense_attention(
          q, k, v, scale=scale, q_offset=q_offset, kv_lengths=kv_lengths
        )
        return o, None, None
      q_offset, kv_lengths = self._cached(q, q_offset, kv_lengths)

      def cached(q, qi, w, k, v, ki, off, kvl):
        return cp_ops.context_cached_dsa_attention(
          q,
          k,
          v,
          qi,
          ki,
          w,
          off,
          kvl,
          top_k=top_k,
          axis_name=self.axis_name,
          layout=self.layout,
          scale=scale,
          implementation=implementation,
          topk_block_sizes=topk_block_sizes,
          attention_block_sizes=attention_block_sizes,
        )

      o, idx = self._map(cached, 3, (seq, seq), num_replicated=5)(
        q, q_idx, weights, k, v, k_idx, q_offset, kv_lengths
      )
      return o, idx, None
    self.check_length(f"q of shape {q.shape}", q.shape[1])
    kw: dict[str, Any] = dict(
      axis_name=self.axis_name, layout=self.layout, scale=scale
    )
    if mode == "sparse":

      def sparse(q, k, v, qi, ki, w):
        o, idx = cp_ops.context_dsa_attention(
          q,
          k,
          v,
          qi,
          ki,
          w,
          top_k=top_k,
          strategy=self.strategy,
          implementation=implementation,
          return_indices=True,
          topk_block_sizes=topk_block_sizes,
          attention_block_sizes=attention_block_sizes,
          **kw,
        )
        kl = cp_ops.context_sparse_indexer_kl(
          q, k, qi, ki, w, idx, strategy=self.strategy, **kw
        )
        return o, idx, kl

      o, idx, kl = self._map(sparse, 6, (seq, seq, P()))(
        q, k, v, q_idx, k_idx, weights
      )
      return o, idx, kl
    o = self.dense_attention(q, k, v, scale=scale)
    if mode != "warmup":
      return o, None, None
    fn = lambda q, k, qi, ki, w: cp_ops.context_dense_indexer_kl(
      q, k, qi, ki, w, **kw
    )
    kl = self._map(fn, 5, P())(q, k, q_idx, k_idx, weights)
    return o, None, kl
