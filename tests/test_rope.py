"""RoPE: layouts, partial rotation, YaRN / llama3 / linear frequency scaling.

The YaRN reference below is a plain-Python port of the formula in
DeepSeek-V3's inference code (precompute_freqs_cis: correction range from
beta_fast / beta_slow rotations of the original context, floor/ceil, a
linear ramp between them, interpolation by `factor` below it).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn.config import ModelConfig
from sparse_attn.models import build_model
from sparse_attn.ops.rope import (
  RopeScaling,
  apply_rope,
  as_rope_scaling,
  rope_frequencies,
  yarn_mscale,
)


def _deepseek_yarn(dim, base, factor, orig, beta_fast, beta_slow):
  def corr(rot):
    return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(corr(beta_fast)), 0)
  high = min(math.ceil(corr(beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  out = []
  for i in range(dim // 2):
    f = 1.0 / base ** (2 * i / dim)
    smooth = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
    out.append(f / factor * (1 - smooth) + f * smooth)
  return np.array(out)


@pytest.mark.parametrize(
  "dim,base,factor,orig", [(64, 10000.0, 40.0, 4096), (8, 10000.0, 4.0, 8)]
)
def test_yarn_frequencies_match_deepseek(dim, base, factor, orig):
  s = RopeScaling(
    type="yarn",
    factor=factor,
    original_max_position_embeddings=orig,
    beta_fast=32,
    beta_slow=1,
  )
  ref = _deepseek_yarn(dim, base, factor, orig, 32, 1)
  np.testing.assert_allclose(s.inv_freq(dim, base), ref, rtol=1e-6)


def test_yarn_factors():
  ds = RopeScaling(
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=4096,
    mscale=1.0,
    mscale_all_dim=1.0,
  )
  assert ds.cos_sin_factor() == pytest.approx(1.0)  # DeepSeek's release
  m = 0.1 * math.log(40.0) + 1.0
  assert ds.softmax_mscale() == pytest.approx(m * m)
  both = RopeScaling(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=8,
    mscale=0.9,
    mscale_all_dim=0.8,
  )
  assert both.cos_sin_factor() == pytest.approx(
    yarn_mscale(4.0, 0.9) / yarn_mscale(4.0, 0.8)
  )
  plain = RopeScaling(
    type="yarn", factor=4.0, original_max_position_embeddings=8
  )
  assert plain.cos_sin_factor() == pytest.approx(yarn_mscale(4.0))
  assert plain.softmax_mscale() == 1.0  # no mscale_all_dim: scale unchanged
  assert yarn_mscale(0.5) == 1.0


def test_llama3_and_linear():
  dim, base = 16, 500000.0
  s = RopeScaling(
    type="llama3",
    factor=8.0,
    original_max_position_embeddings=64,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
  )
  inv = base ** (-np.arange(0, dim, 2) / dim)
  got = s.inv_freq(dim, base)
  for f, g in zip(inv, got):
    wavelen = 2 * math.pi / f
    if wavelen < 64 / 4.0:
      want = f
    elif wavelen > 64 / 1.0:
      want = f / 8.0
    else:
      smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
      want = (1 - smooth) * f / 8.0 + smooth * f
    assert g == pytest.approx(want, rel=1e-6)
  lin = RopeScaling(type="linear", factor=2.0)
  np.testing.assert_allclose(lin.inv_freq(dim, base), inv / 2, rtol=1e-6)


def test_from_dict_reads_hf_configs():
  # transformers 5 rope_parameters, with rope_theta inside
  s = RopeScaling.from_dict(
    {
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 40,
      "original_max_position_embeddings": 4096,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 1.0,
      "mscale_all_dim": 1.0,
    }
  )
  assert s is not None and s.type == "yarn" and s.factor == 40
  # DeepSeek's release: legacy "type"; YaRN without a factor uses the ratio
  legacy = RopeScaling.from_dict(
    {"type": "yarn", "original_max_position_embeddings": 4096},
    max_position_embeddings=163840,
  )
  assert legacy is not None and legacy.factor == 40
  assert RopeScaling.from_dict({"rope_type": "default"}) is None
  assert RopeScaling.from_dict(None) is None
  assert as_rope_scaling(s.to_dict()) == s  # round trip
  with pytest.raises(ValueError, match="unknown rope scaling fields"):
    RopeScaling.from_dict({"rope_type": "yarn", "fctor": 2})
  with pytest.raises(ValueError, match="original_max_position_embeddings"):
    RopeScaling(type="yarn", factor=2.0)
  with pytest.raises(ValueError, match="type"):
    RopeScaling(type="ntk")


def test_interleaved_is_rotate_half_of_deinterleaved_dims():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5)) * 7
  perm = np.r_[0:8:2, 1:8:2]  # pairs (2i, 2i+1) -> (i, i + 4)
  inter = apply_rope(x, pos, interleaved=True)
  half = apply_rope(x[..., perm], pos)
  np.testing.assert_allclose(inter[..., perm], half, atol=1e-6)
  # Interleaved pairs rotate as complex numbers (DeepSeek's view_as_complex).
  z = np.asarray(x[..., 0::2]) + 1j * np.asarray(x[..., 1::2])
  ang = np.asarray(pos)[..., None, None] * np.asarray(rope_frequencies(8))
  want = z * np.exp(1j * ang)
  np.testing.assert_allclose(inter[..., 0::2], want.real, atol=1e-5)
  np.testing.assert_allclose(inter[..., 1::2], want.imag, atol=1e-5)


def test_scaling_multiplies_rotated_dims_only_and_keeps_dot_products():
  q = jax.random.normal(jax.random.key(1), (1, 6, 2, 12))
  pos = jnp.arange(6)[None]
  s = RopeScaling(
    type="yarn",
    factor=4.0,
    original_max_position_embeddings=8,
    mscale=0.9,
    mscale_all_dim=0.8,
  )
  out = apply_rope(q, pos, rope_dim=8, scaling=s)
  np.testing.assert_array_equal(out[..., 8:], q[..., 8:])
  # rotation x cos/sin factor: norms of the rotated dims scale by the factor
  np.testing.assert_allclose(
    jnp.linalg.norm(out[..., :8], axis=-1),
    s.cos_sin_factor() * jnp.linalg.norm(q[..., :8], axis=-1),
    rtol=1e-5,
  )
  # relative positions: rotating q and k by the same offset keeps q . k
  a = apply_rope(q, pos, scaling=s)
  b = apply_rope(q, pos + 11, scaling=s)
  d_a = jnp.einsum("bthd,bshd->bhts", a, a)
  d_b = jnp.einsum("bthd,bshd->bhts", b, b)
  np.testing.assert_allclose(d_a, d_b, rtol=1e-4, atol=1e-4)


def test_model_config_rope_scaling_reaches_every_layer():
  scaling = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
  }
  for kind in ("dense", "dsa", "sliding_window"):
    cfg = ModelConfig(
      embed_dim=32,
      num_layers=1,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      mlp_dim=32,
      attention=kind,
      top_k=4,
      indexer_dim=8,
      rope_scaling=scaling,
    )
    layer = build_model(cfg).blocks[0].attn
    assert layer.rope_scaling == as_rope_scaling(scaling)
    if kind == "dsa":
      assert layer.indexer.rope_scaling == layer.rope_scaling
    plain = build_model(ModelConfig(**{**cfg.__dict__, "rope_scaling": ()}))
    tokens = jnp.arange(24).reshape(1, 24)
    assert not np.allclose(
      build_model(cfg)(tokens, mode="dense")[0],
      plain(tokens, mode="dense")[0],
    )
  with pytest.raises(ValueError, match="rope_scaling"):
    from sparse_attn.config import Config, validate

    validate(Config(model=ModelConfig(rope_scaling={"rope_type": "yarn"})), 1)
