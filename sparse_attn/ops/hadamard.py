"""The orthonormal Walsh-Hadamard transform of the last axis.

DeepSeek-V3.2 rotates its indexer queries and keys by a Hadamard matrix
before quantising them to FP8 (`rotate_activation` in its inference code):
the rotation is orthogonal, so q . k is unchanged, but it spreads an outlier
channel over all channels, which lowers the per-vector amax and so the
quantisation error of the other channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_power_of_two(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def hadamard_transform(x: jax.Array) -> jax.Array:
  """x [..., D] @ H_D / sqrt(D), H_D the Sylvester Hadamard matrix.

  D must be a power of two. O(D log D) butterflies, in x's dtype (f32 or
  wider recommended). Its own inverse (H_D is symmetric and orthonormal
  after the scaling).
  """
  d = x.shape[-1]
  if not is_power_of_two(d):
    raise ValueError(
      f"the Hadamard transform needs a power-of-two last axis, got shape "
      f"{x.shape}."
    )
  lead = x.shape[:-1]
  h = 1
  while h < d:
    pairs = x.reshape(*lead, d // (2 * h), 2, h)
    a, b = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
    h *= 2
  return x * jnp.asarray(d**-0.5, x.dtype)
