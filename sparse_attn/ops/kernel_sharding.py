"""Pallas kernel calls under a mesh: shard_map over the axes a kernel allows.

pallas_call cannot be partitioned by XLA. Under a mesh context
(`jax.set_mesh`), the public attention functions run their kernels through
`call_kernel_sharded`, which wraps the call in shard_map; without a mesh the
kernel is called as is.

Each dim of each operand has a *role*: "batch" (rows computed independently),
"heads" (heads computed independently) or None (kept whole). `plan_axes`
gives every role a tuple of mesh axes whose product divides every dim with
that role, so all operands are split consistently:

* "batch" prefers data, then fsdp; "heads" prefers tensor (where the model
  already has them).
* Axes left over (a preferred axis that does not divide, or one no role
  prefers) go to the first role they divide ("batch", then "heads").
* Anything still left over replicates: every device of that axis runs the
  same shard.

Heads: callers give "heads" to q's head dim *and* to k/v's kv-head dim.
Since the common split divides G and query heads are grouped g-major
(head h reads kv group h // (H/G)), each shard holds whole kv groups with
exactly their query heads; when G does not divide by an axis (MQA, G=3 on a
4-way tensor axis) heads stay whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sparse_attn import dispatch

ROLES = ("batch", "heads")
# Mesh axes each role tries first (sparse_attn.sharding puts batch over
# data x fsdp and heads over tensor, so these splits need no resharding).
PREFERRED_AXES = {"batch": ("data", "fsdp"), "heads": ("tensor",)}

Plan = Mapping[str, tuple[str, ...]]


def _free_axes(mesh) -> dict[str, int]:
  """Mesh axes of size > 1 that are not already manual (outer shard_map)."""
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return {
    a: s
    for a, s in zip(mesh.axis_names, mesh.axis_sizes)
    if s > 1 and a not in manual
  }


def plan_axes(
  mesh, role_dims: Mapping[str, Sequence[int]]
) -> dict[str, tuple[str, ...]]:
  """Mesh axes for each role: {role: (axis, ...)}, see the module docstring.

  Args:
    mesh: a Mesh or AbstractMesh.
    role_dims: role -> the sizes of every operand dim having that role.
  """
  unknown = set(role_dims) - set(ROLES)
  if unknown:
    raise ValueError(
      f"role_dims: unknown roles {sorted(unknown)}; known: {ROLES}."
    )
  sizes = _free_axes(mesh)
  plan: dict[str, tuple[str, ...]] = {role: () for role in role_dims}
  used = set()

  def take(role, axis):
    if axis not in sizes or axis in used or role not in plan:
      return False
    split = math.prod(sizes[a] for a in plan[role]) * sizes[axis]
    if any(d % split for d in role_dims[role]):
      return False
    plan[role] += (axis,)
    used.add(axis)
    return True

  for role in ROLES:
    for axis in PREFERRED_AXES[role]:
      take(role, axis)
  for axis in mesh.axis_names:
    for role in ROLES:
      if take(role, axis):
        break
  return plan


def kernel_spec(plan: Plan, roles: Sequence[str | None]) -> P:
  """PartitionSpec of an operand whose dims have these roles under `plan`."""
  spec = []
  for role in roles:
    if role is not None and role not in ROLES:
      raise ValueError(f"roles: unknown role {role!r}; known: {ROLES} or None.")
    axes = plan.get(role, ()) if role is not None else ()
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def call_kernel_sharded(
  fn,
  args: Sequence[Any],
  roles: Sequence[Sequence[str | None] | None],
  out_roles: Sequence[str | None],
  *,
  check_vma: bool | None = None,
):
  """Runs fn(*args) per shard when a mesh is set (`jax.set_mesh`), else as is.

  Args:
    fn: the kernel call; it must compute each shard from its shard of the
      operands alone (true for the roles of the module docstring).
    args: its positional operands.
    roles: per operand, the role of each dim, or None for an operand passed
      as is (None, a Python int): it is closed over, not sharded.
    out_roles: the role of each dim of the (single array) output.
    check_vma: shard_map's varying-axes check. None: on for native kernels
      (the kernels type their outputs with `kernels_pallas.backend.out_struct`),
      off where they run in the Pallas interpreter, which slices varying
      operands with unvarying grid indices and trips the checker (jax 0.10).

  Gradients: with check_vma off, shard_map's transpose divides the output
  cotangent by the size of each axis the output is replicated over and sums
  the input cotangents over the axes the inputs are replicated over. That is
  right here because inputs and output are replicated over the same axes
  (every device of such an axis computes the same shard); the tests check
  it numerically on every 8-device mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not _free_axes(mesh):
    return fn(*args)
  if len(roles) != len(args):
    raise ValueError(f"roles has {len(roles)} entries for {len(args)} args.")
  # Keyed by position in args: per_shard puts each shard back in its place.
  dynamic: dict[int, Sequence[str | None]] = {
    i: r for i, r in enumerate(roles) if r is not None and args[i] is not None
  }
  role_dims: dict[str, list[int]] = {}
  for i, arg_roles in dynamic.items():
    shape = np.shape(args[i])
    if len(arg_roles) != len(shape):
      raise ValueError(
        f"roles[{i}] = {tuple(arg_roles)} does not match the rank of "
        f"args[{i}], shape {shape}."
      )
    for dim, role in zip(shape, arg_roles):
      if role is not None:
        role_dims.setdefault(role, []).append(dim)
  plan = plan_axes(mesh, role_dims)
  specs = tuple(kernel_spec(plan, r) for r in dynamic.values())
  out_spec = kernel_spec(plan, out_roles)

  def per_shard(*shards):
    full = list(args)
    for i, x in zip(dynamic, shards):
      full[i] = x
    return fn(*full)

  if check_vma is None:
    check_vma = not dispatch.kernel_interprets()
  kwargs = {}
  if getattr(mesh, "manual_axes", None):  # inside an outer shard_map
    kwargs["axis_names"] = frozenset(_free_axes(mesh))
  return jax.shard_map(
    per_shard,
    mesh=mesh,
    in_specs=specs,
    out_specs=out_spec,
    check_vma=check_vma,
    **kwargs,
  )(*[args[i] for i in dynamic])
