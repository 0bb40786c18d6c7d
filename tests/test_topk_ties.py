"""The tie rule of top-k selection, on inputs full of exact ties.

Among equal index scores the more recent key (larger index) wins, and each
row lists its keys by descending score, the more recent first among equals.
Every path that selects (select_topk, the chunked, causal-segment and
causal-paired XLA lightning_topk, both Pallas formulations, decode steps,
chunked prefill, any batch composition) must return the same indices, order included, as a
plain sort (np_reference.select_topk). Inputs are integer-valued, so every
path computes the scores exactly and ties are real ties: about half of the
visible scores are 0.0 (every head's dot product <= 0) and the rest take a
few integer values. The sharded paths are checked in
tests/_sharded_kernels_worker.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
import sparse_attn as sa
from kernels_pallas import topk as topk_kernels
from sparse_attn.ops.indexer import two_stage_topk


def tie_inputs(B, T, S, HI=3, DI=4, seed=0):
  """Integer-valued indexer inputs: q, k in {-1, 0, 1}, weights in {1, 2}."""
  rng = np.random.default_rng(seed)
  q = rng.integers(-1, 2, (B, T, HI, DI)).astype(np.float32)
  k = rng.integers(-1, 2, (B, S, DI)).astype(np.float32)
  w = rng.integers(1, 3, (B, T, HI)).astype(np.float32)
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)


def _want(q, k, w, K, q_offset=None, kv_lengths=None):
  scores = ref.indexer_scores(
    np.asarray(q), np.asarray(k), np.asarray(w), q_offset, kv_lengths
  )
  return scores, ref.select_topk(scores, K)


def test_inputs_are_tie_heavy():
  q, k, w = tie_inputs(2, 48, 48)
  scores, _ = _want(q, k, w, 6)
  vis = scores[np.isfinite(scores)]
  assert (vis == 0).mean() > 0.3  # all-zero ReLU rows of keys
  assert len(np.unique(vis)) < 20  # and few distinct values overall


# (B, T, S, K, q_offset, kv_lengths): causal self-attention, a prefix with
# an offset, padding, K larger than some rows' visible keys.
CASES = [
  pytest.param(2, 48, 48, 6, None, None, id="causal_48_k6"),
  pytest.param(2, 37, 53, 9, 16, [53, 30], id="offset_padding"),
  pytest.param(3, 29, 29, 40, None, [29, 11, 1], id="k_gt_visible"),
  pytest.param(1, 130, 130, 17, None, None, id="causal_130"),
  # One chunk over causal segments (each over the key prefix it sees),
  # the first segment seeing fewer keys than K.
  pytest.param(2, 300, 300, 17, None, [300, 150], id="causal_segments"),
  # Segments of 67 queries see 27 / 94 / 160 keys.
  pytest.param(1, 200, 260, 40, -40, None, id="segments_k_gt_prefix"),
]


@pytest.mark.parametrize("B,T,S,K,off,kv", CASES)
def test_every_xla_path_follows_the_rule(B, T, S, K, off, kv):
  q, k, w = tie_inputs(B, T, S, seed=T)
  kvl = None if kv is None else jnp.asarray(kv, jnp.int32)
  scores, want = _want(q, k, w, K, off, kv)
  got = {
    "select_topk": sa.select_topk(jnp.asarray(scores, jnp.float32), K),
    "reference": topk_kernels.select_topk_reference(
      jnp.asarray(scores, jnp.float32), K
    ),
  }
  for sb in (1, 2, 4, 16):
    got[f"two_stage sb={sb}"] = two_stage_topk(
      jnp.asarray(scores, jnp.float32), K, sb
    )
  for chunk in (None, 1, 8, 16):  # 8, 16 < T == S: the causal pairing
    got[f"lightning chunk={chunk}"] = sa.lightning_topk(
      q, k, w, K, q_offset=off, kv_lengths=kvl, query_chunk=chunk,
      implementation="xla",
    )  # fmt: skip
  for name, sel in got.items():
    np.testing.assert_array_equal(np.asarray(sel), want, err_msg=name)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("B,T,S,K,off,kv", CASES[:3])
def test_pallas_kernels_follow_the_rule(platform, B, T, S, K, off, kv):
  q, k, w = tie_inputs(B, T, S, seed=T)
  kvl = None if kv is None else jnp.asarray(kv, jnp.int32)
  _, want = _want(q, k, w, K, off, kv)
  got = topk_kernels.lightning_topk(
    q, k, w, K, q_offset=off, kv_lengths=kvl, platform=platform,
    interpret=True,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_and_chunked_prefill_select_what_prefill_selects(impl):
  """Decode steps (one query against a padded cache) and prefill in chunks
  select, for each position, exactly the keys the whole prefill does."""
  B, T, K, S_max = 2, 40, 6, 64
  q, k, w = tie_inputs(B, T, T, seed=7)
  whole = np.asarray(sa.lightning_topk(q, k, w, K, implementation=impl))
  np.testing.assert_array_equal(whole, _want(q, k, w, K)[1])
  cache = jnp.zeros((B, S_max, k.shape[-1]), k.dtype).at[:, :T].set(k)
  for t in (0, 1, 5, 17, 39):
    step = sa.lightning_topk(
      q[:, t : t + 1], cache, w[:, t : t + 1], K, q_offset=t,
      kv_lengths=jnp.full((B,), t + 1, jnp.int32), implementation=impl,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(step)[:, 0], whole[:, t])
  for start, stop in ((0, 13), (13, 27), (27, 40)):
    part = sa.lightning_topk(
      q[:, start:stop], cache, w[:, start:stop], K, q_offset=start,
      kv_lengths=jnp.full((B,), stop, jnp.int32), implementation=impl,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(part), whole[:, start:stop])


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_selection_does_not_depend_on_the_rest_of_the_batch(impl):
  """A sequence selects the same keys alone and in a batch with others of
  other lengths (padding via kv_lengths)."""
  q, k, w = tie_inputs(4, 32, 32, seed=11)
  kv = jnp.asarray([32, 20, 7, 32], jnp.int32)
  together = np.asarray(
    sa.lightning_topk(q, k, w, 5, kv_lengths=kv, implementation=impl)
  )
  for b in range(4):
    alone = sa.lightning_topk(
      q[b : b + 1], k[b : b + 1, : int(kv[b])], w[b : b + 1], 5,
      q_offset=0, implementation=impl,
    )  # fmt: skip
    n = int(kv[b])
    np.testing.assert_array_equal(np.asarray(alone)[0, :n], together[b, :n])


def test_zero_scores_fall_back_to_the_most_recent_keys():
  """With every score 0 (no key scores above the ReLU), a query keeps the
  K most recent visible keys: a sliding window, newest first."""
  B, T, K = 1, 12, 4
  q = jnp.ones((B, T, 1, 2))
  k = -jnp.ones((B, T, 2))  # q . k < 0: relu -> 0 everywhere
  w = jnp.ones((B, T, 1))
  want = np.array(
    [[t - i if t - i >= 0 else -1 for i in range(K)] for t in range(T)]
  )
  for impl in ("xla", "pallas"):
    got = sa.lightning_topk(q, k, w, K, implementation=impl)
    np.testing.assert_array_equal(np.asarray(got)[0], want, err_msg=impl)


def test_signed_zeros_are_one_score():
  """-0.0 and 0.0 tie (lax.top_k's total order alone would rank -0.0 lower)."""
  scores = jnp.asarray([[[0.0, -0.0, 1.0, -0.0, 0.0, -0.0, -jnp.inf]]])
  want = [[[2, 5, 4, 3, 1, 0, -1]]]
  for sel in (
    sa.select_topk(scores, 7),
    two_stage_topk(scores, 7, 2),
    topk_kernels.select_topk_reference(scores, 7),
  ):
    np.testing.assert_array_equal(np.asarray(sel), want)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_pallas_ties_across_score_blocks(platform):
  """S = 300 spans three 128-key score blocks of the TPU kernel: equal
  scores in different blocks still go to the more recent key."""
  q, k, w = tie_inputs(1, 24, 300, seed=5)
  _, want = _want(q, k, w, 20, q_offset=276)
  got = topk_kernels.lightning_topk(
    q, k, w, 20, q_offset=276, platform=platform, interpret=True
  )
  np.testing.assert_array_equal(np.asarray(got), want)
