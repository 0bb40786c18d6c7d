"""Parameter creation with logical axis names.

Every parameter carries `logical_axes` metadata (one name per dimension:
embed, heads, kv_heads, head_dim, mlp, vocab, indexer_heads, indexer_dim, ...)
that `sparse_attn.sharding` maps to mesh axes. The names are plain metadata,
so creating a model needs no mesh.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, axes, dtype=jnp.float32, init=None):
  """nnx.Param initialised with `init` (default lecun_normal), tagged with axes."""
  init = init or nnx.initializers.lecun_normal()
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match parameter shape {shape}.")
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def tag(module: nnx.Module, axes_by_name: dict[str, tuple[str, ...]]) -> None:
  """Sets logical_axes on params of a library module (e.g. nnx.LayerNorm)."""
  for name, axes in axes_by_name.items():
    getattr(module, name).set_metadata("logical_axes", tuple(axes))
