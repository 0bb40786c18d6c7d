"""FP8 for the lightning indexer: the key cache's storage and DeepSeek's FP8 scoring.

Two things live here.

Storage formats of the indexer key cache (`index_dtype`): float32,
bfloat16 or float8_e4m3fn + one f32 scale per token.
`quantize_index_keys` turns k_idx [..., DI] into the stored form and
`dequantize_index_keys` back; bfloat16 / float32 are plain casts.

DeepSeek's FP8 indexer (`indexer_precision="fp8"`, DeepSeek-V3.2's
inference code: `act_quant` + `fp8_index`): indexer queries and keys are
rotated by a Hadamard matrix, then quantised to e4m3 with one scale per
vector (per (token, head) for q, per token for k: DeepSeek's
index_head_dim = 128 is one quantisation block), scale = max(amax, 1e-4) /
448, optionally rounded up to a power of two ("ue8m0"). The q scale is
folded into the head weights, so the pure scoring functions see
    I[t, s] = sum_j (w[t, j] * sq[t, j]) * relu(q8[t, j] . (k8[s] * sk[s]))
which is exactly DeepSeek's fp8_index. In training the quantisers pass
gradients straight through (`fake_quantize`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparse_attn.ops.hadamard import hadamard_transform

INDEX_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
F8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
#: Indexer score precisions: "float32" (exact), "fp8" (DeepSeek's).
INDEXER_PRECISIONS = ("float32", "fp8")
#: Scale formats of the FP8 indexer: None (f32 scales) or "ue8m0" (powers
#: of two, as DeepSeek-V3.2's released config sets scale_fmt).
SCALE_FORMATS = (None, "ue8m0")
#: DeepSeek's act_quant floor on amax (keeps scales of near-zero vectors
#: away from 0).
AMAX_FLOOR = 1e-4


def index_dtype(name: Any) -> jnp.dtype:
  """The storage dtype named `name` (a string or dtype); ValueError otherwise."""
  name = name if isinstance(name, str) else jnp.dtype(name).name
  if name not in INDEX_DTYPES:
    raise ValueError(
      f"index_dtype must be one of {INDEX_DTYPES}, got {name!r}."
    )
  return jnp.dtype(name)


def check_indexer_precision(precision: Any, scale_fmt: Any) -> None:
  """ValueError unless precision / scale_fmt are known values."""
  if precision not in INDEXER_PRECISIONS:
    raise ValueError(
      f"indexer_precision must be one of {INDEXER_PRECISIONS}, got "
      f"{precision!r}."
    )
  if scale_fmt not in SCALE_FORMATS:
    raise ValueError(
      f"indexer_scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}."
    )


def fp8_scale(
  amax: jax.Array, *, scale_fmt: str | None = None, amax_floor: float = 0.0
) -> jax.Array:
  """f32 dequantisation scale for vectors with max |x| = amax.

  amax_floor > 0: scale = max(amax, floor) / 448 (DeepSeek's act_quant).
  amax_floor = 0: amax / 448, and 1 for an all-zero vector (so dequantising
  never divides by zero). ue8m0: rounded up to a power of two.
  """
  amax = amax.astype(jnp.float32)
  if amax_floor > 0:
    scale = jnp.maximum(amax, amax_floor) / F8_E4M3_MAX
  else:
    scale = jnp.where(amax > 0, amax / F8_E4M3_MAX, 1.0)
  if scale_fmt == "ue8m0":
    scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
  elif scale_fmt is not None:
    raise ValueError(
      f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}."
    )
  return scale


def quantize_fp8(
  x: jax.Array, *, scale_fmt: str | None = None, amax_floor: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """x [..., D] -> (float8_e4m3fn [..., D], f32 scale [...]): one scale per vector."""
  xf = x.astype(jnp.float32)
  scale = fp8_scale(
    jnp.max(jnp.abs(xf), axis=-1), scale_fmt=scale_fmt, amax_floor=amax_floor
  )
  q = jnp.clip(xf / scale[..., None], -F8_E4M3_MAX, F8_E4M3_MAX)
  return q.astype(jnp.float8_e4m3fn), scale


def fake_quantize(
  x: jax.Array, *, scale_fmt: str | None = None, amax_floor: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """(x / scale rounded to e4m3 [..., D] in x's dtype, scale [...]).

  The forward value is the FP8 code (exact in f32/bf16); the gradient passes
  straight through to x / scale, with the scale itself a constant.
  """
  q, scale = quantize_fp8(x, scale_fmt=scale_fmt, amax_floor=amax_floor)
  scale = jax.lax.stop_gradient(scale)
  unit = x.astype(jnp.float32) / scale[..., None]
  code = unit + jax.lax.stop_gradient(q.astype(jnp.float32) - unit)
  return code.astype(x.dtype), scale


def fp8_indexer_inputs(
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  *,
  scale_fmt: str | None = None,
  hadamard: bool = True,
  return_key_codes: bool = False,
) -> Any:
  """DeepSeek's FP8 indexer applied to f32 indexer inputs.

  q_idx [B, T, HI, DI], k_idx [B, S, DI], weights [B, T, HI] ->
  (q8 codes [B, T, HI, DI], dequantised keys [B, S, DI], weights * q
  scales [B, T, HI]); `indexer_scores` of the result is DeepSeek's
  fp8_index score. hadamard=False skips the rotation (an ablation; DeepSeek
  always rotates). Gradients pass straight through the quantisers.
  return_key_codes: also return (the keys' float8_e4m3fn codes [B, S, DI],
  their f32 scales [B, S]), what an fp8 key cache stores.
  """
  if hadamard:
    q_idx, k_idx = hadamard_transform(q_idx), hadamard_transform(k_idx)
  q8, q_scale = fake_quantize(q_idx, scale_fmt=scale_fmt, amax_floor=AMAX_FLOOR)
  k8, k_scale = fake_quantize(k_idx, scale_fmt=scale_fmt, amax_floor=AMAX_FLOOR)
  k_deq = k8 * k_scale[..., None].astype(k8.dtype)
  out = (q8, k_deq, weights * q_scale.astype(weights.dtype))
  if return_key_codes:
    # k8 holds e4m3 values exactly: the cast to float8 loses nothing.
    codes = jax.lax.stop_gradient(k8).astype(jnp.float8_e4m3fn)
    return (*out, (codes, k_scale))
  return out


def quantize_index_keys(
  k_idx: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array | None]:
  """k_idx [..., DI] -> (stored [..., DI] in `dtype`, f32 scale [...] or None).

  float8_e4m3fn uses one f32 scale per token (`fp8_scale`; by default
  amax / 448, 1 for an all-zero key); bfloat16 / float32 are plain casts
  with no scale. (The FP8 indexer's own keys go into an fp8 cache as its
  codes and scales, not through here: re-deriving a scale from dequantised
  keys can differ from the original in the last bit.)
  """
  dtype = index_dtype(dtype)
  if dtype != jnp.float8_e4m3fn:
    return k_idx.astype(dtype), None
  return quantize_fp8(k_idx)


def dequantize_index_keys(
  stored: jax.Array, scale: jax.Array | None, dtype: Any = jnp.float32
) -> jax.Array:
  """Inverse of `quantize_index_keys`: [..., DI] in `dtype`."""
  x = stored.astype(jnp.float32)
  if scale is not None:
    x = x * scale[..., None]
  return x.astype(dtype)
