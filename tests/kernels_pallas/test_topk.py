"""lightning_topk (interpret mode, both formulations) vs the XLA reference,
compared as sorted multisets of selected scores on random inputs (scores
one rounding apart may order differently); exact ties follow the tie rule
(here and in tests/test_topk_ties.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.topk import (
  BlockSizes,
  indexer_scores_reference,
  lightning_topk,
  lightning_topk_reference,
)

PLATFORMS = ["tpu", "gpu"]


def _inputs(B, T, S, HI, DI, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, T, HI, DI), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, DI), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[2], (B, T, HI), jnp.float32).astype(dtype)
  return q, k, w


def _check(idx, ref, scores, K):
  idx, ref, scores = np.asarray(idx), np.asarray(ref), np.asarray(scores)
  assert idx.shape == ref.shape and idx.dtype == np.int32
  # -1 exactly where fewer than K keys are visible
  np.testing.assert_array_equal((idx >= 0).sum(-1), (ref >= 0).sum(-1))
  assert ((idx >= -1) & (idx < scores.shape[-1])).all()
  # no duplicates among the valid entries
  for row in idx.reshape(-1, K):
    v = row[row >= 0]
    assert len(np.unique(v)) == len(v)
  gather = lambda i: np.sort(
    np.where(i >= 0, np.take_along_axis(scores, np.maximum(i, 0), -1), -np.inf),
    -1,
  )
  a, b = gather(idx), gather(ref)
  np.testing.assert_allclose(
    np.where(np.isinf(b), 0, a), np.where(np.isinf(b), 0, b), rtol=1e-6
  )
  np.testing.assert_array_equal(np.isinf(a), np.isinf(b))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"]
)
def test_topk_odd_sizes(platform, dtype):
  B, T, S, HI, DI, K = 1, 37, 101, 3, 40, 17
  q, k, w = _inputs(B, T, S, HI, DI, dtype)
  f = jax.jit(functools.partial(lightning_topk, k=K, platform=platform))
  idx = f(q, k, w)
  sc = indexer_scores_reference(q, k, w)
  _check(idx, lightning_topk_reference(q, k, w, K), sc, K)


@pytest.mark.parametrize("block_t", [8, 24, 128])
def test_tpu_weight_blocks(block_t):
  # The TPU kernel reads weights in lane blocks of 128 queries (block_t
  # dividing 128), of block_t (a multiple of 128) or all of T (otherwise),
  # with several query blocks per weight block.
  B, T, S, HI, DI, K = 1, 300, 320, 5, 8, 7
  q, k, w = _inputs(B, T, S, HI, DI, seed=3)
  idx = lightning_topk(
    q,
    k,
    w,
    K,
    platform="tpu",
    block_sizes=BlockSizes(block_t=block_t, block_s=128),
  )
  _check(
    idx,
    lightning_topk_reference(q, k, w, K),
    indexer_scores_reference(q, k, w),
    K,
  )


@pytest.mark.parametrize("platform", PLATFORMS)
def test_topk_offsets_lengths_and_k_gt_visible(platform):
  B, T, S, HI, DI, K = 2, 12, 150, 2, 16, 140
  q, k, w = _inputs(B, T, S, HI, DI, seed=1)
  kw = dict(
    q_offset=jnp.array([3, 130], jnp.int32),
    kv_lengths=jnp.array([9, 141], jnp.int32),
  )
  idx = lightning_topk(q, k, w, K, platform=platform, **kw)
  ref = lightning_topk_reference(q, k, w, K, **kw)
  _check(idx, ref, indexer_scores_reference(q, k, w, **kw), K)
  assert (np.asarray(idx)[0] == -1).sum() > 0  # batch 0 sees at most 9 keys
  # int q_offset and K > S
  idx = lightning_topk(q, k, w, 160, q_offset=0, platform=platform)
  ref = lightning_topk_reference(q, k, w, 160, q_offset=0)
  _check(idx, ref, indexer_scores_reference(q, k, w, q_offset=0), 160)
  np.testing.assert_array_equal(
    (np.asarray(idx) >= 0).sum(-1), np.broadcast_to(np.arange(1, T + 1), (B, T))
  )


@pytest.mark.parametrize("platform", PLATFORMS)
def test_topk_ties(platform):
  # All-equal scores: the tie rule keeps the K most recent visible keys,
  # newest first (the reference and both formulations).
  B, T, S, HI, DI, K = 1, 4, 20, 1, 8, 3
  q = jnp.ones((B, T, HI, DI))
  k = jnp.ones((B, S, DI))
  w = jnp.ones((B, T, HI))
  want = np.array([[S - T + t - i for i in range(K)] for t in range(T)])
  ref = np.asarray(lightning_topk_reference(q, k, w, K))
  np.testing.assert_array_equal(ref[0], want)
  idx = lightning_topk(q, k, w, K, platform=platform, interpret=True)
  np.testing.assert_array_equal(np.asarray(idx)[0], want)


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(q_idx=jnp.zeros((1, 2, 3))), "q_idx must have rank 4"),
    (dict(k_idx=jnp.zeros((1, 9, 5))), "k_idx shape"),
    (dict(weights=jnp.zeros((1, 2, 4))), "weights shape"),
    (dict(k=0), "k must be a positive int"),
    (dict(kv_lengths=jnp.zeros((2,), jnp.int32)), "kv_lengths"),
    (dict(q_offset=jnp.zeros((3,), jnp.int32)), "q_offset"),
  ],
)
def test_validation(bad, match):
  args = dict(
    q_idx=jnp.zeros((1, 2, 3, 8)),
    k_idx=jnp.zeros((1, 9, 8)),
    weights=jnp.zeros((1, 2, 3)),
    k=4,
  )
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    lightning_topk(**args)


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="multiple of 8"):
    BlockSizes(block_t=12).validate("tpu")
  with pytest.raises(ValueError, match="multiple of 128"):
    BlockSizes(block_s=96).validate("tpu")
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_t=8).validate("gpu")


def test_block_sizes_defaults_and_dicts():
  from kernels_pallas.topk import BACKENDS, backend_module, gpu_triton, tpu

  assert set(BACKENDS) == {"tpu", "gpu"}
  assert backend_module("gpu") is gpu_triton and backend_module("tpu") is tpu
  q, k, w = _inputs(1, 5, 30, 2, 8, seed=4)
  tpu = BlockSizes.get_default("tpu", q, k, w, 3)
  gpu = BlockSizes.get_default("gpu", q, k, w, 3)
  assert (tpu.block_t, tpu.block_s) == (8, 128) and (
    gpu.block_t,
    gpu.block_s,
  ) == (16, 64)
  assert BlockSizes(block_s=256).with_defaults("tpu", q, k, w, 3).block_s == 256
  idx = lightning_topk(q, k, w, 3, block_sizes={"block_t": 16, "block_s": 128})
  _check(
    idx,
    lightning_topk_reference(q, k, w, 3),
    indexer_scores_reference(q, k, w),
    3,
  )
  with pytest.raises(ValueError, match="block_sizes: unknown"):
    lightning_topk(q, k, w, 3, block_sizes={"block_k": 16})
  with pytest.raises(ValueError, match="block_sizes must be None"):
    lightning_topk(q, k, w, 3, block_sizes=8)
