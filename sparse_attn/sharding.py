"""Device mesh, logical-axis rules, and shardings for parameters and batches.

The mesh always has four axes, MESH_AXES = ("data", "fsdp", "tensor",
"context"):
  - the batch is split over data x fsdp;
  - with context > 1 the sequence is split over context (context
    parallelism: tokens and activations in the zigzag layout of
    `sparse_attn.ops.context_layout`, attention through
    `sparse_attn.ops.context_parallel`); parameters never are;
  - parameters are split over fsdp (their "embed" dimension, ZeRO-3 style)
    and tensor (heads / kv_heads / mlp / vocab / indexer_heads / experts;
    an expert's hidden dim when the experts do not divide);
  - everything else (norm scales, optimiser counters, the step, the RNG) is
    replicated.
Parameters name their dimensions in `logical_axes` metadata (see
`sparse_attn.nn.params.param`); LOGICAL_RULES maps those names to mesh axes.
A dimension whose size is not divisible by its mesh axes, or whose mesh axis
is already used by another dimension of the same array, stays replicated,
so every rule set works for every model size (e.g. MQA with tensor=2).

`jax.jit(..., in_shardings=..., out_shardings=...)` then partitions the step
(the modern form of pjit). Pallas kernels cannot be auto-partitioned: the
public attention functions route their kernel calls through
`sparse_attn.ops.kernel_sharding.call_kernel_sharded`, which applies
shard_map whenever a mesh is set with `jax.set_mesh` (the training loop sets
it when the kernels are in use; the XLA path needs no wrapper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("indexer_heads", "tensor"),
  ("experts", "tensor"),
  ("expert_mlp", "tensor"),
  ("head_dim", None),
  ("indexer_dim", None),
  ("q_latent", None),
  ("kv_latent", None),
  ("length", None),
)


def make_mesh(
  mesh_shape: Sequence[int] | None = None,
  # jax.Device is re-exported from a compiled module pyright cannot read.
  devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
) -> Mesh:
  """Mesh over `devices` (default: all) with axes (data, fsdp, tensor, context).

  mesh_shape: 4 ints, or 3 (data, fsdp, tensor; context 1). None means
  (len(devices), 1, 1, 1): pure data parallelism.
  Devices are laid out in jax.devices() order, so in a multi-host run each
  process's devices are contiguous along the leading (data) axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh_shape = full_mesh_shape(mesh_shape, len(devices))
  if math.prod(mesh_shape) != len(devices):
    raise ValueError(
      f"mesh_shape {mesh_shape} needs {math.prod(mesh_shape)} "
      f"devices, but {len(devices)} are available."
    )
  return Mesh(np.asarray(devices, dtype=object).reshape(mesh_shape), MESH_AXES)


def full_mesh_shape(
  mesh_shape: Sequence[int] | None, num_devices: int
) -> tuple[int, int, int, int]:
  """mesh_shape as 4 ints (data, fsdp, tensor, context); 3 ints get context 1."""
  if mesh_shape is None:
    return (num_devices, 1, 1, 1)
  shape = tuple(int(x) for x in mesh_shape)
  if len(shape) not in (3, 4) or min(shape) < 1:
    raise ValueError(
      f"mesh_shape must be 3 or 4 positive ints {MESH_AXES} (context "
      f"defaults to 1), got {tuple(mesh_shape)}."
    )
  d, f, t, *c = shape
  return (d, f, t, c[0] if c else 1)


def context_size(mesh) -> int:
  """Size of the mesh's context axis (1 when it has none)."""
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(CONTEXT_AXIS, 1)


def _as_tuple(x) -> tuple[str, ...]:
  if x is None:
    return ()
  return (x,) if isinstance(x, str) else tuple(x)


def logical_to_spec(
  logical_axes: Sequence[str | None] | None,
  shape: Sequence[int],
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]] = LOGICAL_RULES,
) -> P:
  """PartitionSpec for an array with these logical axis names and shape."""
  if logical_axes is None:
    return P()
  if len(logical_axes) != len(shape):
    raise ValueError(
      f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}."
    )
  table: dict[str | None, Any] = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    mesh_axes = tuple(
      a
      for a in _as_tuple(table.get(name))
      if a not in used and mesh.shape[a] > 1
    )
    n = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or size % n:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(
  tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
) -> Any:
  """NamedSharding for every array leaf of `tree` (same structure).

  Leaves inside an nnx.Variable with `logical_axes` metadata (parameters and
  optimiser moments built from them) follow the rules; everything else is
  replicated. `tree` may hold arrays or jax.ShapeDtypeStruct.
  """
  replicated = NamedSharding(mesh, P())

  def one(x):
    if _is_variable(x):
      axes = x.get_metadata().get("logical_axes")
      value = x.get_value() if hasattr(x, "get_value") else x.value
      sh = NamedSharding(
        mesh, logical_to_spec(axes, np.shape(value), mesh, rules)
      )
      return jax.tree.map(lambda _: sh, x)
    return replicated

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_rows(
  sharding: NamedSharding, global_batch: int
) -> tuple[int, int]:
  """(shard_index, num_shards): which contiguous rows this process loads.

  A process holds the union of its devices' row blocks; data loading then
  reads only those rows (`Dataset.batch(..., shard_index=, num_shards=)`)
  and `make_global_batch` assembles the global array.
  """
  rows = set()
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  for idx in index_map.values():
    # Typed Optional by JAX, but a NamedSharding indexes every device.
    assert idx is not None
    sl = idx[0]
    rows.update(range(*sl.indices(global_batch)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo or global_batch % (hi - lo) or lo % (hi - lo):
    raise ValueError(
      f"this process's batch rows {sorted(rows)} are not one "
      f"aligned contiguous block of {global_batch}."
    )
  return lo // (hi - lo), global_batch // (hi - lo)


def make_global_batch(
  local: Any, sharding: NamedSharding, global_batch: int
) -> Any:
  """Process-local numpy rows -> global jax.Arrays sharded by `sharding`."""

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
      sharding, x, (global_batch,) + x.shape[1:]
    )

  return jax.tree.map(one, local)


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated (possibly multi-process) array -> numpy, from local data."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)
