"""SwiGLU feed-forward block."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn.nn.params import param


class SwiGLU(nnx.Module):
  """down(silu(x @ gate) * (x @ up)): x [B, T, E] -> [B, T, E]."""

  def __init__(
    self,
    embed_dim: int,
    mlp_dim: int,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.gate = param(rngs, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
    self.up = param(rngs, (embed_dim, mlp_dim), ("embed", "mlp"), param_dtype)
    self.down = param(rngs, (mlp_dim, embed_dim), ("mlp", "embed"), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    g = jnp.einsum("bte,em->btm", x, self.gate[...].astype(self.dtype))
    u = jnp.einsum("bte,em->btm", x, self.up[...].astype(self.dtype))
    return jnp.einsum(
      "btm,me->bte", jax.nn.silu(g) * u, self.down[...].astype(self.dtype)
    )
