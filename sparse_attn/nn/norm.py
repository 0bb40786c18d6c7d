"""RMSNorm with statistics in f32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale over the last axis, statistics in f32."""

  def __init__(
    self,
    dim: int,
    *,
    eps: float = 1e-6,
    param_dtype: Any = jnp.float32,
    axis_name: str = "embed",
    rngs: nnx.Rngs | None = None,
  ):
    del rngs
    self.eps = eps
    # axis_name: the logical axis of the normalised dim (MLA's latents
    # are not the model width).
    self.scale = nnx.Param(
      jnp.ones((dim,), param_dtype), logical_axes=(axis_name,)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
