"""The model-level decoding cache: each layer's own cache + sequence lengths.

    cache = model.init_cache(batch_size, max_len, index_dtype="bfloat16")
    logits, aux, cache = model(tokens, cache=cache, num_valid=num_valid)

`Cache.layers[i]` is attention layer i's cache, whose layout is that layer's
business (`AttentionLayer.init_cache`; every leaf is [B, ...], the first
[B, S_max, ...]).
`Cache.lengths` int32[B] counts the tokens each row holds. `max_length` is a
host-side (static) upper bound of the lengths that `sparse_attn.inference`
keeps to refuse an overflowing write before it is launched; jitted code
passes the arrays and rebuilds the Cache inside.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from sparse_attn import sharding as shd


@struct.dataclass
class Cache:
  """Per-layer caches + lengths int32[B] (+ a host-side bound, static)."""

  layers: tuple[Any, ...]
  lengths: jax.Array
  max_length: int = struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    """S_max: tokens each sequence can hold (axis 1 of a layer cache's
    first leaf)."""
    return int(jax.tree.leaves(self.layers[0])[0].shape[1])

  @property
  def batch_size(self) -> int:
    return int(self.lengths.shape[0])


def cache_shardings(cache: Cache, mesh: Mesh, rules=shd.LOGICAL_RULES) -> Cache:
  """NamedShardings (same structure as `cache`) sharding it like activations.

  Batch over the mesh's batch axes (data x fsdp), kv heads over "tensor",
  everything else replicated; a dimension that does not divide its mesh
  axes stays replicated (`sharding.logical_to_spec`). Works on arrays or
  ShapeDtypeStructs.
  """

  def layer(lc: Any) -> Any:
    axes = getattr(type(lc), "axes", None)
    if axes is None:
      raise ValueError(
        f"cache type {type(lc).__name__} names no logical axes "
        f"(give it an `axes` class attribute)."
      )
    out = {}
    for name, names in axes.items():
      x = getattr(lc, name)
      out[name] = (
        None
        if x is None
        else NamedSharding(
          mesh, shd.logical_to_spec(names, x.shape, mesh, rules)
        )
      )
    return lc.replace(**out)

  lengths = NamedSharding(
    mesh, shd.logical_to_spec(("batch",), cache.lengths.shape, mesh, rules)
  )
  return Cache(
    layers=tuple(layer(lc) for lc in cache.layers),
    # A pytree of shardings: the Cache structure with NamedSharding leaves.
    lengths=lengths,  # pyright: ignore[reportArgumentType]
    max_length=cache.max_length,
  )
