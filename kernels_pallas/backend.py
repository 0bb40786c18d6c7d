"""Platform detection, interpret-mode policy and helpers shared by the kernels.

Every kernel in :mod:`kernels_pallas` is a package with one module per
*formulation* (backend) beside its XLA reference:

* ``"tpu"`` (``tpu.py``): Mosaic TPU (BlockSpecs with (8, 128) tiling, VMEM
  scratch, row DMAs from HBM driven by indices in SMEM).
* ``"gpu"`` (``gpu_triton.py``): Pallas Triton (power-of-two blocks, pointer
  gathers through array indexing, masked loads).

A kernel package maps formulation names to its modules in a ``BACKENDS``
table; a formulation is named after its hardware, optionally with a variant
(``"gpu_mosaic"`` would run on "gpu"), so a new backend is one module and one
table entry.

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

The Triton-specific helpers are :func:`gpu_compiler_params` and
:func:`gpu_masked_load` (JAX >= 0.11 deprecates the Triton backend in favour
of Mosaic GPU, which would get its own ``gpu_mosaic.py`` modules).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

PLATFORMS = ("tpu", "gpu")


def detected_platform() -> str:
  """'tpu', 'gpu' or 'cpu' for the default JAX backend."""
  backend = jax.default_backend().lower()
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "cpu"


def hardware(formulation: str) -> str:
  """The hardware a formulation runs on: "gpu_mosaic" -> "gpu"."""
  return formulation.split("_", 1)[0]


def resolve(
  interpret: bool | None, platform: str | None, formulations=PLATFORMS
) -> tuple[str, bool]:
  """Returns (formulation, interpret).

  formulations: the names a kernel implements (its ``BACKENDS`` keys).
  """
  hw = detected_platform()
  if platform is None:
    platform = "gpu" if hw == "gpu" else "tpu"
  if platform not in formulations:
    raise ValueError(
      f"platform must be one of {tuple(formulations)} or None, got {platform!r}"
    )
  if interpret is None:
    interpret = hw != hardware(platform)
  return platform, bool(interpret)


def backend_module(package: str, table, platform: str):
  """Imports the module of ``package`` that implements formulation ``platform``.

  Imported on first use: a formulation's Pallas dialect (Mosaic TPU, Triton)
  is only loaded when it is asked for.
  """
  return importlib.import_module(f"{package}.{table[platform]}")


class PositiveSizes:
  """Base of the kernels' BlockSizes dataclasses: every field is None or > 0.

  Subclasses are frozen dataclasses of int | None fields; None means the
  per-platform default (filled by the backend module).
  """

  def __post_init__(self):
    for f in dataclasses.fields(self):  # pyright: ignore[reportArgumentType]
      v = getattr(self, f.name)
      if v is not None and (
        not isinstance(v, int) or isinstance(v, bool) or v < 1
      ):
        raise ValueError(
          f"BlockSizes.{f.name} must be a positive int or None, got {v!r}"
        )


def coerce_block_sizes(cls, value, name: str):
  """``value`` as a ``cls`` instance: None, an instance, or a dict of its fields.

  Dicts are accepted because model configs are JSON. Raises ValueError naming
  the argument for anything else (an unknown field included).
  """
  if value is None or isinstance(value, cls):
    return value
  if isinstance(value, dict):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
      raise ValueError(
        f"{name}: unknown {cls.__module__}.{cls.__qualname__} field(s) "
        f"{unknown}; known: {sorted(fields)}"
      )
    try:
      return cls(**value)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
  raise ValueError(
    f"{name} must be None, a {cls.__module__}.{cls.__qualname__} or a dict "
    f"of its fields, got {type(value).__name__}: {value!r}"
  )


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
    raise ValueError(
      f"cannot pad axis {axis} of shape {x.shape} down to {size}"
    )
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
      f"dimension {full} (Mosaic TPU (8, 128) tiling rule)"
    )


def tpu_compiler_params(dimension_semantics: tuple[str, ...], **kw):
  from jax.experimental.pallas import tpu as pltpu

  # TPUCompilerParams: the name in older jax, gone from the installed one.
  cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams  # pyright: ignore[reportAttributeAccessIssue]
  return cls(dimension_semantics=dimension_semantics, **kw)


def gpu_compiler_params(num_warps: int = 4, num_stages: int = 2):
  """Triton compiler params (the only GPU backend used here)."""
  from jax.experimental.pallas import triton as plgpu

  # TritonCompilerParams: the name in older jax, gone from the installed one.
  cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # pyright: ignore[reportAttributeAccessIssue]
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
      raise ValueError(
        f"{name_off}: q_offset must be an int or have shape ({B},), got {q_offset.shape}"
      )
    else:
      if not jnp.issubdtype(q_offset.dtype, jnp.integer):
        raise ValueError(
          f"{name_off}: q_offset must be integer, got {q_offset.dtype}"
        )
      q_off = q_offset.astype(jnp.int32)
  if kv_lengths is None:
    kv_len = jnp.full((B,), S, jnp.int32)
  else:
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.shape != (B,):
      raise ValueError(
        f"{name_off}: kv_lengths must have shape ({B},), got {kv_lengths.shape}"
      )
    if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
      raise ValueError(
        f"{name_off}: kv_lengths must be integer, got {kv_lengths.dtype}"
      )
    kv_len = kv_lengths.astype(jnp.int32)
  return q_off, kv_len


def out_struct(shape, dtype, *like) -> jax.ShapeDtypeStruct:
  """ShapeDtypeStruct for a pallas_call output that varies over the same
  shard_map mesh axes as ``like`` (needed under shard_map(check_vma=True),
  which wants the type spelled out even when it varies over no axis).

  Tolerant of API moves: JAX 0.10 spells it ``manual_axis_type``, older
  versions ``vma``; outside shard_map the type is empty.
  """
  varying = frozenset().union(*(_vma(x) for x in like))
  template = None
  for x in like:
    try:
      template = getattr(jax.typeof(x), "manual_axis_type", None)
    except Exception:  # pragma: no cover - very old jax
      template = None
    if template is not None:
      break
  if template is not None:
    try:
      mat = type(template)(
        varying=varying, unreduced=frozenset(), reduced=frozenset()
      )
      return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    except TypeError:
      pass
  if varying:
    # vma=: the keyword of jax < 0.10, unknown to the installed jax.
    return jax.ShapeDtypeStruct(shape, dtype, vma=varying)  # pyright: ignore[reportCallIssue]
  return jax.ShapeDtypeStruct(shape, dtype)


def _vma(x) -> frozenset:
  """Mesh axes over which ``x`` varies inside shard_map (empty outside)."""
  try:
    aval = jax.typeof(x)
  except Exception:  # pragma: no cover - very old jax
    return frozenset()
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()) or ())


def varying_like(x: jax.Array, *like) -> jax.Array:
  """``x`` marked as varying over every shard_map axis any of ``like`` varies over.

  Under shard_map(check_vma=True) a loop carry must keep its type: a zeros
  initial value accumulating per-shard values has to start out varying.
  No-op outside shard_map. ``jax.lax.pcast(..., to="varying")`` in JAX >= 0.10,
  ``jax.lax.pvary`` before.
  """
  axes = frozenset().union(*(_vma(y) for y in like)) - _vma(x)
  if not axes:
    return x
  axes = tuple(sorted(axes))
  pcast = getattr(jax.lax, "pcast", None)
  if pcast is not None:
    return pcast(x, axes, to="varying")
  # jax < 0.10 only; gone from the installed jax.
  return jax.lax.pvary(x, axes)  # pragma: no cover  # pyright: ignore[reportAttributeAccessIssue]


def fill_none(sizes, defaults: dict):
  """Copy of the dataclass ``sizes`` with its None fields taken from ``defaults``."""
  return dataclasses.replace(
    sizes, **{f: v for f, v in defaults.items() if getattr(sizes, f) is None}
  )
