"""Parameters carried from one model to another (dense -> DSA conversion).

This is how a dense model becomes a DSA (or any other kind of) model: a new
model of the same dimensions shares every parameter of the dense one
(embeddings, projections, MLPs, norms) at the same path and shape; what only
the new kind has (the lightning indexer, NSA's gates, ...) is absent from the
dense checkpoint and keeps its initial value; a parameter the new kind has
several copies of (NSA's per-branch K/V) starts as copies of the dense one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Transfer(NamedTuple):
  """The result of `transfer_params`."""

  params: Any  # dst, with src's leaves where path/shape/dtype agree
  copied: tuple[str, ...]  # paths (jax keystr) of the leaves taken from src
  kept: tuple[str, ...]  # paths of dst's leaves that keep their value
  tiled: tuple[str, ...] = ()  # copied paths that src's leaf fills r times


def _tile_axis(src_shape, dst_shape) -> int | None:
  """The one axis along which dst_shape is src_shape repeated r >= 2 times."""
  if len(src_shape) != len(dst_shape):
    return None
  diff = [i for i, (a, b) in enumerate(zip(src_shape, dst_shape)) if a != b]
  if len(diff) != 1:
    return None
  a, b = src_shape[diff[0]], dst_shape[diff[0]]
  return diff[0] if a and b % a == 0 else None


def transfer_params(src, dst) -> Transfer:
  """dst's leaves replaced by src's where the path, shape and dtype agree.

  src, dst: pytrees of arrays (e.g. the nnx.State of a parameter group).
  A dst leaf that is src's repeated r times along one axis is src tiled
  (e.g. NSA's per-branch K/V projections [E, 3G, D] each start as the dense
  [E, G, D] one). Copied leaves are fresh arrays placed with the sharding of
  the leaf they replace, so src stays valid when the result is donated to a
  train step.
  """
  flat_src = {
    jax.tree_util.keystr(p): x
    for p, x in jax.tree_util.tree_flatten_with_path(src)[0]
  }
  copied, kept, tiled = [], [], []

  def pick(path, leaf):
    name = jax.tree_util.keystr(path)
    x = flat_src.get(name)
    if x is not None and x.dtype == leaf.dtype:
      if x.shape == leaf.shape:
        copied.append(name)
        return jax.device_put(jnp.copy(x), leaf.sharding)
      axis = _tile_axis(x.shape, leaf.shape)
      if axis is not None:
        reps = [1] * x.ndim
        reps[axis] = leaf.shape[axis] // x.shape[axis]
        copied.append(name)
        tiled.append(name)
        return jax.device_put(jnp.tile(x, reps), leaf.sharding)
    kept.append(name)
    return leaf

  params = jax.tree_util.tree_map_with_path(pick, dst)
  return Transfer(params, tuple(copied), tuple(kept), tuple(tiled))


def init_from(state, src_params, group: str = "main") -> tuple[Any, Transfer]:
  """A training state whose `group` parameters are taken from src_params.

  state: a training state (`init_state`); src_params: the same group of
  another model's state (e.g. dense_state["params"]["main"]). The optimiser
  state is left as it is (fresh). Returns (new state, the Transfer).
  """
  t = transfer_params(src_params, state["params"][group])
  new_params = dict(state["params"], **{group: t.params})
  return dict(state, params=new_params), t
