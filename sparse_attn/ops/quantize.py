"""Storage formats of the indexer key cache: float32, bfloat16, float8 + scale.

DeepSeek-V3.2 keeps its indexer keys in FP8 (e4m3) with one scale per token.
`quantize_index_keys` turns k_idx [..., DI] into the stored form and
`dequantize_index_keys` back; bfloat16 / float32 are plain casts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

INDEX_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
F8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def index_dtype(name: Any) -> jnp.dtype:
  """The storage dtype named `name` (a string or dtype); ValueError otherwise."""
  name = name if isinstance(name, str) else jnp.dtype(name).name
  if name not in INDEX_DTYPES:
    raise ValueError(
      f"index_dtype must be one of {INDEX_DTYPES}, got {name!r}."
    )
  return jnp.dtype(name)


def quantize_index_keys(
  k_idx: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array | None]:
  """k_idx [..., DI] -> (stored [..., DI] in `dtype`, f32 scale [...] or None).

  float8_e4m3fn uses one f32 scale per token (amax / 448; 1 for an all-zero
  key, so dequantising never divides by zero); bfloat16 / float32 are plain
  casts with no scale.
  """
  dtype = index_dtype(dtype)
  if dtype != jnp.float8_e4m3fn:
    return k_idx.astype(dtype), None
  kf = k_idx.astype(jnp.float32)
  amax = jnp.max(jnp.abs(kf), axis=-1)
  scale = jnp.where(amax > 0, amax / F8_E4M3_MAX, 1.0)
  return (kf / scale[..., None]).astype(dtype), scale


def dequantize_index_keys(
  stored: jax.Array, scale: jax.Array | None, dtype: Any = jnp.float32
) -> jax.Array:
  """Inverse of `quantize_index_keys`: [..., DI] in `dtype`."""
  x = stored.astype(jnp.float32)
  if scale is not None:
    x = x * scale[..., None]
  return x.astype(dtype)
