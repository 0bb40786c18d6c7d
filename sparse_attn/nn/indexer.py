"""The lightning indexer as an NNX module: x -> (q_idx, k_idx, weights).

The pure scoring and selection functions are in `sparse_attn.ops.indexer`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn.nn.params import param, tag
from sparse_attn.ops import quantize
from sparse_attn.ops.rope import apply_rope, as_rope_scaling


class LightningIndexer(nnx.Module):
  """NNX lightning indexer: x[B, T, E] -> (q_idx, k_idx, weights).

  - q_idx [B, T, HI, DI] is projected from the layer input, or from a query
    latent (MLA's compressed query) when `query_input_dim` is given and
    `q_latent` is passed.
  - k_idx [B, T, DI]: one key per token shared by all indexer heads,
    LayerNorm-ed.
  - Partial RoPE, non-interleaved (rotate-half), on the first `rope_dim`
    dims of both q_idx and k_idx, as in DeepSeek-V3.2.
  - weights [B, T, HI] = proj(x) * HI**-0.5 * DI**-0.5: DeepSeek's reference
    folds the dot-product scale DI**-0.5 into the head weights, so the pure
    `indexer_scores` stays scale-free.
  - rope_scaling: the RoPE frequency scaling (YaRN for DeepSeek-V3.2), the
    same as the main attention's. rope_interleaved: rotate pairs (2i, 2i+1)
    instead (DeepSeek's first inference demo did; transformers'
    DeepseekV32Indexer and the default rotate half).
  - precision "fp8": DeepSeek's FP8 indexer (Hadamard rotation, e4m3 codes
    with one scale per vector, amax floor 1e-4, scale_fmt "ue8m0" for
    power-of-two scales; `sparse_attn.ops.quantize`): q_idx holds the q
    codes, the q scales are folded into the weights and k_idx is the
    dequantised key. Needs a power-of-two head_dim. Gradients pass straight
    through the quantisers.
  """

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    head_dim: int,
    *,
    rope_dim: int | None = None,
    query_input_dim: int | None = None,
    rope_base: float = 10000.0,
    rope_scaling: Any = None,
    rope_interleaved: bool = False,
    precision: str = "float32",
    scale_fmt: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    quantize.check_indexer_precision(precision, scale_fmt)
    if precision == "fp8" and head_dim & (head_dim - 1):
      raise ValueError(
        f"the FP8 indexer rotates by a Hadamard matrix: head_dim (indexer "
        f"dim) must be a power of two, got {head_dim}."
      )
    if rope_dim is None:
      rope_dim = head_dim // 2
    if rope_dim < 0 or rope_dim > head_dim or rope_dim % 2:
      raise ValueError(
        f"rope_dim must be even and in [0, head_dim={head_dim}], got "
        f"{rope_dim}."
      )
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.rope_dim = rope_dim
    self.rope_base = rope_base
    self.rope_scaling = as_rope_scaling(rope_scaling)
    self.rope_interleaved = bool(rope_interleaved)
    self.precision, self.scale_fmt = precision, scale_fmt
    self.dtype = dtype
    q_in = query_input_dim or embed_dim
    q_axis = "q_latent" if query_input_dim else "embed"
    self.wq = param(
      rngs,
      (q_in, num_heads, head_dim),
      (q_axis, "indexer_heads", "indexer_dim"),
      param_dtype,
    )
    self.wk = param(
      rngs, (embed_dim, head_dim), ("embed", "indexer_dim"), param_dtype
    )
    self.k_norm = nnx.LayerNorm(
      head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    tag(self.k_norm, {"scale": ("indexer_dim",), "bias": ("indexer_dim",)})
    self.w_weights = param(
      rngs, (embed_dim, num_heads), ("embed", "indexer_heads"), param_dtype
    )
    self.has_query_latent = query_input_dim is not None

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    q_latent: jax.Array | None = None,
    *,
    return_key_codes: bool = False,
  ):
    """x [B, T, E], positions int32[B, T] -> q_idx, k_idx, weights.

    return_key_codes: a 4th element, the FP8 indexer's key codes and scales
    ((float8 [B, T, DI], f32 [B, T]), what an fp8 key cache stores), or None
    for the float32 indexer.
    """
    x = x.astype(self.dtype)
    q_src = x
    if self.has_query_latent:
      if q_latent is None:
        raise ValueError(
          "this indexer was built with query_input_dim; pass "
          "q_latent [B, T, query_input_dim]."
        )
      q_src = q_latent.astype(self.dtype)
    q = jnp.einsum("bte,ehd->bthd", q_src, self.wq[...].astype(self.dtype))
    k = jnp.einsum("bte,ed->btd", x, self.wk[...].astype(self.dtype))
    k = self.k_norm(k)
    q = self.rope(q, positions)
    k = self.rope(k[:, :, None, :], positions)[:, :, 0, :]
    scale = (self.num_heads**-0.5) * (self.head_dim**-0.5)
    w = jnp.einsum("bte,eh->bth", x, self.w_weights[...].astype(self.dtype))
    w = w * scale
    if self.precision == "fp8":
      return quantize.fp8_indexer_inputs(
        q, k, w, scale_fmt=self.scale_fmt, return_key_codes=return_key_codes
      )
    return (q, k, w, None) if return_key_codes else (q, k, w)

  def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Partial RoPE of the first rope_dim dims of x [B, T, N, DI]."""
    return apply_rope(
      x,
      positions,
      rope_dim=self.rope_dim,
      base=self.rope_base,
      scaling=self.rope_scaling,
      interleaved=self.rope_interleaved,
    )

  def quantize_keys(
    self, k_idx: jax.Array, dtype: Any, codes: Any = None
  ) -> tuple[jax.Array, jax.Array | None]:
    """Indexer keys in the key cache's storage `dtype` (+ f32 scales for fp8).

    codes: the FP8 indexer's (float8 codes, scales) of these keys
    (`return_key_codes`); an fp8 cache stores them as they are, so it holds
    exactly what the scores were computed from.
    """
    if codes is not None and jnp.dtype(dtype) == jnp.float8_e4m3fn:
      return codes
    return quantize.quantize_index_keys(k_idx, dtype)
