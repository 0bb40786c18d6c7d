"""Input validation shared by the public functions.

Every public function validates shapes up front and raises ValueError naming
the argument and the shapes involved; nothing is silently broadcast. Checks
run on static shapes only, so they cost nothing under jit.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(name: str, x: Any, rank: int, layout: str) -> tuple[int, ...]:
  shape = shape_of(x)
  if len(shape) != rank:
    raise ValueError(
      f"{name} must have rank {rank} with layout {layout}, got shape {shape}."
    )
  return shape


def check_floating(name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array, got dtype {dtype}.")


def check_integer(name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {dtype}.")


def check_same_dtype(**arrays: Any) -> None:
  dtypes = {name: jnp.result_type(a) for name, a in arrays.items()}
  if len(set(dtypes.values())) > 1:
    desc = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
    raise ValueError(f"dtype mismatch between {desc}.")


def check_dim(
  name: str,
  shape: tuple[int, ...],
  axis: int,
  expected: int,
  what: str,
  other: str,
) -> None:
  if shape[axis] != expected:
    raise ValueError(
      f"{name} {what} (axis {axis}) is {shape[axis]} but {other} has "
      f"{expected}; {name} shape {shape}."
    )


def check_k(k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k (top_k) must be a Python int >= 1, got {k!r}.")
  if k < 1:
    raise ValueError(f"k (top_k) must be >= 1, got {k}.")
  return int(k)


def check_heads(num_heads: int, num_kv_heads: int, q_shape, k_shape) -> None:
  if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
    raise ValueError(
      f"query heads H={num_heads} must be a multiple of kv heads "
      f"G={num_kv_heads}; q shape {q_shape}, k shape {k_shape}."
    )


def check_q_offset(q_offset: Any, batch: int) -> None:
  # bool is an int subclass; an offset of True is a mistake, not 1.
  if q_offset is None or (
    isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool)
  ):
    return
  shape = shape_of(q_offset)
  if shape not in ((), (batch,)):
    raise ValueError(
      f"q_offset must be an int, a scalar, or an int array of shape "
      f"({batch},), got shape {shape}."
    )
  check_integer("q_offset", q_offset)


def check_kv_lengths(kv_lengths: Any, batch: int) -> None:
  if kv_lengths is None:
    return
  shape = shape_of(kv_lengths)
  if shape != (batch,):
    raise ValueError(
      f"kv_lengths must have shape (B,)=({batch},), got shape {shape}."
    )
  check_integer("kv_lengths", kv_lengths)


def acc_dtype(*arrays: Any):
  """Accumulation dtype: f32, or wider when the inputs are (e.g. f64 tests)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def check_positive_int(name: str, value: Any) -> int:
  """A Python (or numpy) int >= 1, as int; ValueError naming `name` otherwise."""
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, np.integer))
    or value < 1
  ):
    raise ValueError(f"{name} must be a Python int >= 1, got {value!r}.")
  return int(value)
