"""Pallas kernel calls under a mesh: shard_map over the axes a kernel allows.

pallas_call cannot be partitioned by XLA. Under a mesh context
(`jax.set_mesh`), the public attention functions run their kernels through
`call_kernel_sharded`, which wraps the call in shard_map; without a mesh the
kernel is called as is.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def kernel_spec(mesh, shape: Sequence[int], roles: Sequence[str | None]) -> P:
  """PartitionSpec for a kernel operand: "batch" dims over the batch axes,
  "heads" dims over tensor, where the mesh has those axes and they divide
  the dimension; everything else unsplit."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  spec = []
  for dim, role in zip(shape, roles):
    axes = ()
    if role == "batch":
      axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    elif role == "heads":
      axes = tuple(a for a in ("tensor",) if sizes.get(a, 1) > 1)
    if axes and dim % math.prod(sizes[a] for a in axes) == 0:
      spec.append(axes if len(axes) > 1 else axes[0])
    else:
      spec.append(None)
  return P(*spec)


def call_kernel_sharded(fn, args: Sequence[Any],
                        roles: Sequence[Sequence[str | None] | None],
                        out_roles: Sequence[str | None]):
  """Runs fn(*args) per shard when a mesh is set (`jax.set_mesh`), else as is.

  Pallas calls cannot be partitioned by XLA. Under a mesh context the call
  goes through shard_map: each operand's dims are split by `roles` (see
  `kernel_spec`; None for an operand passed as is, e.g. None or a scalar),
  and the output by `out_roles`. Callers give "heads" to a head dim only
  when per-shard heads stay self-contained (kv heads and their query heads
  split together, g-major).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  dynamic = [i for i, r in enumerate(roles) if r is not None and args[i] is not None]
  specs = tuple(kernel_spec(mesh, np.shape(args[i]), roles[i]) for i in dynamic)

  def per_shard(*shards):
    full = list(args)
    for i, x in zip(dynamic, shards):
      full[i] = x
    return fn(*full)

  out_shape = jax.eval_shape(fn, *args)
  out_spec = kernel_spec(mesh, out_shape.shape, out_roles)
  # check_vma=False: the Pallas interpreter (CPU) trips the varying-axes
  # checker on its grid-index dynamic slices in jax 0.10.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=specs,
                       out_specs=out_spec, check_vma=False)(
                           *[args[i] for i in dynamic])
