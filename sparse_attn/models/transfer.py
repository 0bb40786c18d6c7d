"""Parameters carried from one model to another (dense -> another kind).

A model of another attention kind with the same dimensions shares every
parameter of a dense one (embeddings, projections, MLPs, norms) at the same
path and shape; what only the new kind has (the lightning indexer, NSA's
gates, ...) keeps its initial value. A parameter the new kind holds several
copies of (NSA's per-branch K/V, declared by its `AttentionKind.dense_copies`)
starts as copies of the dense one. Used by `training.init_from` /
`training.train(init_params=)` and `hf.retrofit_from`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Transfer(NamedTuple):
  """The result of `transfer_params`."""

  params: Any  # dst, with src's leaves where path/shape/dtype agree
  copied: tuple[str, ...]  # paths (jax keystr) of the leaves taken from src
  kept: tuple[str, ...]  # paths of dst's leaves that keep their value
  repeated: tuple[str, ...] = ()  # copied paths filled with src repeated


def _repeat_axis(src_shape, dst_shape) -> int | None:
  """The one axis along which dst_shape is src_shape times r >= 2."""
  if len(src_shape) != len(dst_shape):
    return None
  diff = [i for i, (a, b) in enumerate(zip(src_shape, dst_shape)) if a != b]
  if len(diff) != 1:
    return None
  a, b = src_shape[diff[0]], dst_shape[diff[0]]
  return diff[0] if a and b % a == 0 and b > a else None


def _named(path, names: frozenset[str]) -> bool:
  return any(getattr(k, "key", None) in names for k in path)


def transfer_params(src, dst, *, repeat: Iterable[str] = ()) -> Transfer:
  """dst's leaves replaced by src's where the path, shape and dtype agree.

  src, dst: pytrees of arrays (e.g. the nnx.State of a parameter group).
  repeat: parameter names (a path component, e.g. "wk") whose dst leaf may
    hold r copies of src's along one axis: each entry of src repeated r
    times in a row (NSA's [E, 3G, D] K/V, group-major, from a dense
    [E, G, D]); opt-in, so that a changed size elsewhere (more heads, a
    wider MLP) is reported as kept, never silently filled.
  Copied leaves are fresh arrays placed with the sharding of the leaf they
  replace, so src stays valid when the result is donated to a train step.
  """
  names = frozenset(repeat)
  flat_src = {
    jax.tree_util.keystr(p): x
    for p, x in jax.tree_util.tree_flatten_with_path(src)[0]
  }
  copied, kept, repeated = [], [], []

  def pick(path, leaf):
    name = jax.tree_util.keystr(path)
    x = flat_src.get(name)
    if x is not None and x.dtype == leaf.dtype:
      if x.shape == leaf.shape:
        copied.append(name)
        return jax.device_put(jnp.copy(x), leaf.sharding)
      axis = _repeat_axis(x.shape, leaf.shape)
      if axis is not None and _named(path, names):
        r = leaf.shape[axis] // x.shape[axis]
        copied.append(name)
        repeated.append(name)
        return jax.device_put(jnp.repeat(x, r, axis=axis), leaf.sharding)
    kept.append(name)
    return leaf

  params = jax.tree_util.tree_map_with_path(pick, dst)
  return Transfer(params, tuple(copied), tuple(kept), tuple(repeated))
