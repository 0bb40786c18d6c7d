"""Rotary position embedding: layouts, partial rotation, frequency scaling.

Two layouts pair the rotated dims differently:
  - rotate-half (non-interleaved, the default): dim i pairs with dim
    i + rope_dim/2. The DeepSeek-V3.2 indexer and Llama-family models use it.
  - interleaved: dim 2i pairs with dim 2i + 1. DeepSeek's MLA rotates its
    decoupled RoPE dims this way (`interleaved=True`).
Only the first `rope_dim` dims are rotated; the rest stay position-free
(the indexer's partial RoPE; MLA keeps its RoPE dims in a tensor of their
own and rotates all of them).

Frequency scaling (`RopeScaling`) extends the context a model was trained
for:
  - "default": inv_freq[i] = base ** (-2i / rope_dim);
  - "linear": positions divided by `factor`;
  - "llama3": Llama 3.1's per-band rescaling (low/high frequency factors);
  - "yarn": YaRN (Peng et al. 2023, as DeepSeek-V3 and HF transformers
    implement it): inv_freq blends interpolation (inv_freq / factor) and
    extrapolation with a linear ramp over the dims whose wavelengths fall
    between `beta_fast` and `beta_slow` rotations of the original context;
    cos/sin are multiplied by `attention_factor` (default
    mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1 for
    DeepSeek's released configs), and attention layers multiply their
    softmax scale by `softmax_mscale()` = mscale(factor, mscale_all_dim)**2.
`RopeScaling.from_dict` reads the `rope_parameters` / `rope_scaling` dict of
an HF config.json.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 if scale <= 1)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE frequencies are scaled (see the module docstring).

  Attributes:
    type: "default", "linear", "llama3" or "yarn".
    factor: context extension factor (linear, llama3, yarn).
    original_max_position_embeddings: the pre-training context (llama3,
      yarn).
    beta_fast / beta_slow: YaRN's ramp bounds, in rotations.
    mscale / mscale_all_dim: YaRN's attention temperature coefficients.
    attention_factor: YaRN's cos/sin multiplier; None derives it.
    truncate: YaRN rounds the ramp bounds to whole dims (HF's default).
    low_freq_factor / high_freq_factor: Llama 3.1's band edges.
  """

  type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0

  def __post_init__(self):
    if self.type not in ROPE_TYPES:
      raise ValueError(
        f"rope scaling type must be one of {ROPE_TYPES}, got {self.type!r}."
      )
    if self.type != "default" and not self.factor > 0:
      raise ValueError(
        f"rope scaling factor must be > 0 for type {self.type!r}, got "
        f"{self.factor!r}."
      )
    if (
      self.type in ("llama3", "yarn")
      and self.original_max_position_embeddings is None
    ):
      raise ValueError(
        f"rope scaling type {self.type!r} needs "
        f"original_max_position_embeddings."
      )
    if self.type == "llama3" and not self.high_freq_factor > (
      self.low_freq_factor
    ):
      raise ValueError(
        f"llama3 rope scaling needs high_freq_factor > low_freq_factor, "
        f"got {self.high_freq_factor} and {self.low_freq_factor}."
      )

  # -- conversion ------------------------------------------------------------

  @classmethod
  def from_dict(
    cls,
    d: Mapping[str, Any] | None,
    *,
    max_position_embeddings: int | None = None,
  ) -> RopeScaling | None:
    """From an HF `rope_parameters` / `rope_scaling` dict (None: no scaling).

    Accepts "rope_type" or "type"; ignores "rope_theta" (the base is a
    separate setting). YaRN without a factor takes
    max_position_embeddings / original_max_position_embeddings, as HF does.
    """
    if not d:
      return None
    d = dict(d)
    kind = d.pop("rope_type", None) or d.get("type") or "default"
    for k in ("type", "rope_theta", "partial_rotary_factor"):
      d.pop(k, None)
    if kind == "default":
      return None
    names = {f.name for f in dataclasses.fields(cls)} - {"type"}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(
        f"unknown rope scaling fields {unknown} for type {kind!r}; "
        f"known: {sorted(names)}."
      )
    if d.get("factor") is None:
      orig = d.get("original_max_position_embeddings")
      if kind == "yarn" and orig and max_position_embeddings:
        d["factor"] = max_position_embeddings / orig
      else:
        d.pop("factor", None)
    return cls(type=kind, **{k: v for k, v in d.items() if v is not None})

  def to_dict(self) -> dict[str, Any]:
    """The HF `rope_parameters` fields of this scaling (rope_type + its own)."""
    out: dict[str, Any] = {"rope_type": self.type, "factor": self.factor}
    if self.type in ("llama3", "yarn"):
      out["original_max_position_embeddings"] = (
        self.original_max_position_embeddings
      )
    if self.type == "llama3":
      out["low_freq_factor"] = self.low_freq_factor
      out["high_freq_factor"] = self.high_freq_factor
    if self.type == "yarn":
      out["beta_fast"] = self.beta_fast
      out["beta_slow"] = self.beta_slow
      for k in ("mscale", "attention_factor"):
        if getattr(self, k) is not None:
          out[k] = getattr(self, k)
      if not self.truncate:
        out["truncate"] = False
    if self.mscale_all_dim is not None:  # the softmax mscale, any type
      out["mscale_all_dim"] = self.mscale_all_dim
    return out

  # -- what it does ----------------------------------------------------------

  def inv_freq(self, rope_dim: int, base: float) -> np.ndarray:
    """f32[rope_dim / 2] inverse frequencies (computed in f64)."""
    inv = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if self.type == "linear":
      inv = inv / self.factor
    elif self.type == "llama3":
      inv = self._llama3(inv)
    elif self.type == "yarn":
      inv = self._yarn(inv, rope_dim, base)
    return inv.astype(np.float32)

  def _llama3(self, inv: np.ndarray) -> np.ndarray:
    assert self.original_max_position_embeddings is not None
    old = self.original_max_position_embeddings
    low_wavelen = old / self.low_freq_factor
    high_wavelen = old / self.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
    smooth = (old / wavelen - self.low_freq_factor) / (
      self.high_freq_factor - self.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)

  def _yarn(self, inv: np.ndarray, rope_dim: int, base: float) -> np.ndarray:
    assert self.original_max_position_embeddings is not None
    orig = self.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
      return (rope_dim * math.log(orig / (rotations * 2 * math.pi))) / (
        2 * math.log(base)
      )

    low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rope_dim - 1)
    if low == high:
      high += 0.001  # the ramp needs a non-empty interval
    ramp = np.clip((np.arange(rope_dim // 2) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency
    return inv / self.factor * (1 - extrapolate) + inv * extrapolate

  def cos_sin_factor(self) -> float:
    """The multiplier of cos and sin (YaRN's attention factor; else 1)."""
    if self.type != "yarn":
      return 1.0
    if self.attention_factor is not None:
      return float(self.attention_factor)
    if self.mscale and self.mscale_all_dim:
      return yarn_mscale(self.factor, self.mscale) / yarn_mscale(
        self.factor, self.mscale_all_dim
      )
    return yarn_mscale(self.factor)

  def softmax_mscale(self) -> float:
    """Factor on the attention softmax scale: mscale(factor, mscale_all_dim)**2
    when mscale_all_dim is set (DeepSeek-V3 / V3.2 with YaRN; transformers
    applies it to any scaled type), else 1."""
    if self.type != "default" and self.mscale_all_dim:
      return yarn_mscale(self.factor, self.mscale_all_dim) ** 2
    return 1.0


def as_rope_scaling(value: Any) -> RopeScaling | None:
  """A RopeScaling from a RopeScaling, a dict (HF keys), pairs, or None."""
  if value is None or isinstance(value, RopeScaling):
    return value
  if isinstance(value, Mapping):
    return RopeScaling.from_dict(value)
  try:
    return RopeScaling.from_dict(dict(value))
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"rope_scaling must be a RopeScaling, a dict or None, got {value!r}."
    ) from e


def rope_frequencies(
  rope_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None
) -> jax.Array:
  """f32[rope_dim/2] inverse frequencies (scaled by `scaling` if given)."""
  return jnp.asarray((scaling or RopeScaling()).inv_freq(rope_dim, base))


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  *,
  rope_dim: int | None = None,
  base: float = 10000.0,
  scaling: RopeScaling | None = None,
  interleaved: bool = False,
) -> jax.Array:
  """Rotates the first `rope_dim` dims of x[B, T, N, D] by positions int[B, T].

  interleaved: pairs (2i, 2i+1) instead of (i, i + rope_dim/2); the output
  keeps the input's layout. scaling: frequency scaling (YaRN etc.); its
  cos/sin factor multiplies the rotated dims.
  """
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
  scaling = scaling or RopeScaling()
  inv_freq = jnp.asarray(scaling.inv_freq(rope_dim, base))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  factor = scaling.cos_sin_factor()
  sin = (jnp.sin(angles) * factor)[:, :, None, :]
  cos = (jnp.cos(angles) * factor)[:, :, None, :]
  rot, rest = x[..., :rope_dim].astype(jnp.float32), x[..., rope_dim:]
  if interleaved:
    pairs = rot.reshape(*rot.shape[:-1], rope_dim // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    rotated = rotated.reshape(rot.shape)
  else:
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)
