"""Kernel (interpret mode, both formulations) vs the XLA reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.gathered_attention import (
  BlockSizes,
  gathered_attention,
  gathered_attention_reference,
)

PLATFORMS = ["tpu", "gpu"]
TOL = {
  jnp.float32: dict(fwd=2e-5, grad=5e-5),
  jnp.bfloat16: dict(fwd=3e-2, grad=6e-2),
}


def _bs(platform, **kw):
  return BlockSizes(block_k=128 if platform == "tpu" else 16, **kw)


def _inputs(B, T, S, H, G, D, Dv, K, dtype, seed=0, lo=-3):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, G, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, G, Dv), jnp.float32).astype(dtype)
  idx = jax.random.randint(ks[3], (B, T, K), lo, S + 3, jnp.int32)
  return q, k, v, idx


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"]
)
def test_fwd_and_grads_odd_sizes(platform, dtype):
  B, T, S, H, G, D, Dv, K = 1, 37, 101, 6, 3, 40, 24, 17
  q, k, v, idx = _inputs(B, T, S, H, G, D, Dv, K, dtype)
  idx = idx.at[0, 3].set(-1).at[0, 5].set(S)  # rows with no valid index
  idx = idx.at[0, 7, :4].set(
    11
  )  # duplicated indices count twice, as in the reference
  bs = _bs(platform, bwd_chunk_t=16)
  f = jax.jit(
    functools.partial(gathered_attention, platform=platform, block_sizes=bs)
  )
  o = f(q, k, v, idx)
  r = gathered_attention_reference(q, k, v, idx)
  assert o.dtype == dtype and o.shape == (B, T, H, Dv)
  assert not np.isnan(np.asarray(o, np.float32)).any()
  np.testing.assert_array_equal(np.asarray(o[0, 3], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(o[0, 5], np.float32), 0.0)
  assert _rel(o, r) < TOL[dtype]["fwd"]

  cot = jax.random.normal(jax.random.key(9), o.shape, jnp.float32)
  loss = lambda fn: (
    lambda q, k, v: jnp.sum(fn(q, k, v, idx).astype(jnp.float32) * cot)
  )
  g = jax.jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v)
  # reference gradient in f32 from the same (rounded) inputs
  f32 = lambda x: x.astype(jnp.float32)
  gr = jax.grad(loss(gathered_attention_reference), (0, 1, 2))(
    f32(q), f32(k), f32(v)
  )
  for name, a, b, x in zip("qkv", g, gr, (q, k, v)):
    assert a.dtype == x.dtype, name
    assert not np.isnan(np.asarray(a, np.float32)).any(), name
    assert _rel(a, b) < TOL[dtype]["grad"], (name, _rel(a, b))
  np.testing.assert_array_equal(np.asarray(g[0][0, 3], np.float32), 0.0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_mqa_multiple_k_blocks_and_scale(platform):
  # G=1 (MQA), K spans several blocks, custom scale, all indices valid.
  B, T, S, H, G, D, Dv, K = 2, 5, 300, 8, 1, 32, 16, 260
  q, k, v, idx = _inputs(B, T, S, H, G, D, Dv, K, jnp.float32, seed=1, lo=0)
  idx = jnp.minimum(idx, S - 1)
  f = functools.partial(
    gathered_attention,
    platform=platform,
    scale=0.3,
    block_sizes=_bs(platform, bwd_chunk_t=2),
  )
  o = f(q, k, v, idx)
  r = gathered_attention_reference(q, k, v, idx, scale=0.3)
  assert _rel(o, r) < 2e-5
  g = jax.grad(lambda k: jnp.sum(f(q, k, v, idx) ** 2))(k)
  gr = jax.grad(
    lambda k: jnp.sum(
      gathered_attention_reference(q, k, v, idx, scale=0.3) ** 2
    )
  )(k)
  assert _rel(g, gr) < 5e-5


def test_gpu_head_blocks_and_feature_pieces():
  # 40 heads in blocks of 16 (last one partial), D=80 -> pieces 64+16, Dv=48
  # -> 32+16, different key blocks forward (32) and backward (16), auto chunk
  # under a small buffer budget (several chunks).
  B, T, S, H, G, D, Dv, K = 1, 6, 70, 40, 1, 80, 48, 33
  q, k, v, idx = _inputs(B, T, S, H, G, D, Dv, K, jnp.float32, seed=2)
  bs = BlockSizes(
    block_k=32,
    bwd_block_k=16,
    block_h=16,
    bwd_block_h=16,
    bwd_buffer_bytes=3 * 64 * 3 * (80 + 48) * 4,
  )
  f = lambda q, k, v: gathered_attention(
    q, k, v, idx, platform="gpu", block_sizes=bs
  )
  r = lambda q, k, v: gathered_attention_reference(q, k, v, idx)
  assert _rel(f(q, k, v), r(q, k, v)) < 2e-5
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  g = jax.grad(loss(f), (0, 1, 2))(q, k, v)
  gr = jax.grad(loss(r), (0, 1, 2))(q, k, v)
  for a, b in zip(g, gr):
    assert _rel(a, b) < 5e-5


def test_feature_pieces():
  from kernels_pallas.gathered_attention.gpu_triton import (
    feature_pieces as _pieces,
  )

  assert _pieces(576) == ((0, 512), (512, 64))
  assert _pieces(128) == ((0, 128),)
  assert _pieces(40) == ((0, 32), (32, 16))
  assert _pieces(8) == ((0, 16),)
  for n in range(1, 700):
    p = _pieces(n)
    assert all(w >= 16 and w & (w - 1) == 0 for _, w in p)
    assert [o for o, _ in p] == [
      sum(w for _, w in p[:i]) for i in range(len(p))
    ]
    assert p[-1][0] < n <= p[-1][0] + p[-1][1] < n + 16


def test_all_invalid_gives_zero_and_finite_grads():
  B, T, S, H, G, D, Dv, K = 1, 3, 10, 2, 1, 8, 8, 4
  q, k, v, _ = _inputs(B, T, S, H, G, D, Dv, K, jnp.float32)
  idx = jnp.full((B, T, K), -1, jnp.int32)
  o = gathered_attention(q, k, v, idx)
  np.testing.assert_array_equal(np.asarray(o), 0.0)
  g = jax.grad(
    lambda q, k, v: jnp.sum(gathered_attention(q, k, v, idx)), (0, 1, 2)
  )(q, k, v)
  for x in g:
    np.testing.assert_array_equal(np.asarray(x), 0.0)


def test_vmap():
  B, T, S, H, G, D, Dv, K = 1, 4, 20, 2, 1, 8, 8, 5
  q, k, v, idx = _inputs(B, T, S, H, G, D, Dv, K, jnp.float32)
  stack = lambda x: jnp.stack([x, x * 0.5])
  o = jax.vmap(gathered_attention)(
    stack(q), stack(k), stack(v), jnp.stack([idx, idx])
  )
  assert (
    _rel(o[1], gathered_attention_reference(q * 0.5, k * 0.5, v * 0.5, idx))
    < 2e-5
  )


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(q=jnp.zeros((1, 2, 3, 8))), "H % G"),
    (dict(q=jnp.zeros((1, 2, 4))), "q must have rank 4"),
    (dict(k=jnp.zeros((1, 9, 2, 7))), "k shape"),
    (dict(v=jnp.zeros((1, 8, 2, 8))), "v shape"),
    (dict(indices=jnp.zeros((1, 3, 4), jnp.int32)), "indices shape"),
    (dict(indices=jnp.zeros((1, 2, 4), jnp.float32)), "integer"),
    (dict(v=jnp.zeros((1, 9, 2, 8), jnp.bfloat16)), "dtypes differ"),
  ],
)
def test_validation(bad, match):
  args = dict(
    q=jnp.zeros((1, 2, 4, 8)),
    k=jnp.zeros((1, 9, 2, 8)),
    v=jnp.zeros((1, 9, 2, 8)),
    indices=jnp.zeros((1, 2, 4), jnp.int32),
  )
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    gathered_attention(**args)


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="block_k"):
    BlockSizes(block_k=0)
  q, k, v, idx = _inputs(1, 2, 9, 2, 1, 8, 8, 300, jnp.float32)
  with pytest.raises(ValueError, match="multiple of 128"):
    gathered_attention(
      q, k, v, idx, platform="tpu", block_sizes=BlockSizes(block_k=100)
    )
  with pytest.raises(ValueError, match="power of two"):
    gathered_attention(
      q, k, v, idx, platform="gpu", block_sizes=BlockSizes(block_k=24)
    )
  with pytest.raises(ValueError, match="block_h=48"):
    gathered_attention(
      q, k, v, idx, platform="gpu", block_sizes=BlockSizes(block_h=48)
    )
  with pytest.raises(ValueError, match="bwd_block_k"):
    gathered_attention(
      q,
      k,
      v,
      idx,
      platform="tpu",
      block_sizes=BlockSizes(block_k=128, bwd_block_k=256),
    )


def test_block_sizes_defaults_per_platform():
  from kernels_pallas.gathered_attention import (
    BACKENDS,
    backend_module,
    gpu_triton,
    tpu,
  )

  assert set(BACKENDS) == {"tpu", "gpu"}
  assert backend_module("gpu") is gpu_triton and backend_module("tpu") is tpu
  sds = jax.ShapeDtypeStruct
  shape = (
    sds((1, 4096, 128, 576), jnp.bfloat16),
    sds((1, 4096, 1, 576), jnp.bfloat16),
    sds((1, 4096, 1, 512), jnp.bfloat16),
    sds((1, 4096, 2048), jnp.int32),
  )
  gpu = BlockSizes.get_default("gpu", *shape)
  assert (gpu.block_k, gpu.bwd_block_k, gpu.block_h, gpu.num_warps) == (
    32,
    16,
    32,
    8,
  )
  # bwd_chunk_t keeps the contribution buffer (4 head blocks x 2048 slots x
  # (576 + 512) f32 per query: 120 queries in 4 GiB) in 35 equal chunks.
  assert gpu.bwd_chunk_t == 118
  assert None not in dataclasses.astuple(gpu)
  tpu_bs = BlockSizes.get_default("tpu", *shape)
  assert (tpu_bs.block_k, tpu_bs.bwd_block_k) == (128, 128)
  # Given fields win; on TPU block_k sets both passes.
  mine = BlockSizes(block_k=256, bwd_chunk_t=5000).with_defaults("tpu", *shape)
  assert (mine.block_k, mine.bwd_block_k, mine.bwd_chunk_t) == (256, 256, 4096)
  with pytest.raises(ValueError, match="platform must be one of"):
    gathered_attention(
      *_inputs(1, 2, 9, 2, 1, 8, 8, 3, jnp.float32), platform="cuda"
    )


def test_block_sizes_as_dict():
  q, k, v, idx = _inputs(1, 3, 20, 2, 1, 8, 8, 5, jnp.float32)
  r = gathered_attention_reference(q, k, v, idx)
  assert (
    _rel(gathered_attention(q, k, v, idx, block_sizes={"bwd_chunk_t": 2}), r)
    < 2e-5
  )
  with pytest.raises(ValueError, match="block_sizes: unknown"):
    gathered_attention(q, k, v, idx, block_sizes={"block_t": 8})
  with pytest.raises(ValueError, match="block_sizes must be None"):
    gathered_attention(q, k, v, idx, block_sizes=[128])
