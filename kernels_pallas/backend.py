"""Platform detection, interpret-mode policy and block-size helpers.

Every kernel in :mod:`kernels_pallas` has two *formulations*:

* ``"tpu"``: Mosaic TPU (BlockSpecs with (8, 128) tiling, VMEM scratch, row
  DMAs from HBM driven by indices in SMEM).
* ``"gpu"``: Pallas Triton (power-of-two blocks, pointer gathers through
  array indexing, masked loads).

``resolve(interpret, platform)`` picks the formulation and whether to run the
Pallas interpreter:

* ``platform=None`` follows ``jax.default_backend()``: GPU -> "gpu", otherwise
  "tpu" (on CPU the TPU formulation is interpreted; it is the one with the
  more restrictive semantics, so interpreting it is the more useful test).
* ``interpret=None`` means interpret on CPU (or whenever the formulation does
  not match the hardware), native otherwise.

To check lowering on a machine without accelerators pass ``interpret=False``
and ``platform="tpu"``/``"gpu"`` and export with
``jax.export.export(..., platforms=["tpu"|"cuda"])``.

The GPU path is isolated behind :func:`gpu_compiler_params` so that a later
switch from Triton to Mosaic GPU (JAX >= 0.11 deprecates the Triton backend)
only touches the ``*_gpu`` kernels and this helper.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

PLATFORMS = ("tpu", "gpu")

# 32-bit sentinel bigger than any index we deal with.
BIG_INDEX = 2**30


def detected_platform() -> str:
  """'tpu', 'gpu' or 'cpu' for the default JAX backend."""
  backend = jax.default_backend().lower()
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "cpu"


def resolve(interpret: bool | None, platform: str | None) -> tuple[str, bool]:
  """Returns (formulation, interpret)."""
  hw = detected_platform()
  if platform is None:
    platform = "gpu" if hw == "gpu" else "tpu"
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS} or None, got {platform!r}")
  if interpret is None:
    interpret = hw != platform
  return platform, bool(interpret)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
  """Pads ``x`` along ``axis`` up to ``size`` (no-op if already that size)."""
  axis = axis % x.ndim
  extra = size - x.shape[axis]
  if extra < 0:
    raise ValueError(f"cannot pad axis {axis} of shape {x.shape} down to {size}")
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def check_tpu_block(name: str, block: int, full: int, multiple: int) -> None:
  """TPU rule: a block dim must be a multiple of ``multiple`` or the full dim."""
  if block != full and block % multiple:
    raise ValueError(
        f"{name}={block} must be a multiple of {multiple} or equal the full "
        f"dimension {full} (Mosaic TPU (8, 128) tiling rule)")


def tpu_compiler_params(dimension_semantics: tuple[str, ...], **kw):
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=dimension_semantics, **kw)


def gpu_compiler_params(num_warps: int = 4, num_stages: int = 2):
  """Triton compiler params (the only GPU backend used here)."""
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def gpu_masked_load(ref, *, mask, other):
  """Masked load on the Triton backend (``ref`` already indexed with .at)."""
  from jax.experimental.pallas import triton as plgpu
  return plgpu.load(ref, mask=mask, other=other)


def smem():
  from jax.experimental.pallas import tpu as pltpu
  return getattr(pltpu, "SMEM", None) or pltpu.MemorySpace.SMEM


def any_memory_space():
  return getattr(pl, "ANY", None) or pl.MemorySpace.ANY


def normalize_positions(name_off, q_offset, kv_lengths, B: int, T: int, S: int):
  """Returns (q_offset int32[B], kv_lengths int32[B]) with validation."""
  if q_offset is None:
    q_off = jnp.full((B,), S - T, jnp.int32)
  elif isinstance(q_offset, int):
    q_off = jnp.full((B,), q_offset, jnp.int32)
  else:
    q_offset = jnp.asarray(q_offset)
    if q_offset.ndim == 0:
      q_off = jnp.full((B,), q_offset, jnp.int32)
    elif q_offset.shape != (B,):
      raise ValueError(f"{name_off}: q_offset must be an int or have shape ({B},), got {q_offset.shape}")
    else:
      if not jnp.issubdtype(q_offset.dtype, jnp.integer):
        raise ValueError(f"{name_off}: q_offset must be integer, got {q_offset.dtype}")
      q_off = q_offset.astype(jnp.int32)
  if kv_lengths is None:
    kv_len = jnp.full((B,), S, jnp.int32)
  else:
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.shape != (B,):
      raise ValueError(f"{name_off}: kv_lengths must have shape ({B},), got {kv_lengths.shape}")
    if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
      raise ValueError(f"{name_off}: kv_lengths must be integer, got {kv_lengths.dtype}")
    kv_len = kv_lengths.astype(jnp.int32)
  return q_off, kv_len


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """ShapeDtypeStruct for a pallas_call output that varies over the same
  shard_map mesh axes as ``like`` (needed under shard_map(check_vma=True)).

  Tolerant of API moves: JAX 0.10 spells it ``manual_axis_type``, older
  versions ``vma``; outside shard_map this is a plain ShapeDtypeStruct.
  """
  varying, template = frozenset(), None
  for x in like:
    try:
      aval = jax.typeof(x)
    except Exception:  # pragma: no cover - very old jax
      continue
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
      template = mat
      varying = varying | frozenset(getattr(mat, "varying", ()))
    else:
      varying = varying | frozenset(getattr(aval, "vma", ()) or ())
  if not varying:
    return jax.ShapeDtypeStruct(shape, dtype)
  if template is not None:
    try:
      mat = type(template)(varying=varying, unreduced=frozenset(), reduced=frozenset())
      return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    except TypeError:
      pass
  return jax.ShapeDtypeStruct(shape, dtype, vma=varying)
