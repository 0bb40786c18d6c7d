"""Rotary position embedding, non-interleaved (rotate-half), optionally partial.

DeepSeek-V3.2's indexer rotates only the first `rope_dim` dims of each head
and leaves the rest position-free; the main attention of the small model here
rotates all dims. Both use the rotate-half layout: dim i pairs with
dim i + rope_dim/2, not with its neighbour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(rope_dim: int, base: float = 10000.0) -> jax.Array:
  """f32[rope_dim/2] inverse frequencies."""
  return base ** (-jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim)


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  *,
  rope_dim: int | None = None,
  base: float = 10000.0,
) -> jax.Array:
  """Rotates the first `rope_dim` dims of x[B, T, N, D] by positions int[B, T]."""
  head_dim = x.shape[-1]
  rope_dim = head_dim if rope_dim is None else rope_dim
  if rope_dim == 0:
    return x
  if rope_dim % 2 or rope_dim > head_dim:
    raise ValueError(
      f"rope_dim must be even and <= D={head_dim}, got {rope_dim}."
    )
  if positions.shape != x.shape[:2]:
    raise ValueError(
      f"positions shape {positions.shape} must be [B, T] = {x.shape[:2]} "
      f"for x shape {x.shape}."
    )
  angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(
    rope_dim, base
  )
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  rot, rest = x[..., :rope_dim], x[..., rope_dim:]
  x1, x2 = jnp.split(rot.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
