import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import np_reference as ref
import sparse_attn as sa
from _testutil import CASES, as_jnp_opt, assert_same_grads, make_inputs

NAMES = ("q", "k", "q_idx", "k_idx", "weights")


@pytest.mark.parametrize("B,T,S,H,G,D,HI,DI,K,q_offset,kv_lengths", CASES[:4])
def test_kl_losses_match_numpy(
  rng, B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths
):
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  # small indexer inputs keep softmax(I) away from one-hot so the KL is informative
  x["q_idx"] *= 0.3
  kw = dict(
    q_offset=as_jnp_opt(q_offset) if isinstance(q_offset, list) else q_offset,
    kv_lengths=as_jnp_opt(kv_lengths),
  )
  args = [x[n] for n in NAMES]
  want = ref.dense_indexer_kl(*args, q_offset, kv_lengths)
  for chunk in (None, 5):
    got = sa.dense_indexer_kl(*args, query_chunk=chunk, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  idx = sa.lightning_topk(x["q_idx"], x["k_idx"], x["weights"], K, **kw)
  want_s = ref.sparse_indexer_kl(*args, np.asarray(idx))
  for method in (None, "gather", "counted"):
    got_s = sa.sparse_indexer_kl(*args, idx, method=method)
    np.testing.assert_allclose(
      got_s, want_s, rtol=1e-4, atol=1e-5, err_msg=method
    )
  assert got >= 0 and got_s >= 0


@pytest.mark.parametrize(
  "T,S,q_offset,kv_lengths",
  [
    (203, 203, None, None),  # training: T == S, odd length
    (150, 217, None, [217, 90]),  # default offset S - T, padded row
    (140, 140, -100, None),  # the whole first segment sees no key
    (130, 140, 100, None),  # every segment sees all S keys
  ],
)
def test_dense_kl_causal_segments(rng, T, S, q_offset, kv_lengths):
  """With a static offset the dense KL goes over causal segments (each over
  the keys it can see): equal to the numpy reference and, values and the
  indexer's gradients, to the path a traced offset takes (all S keys)."""
  from sparse_attn.ops import chunking

  assert len(chunking.causal_segments(T)) > 1
  B, H, G, D, HI, DI = 2, 4, 2, 8, 2, 8
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  x["q_idx"] *= 0.3
  args = [jnp.asarray(x[n]) for n in NAMES]
  kvl = as_jnp_opt(kv_lengths)
  off = S - T if q_offset is None else q_offset
  want = ref.dense_indexer_kl(*(x[n] for n in NAMES), q_offset, kv_lengths)

  def kl(offset):
    return lambda qi, ki, w: sa.dense_indexer_kl(
      *args[:2], qi, ki, w, q_offset=offset, kv_lengths=kvl
    )

  static, traced = kl(q_offset), kl(jnp.full((B,), off, jnp.int32))
  np.testing.assert_allclose(jax.jit(static)(*args[2:]), want, rtol=1e-4)
  np.testing.assert_allclose(traced(*args[2:]), want, rtol=1e-4)
  assert_same_grads(static, traced, args[2:], atol=1e-6, nonzero=True)


def _kl_grad_compiled(T, HI, DI, traced):
  """The compiled indexer gradient of the dense KL at T = S (H=4, G=2,
  D=32), with a traced offset or the static default."""
  B, H, G, D = 1, 4, 2, 32
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  off = jnp.zeros((B,), jnp.int32) if traced else None
  f = jax.grad(
    lambda q, k, qi, ki, w: sa.dense_indexer_kl(q, k, qi, ki, w, q_offset=off),
    argnums=(2, 3, 4),
  )
  args = (
    f32(B, T, H, D),
    f32(B, T, G, D),
    f32(B, T, HI, DI),
    f32(B, T, DI),
    f32(B, T, HI),
  )
  return jax.jit(f).lower(*args).compile()


def _flops(compiled):
  ca = compiled.cost_analysis()
  return (ca[0] if isinstance(ca, list) else ca)["flops"]


def test_dense_kl_causal_segments_cost():
  """XLA's flop count of the dense KL and its indexer gradient at T = S =
  1024: the static offset (8 segments) computes (n+1)/(2n) = 0.56 of the
  pairs a traced offset computes."""

  def flops(traced):
    return _flops(_kl_grad_compiled(1024, 2, 16, traced))

  ratio = flops(False) / flops(True)
  assert 0.5 < ratio < 0.65, ratio


@pytest.mark.parametrize(
  "T,chunk,kv_lengths",
  [(64, 16, None), (61, 7, [61, 0]), (45, 1, [3, 45])],
)
def test_dense_kl_causal_pairs(rng, T, chunk, kv_lengths):
  """Causal self-attention past one chunk pairs query chunks c and n-1-c:
  the dense KL equals the numpy reference and, value and the indexer's
  gradients, the path a traced offset takes (all S keys)."""
  B, H, G, D, HI, DI = 2, 4, 2, 8, 2, 8
  x = make_inputs(rng, B, T, T, H, G, D, HI, DI)
  x["q_idx"] *= 0.3
  args = [jnp.asarray(x[n]) for n in NAMES]
  kvl = as_jnp_opt(kv_lengths)
  want = ref.dense_indexer_kl(*(x[n] for n in NAMES), None, kv_lengths)

  def kl(offset, c=None):
    return lambda qi, ki, w: sa.dense_indexer_kl(
      *args[:2], qi, ki, w, q_offset=offset, kv_lengths=kvl, query_chunk=c
    )

  paired, traced = kl(None, chunk), kl(jnp.zeros((B,), jnp.int32))
  np.testing.assert_allclose(jax.jit(paired)(*args[2:]), want, rtol=1e-4)
  assert_same_grads(paired, traced, args[2:], atol=1e-6, nonzero=True)


def test_dense_kl_causal_pairs_cost_and_memory():
  """At T = S = 8192 (past the KL's budget) the static offset pairs query
  chunks: XLA's flop count and temp memory of the indexer gradient against
  the traced offset's chunks over all S keys."""
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  paired, traced = (_kl_grad_compiled(8192, 4, 32, t) for t in (False, True))
  # Measured: 0.55 of the flops, 0.78 of the memory (125 vs 160 MB).
  assert _flops(paired) < 0.6 * _flops(traced)
  assert temp(paired) <= temp(traced)


def test_sparse_kl_with_all_keys_equals_dense_kl(rng):
  B, T, S, H, G, D, HI, DI = 2, 12, 12, 4, 2, 8, 2, 8
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  args = [x[n] for n in NAMES]
  idx = sa.lightning_topk(x["q_idx"], x["k_idx"], x["weights"], S)
  np.testing.assert_allclose(
    sa.sparse_indexer_kl(*args, idx),
    sa.dense_indexer_kl(*args),
    rtol=1e-5,
    atol=1e-6,
  )


def test_losses_check_grads(rng):
  B, T, S, H, G, D, HI, DI, K = 1, 6, 6, 2, 1, 4, 2, 4, 3
  x = {
    n: np.asarray(a, np.float64) * 0.5
    for n, a in make_inputs(rng, B, T, S, H, G, D, HI, DI).items()
  }
  with jax.enable_x64(True):
    idx = sa.lightning_topk(x["q_idx"], x["k_idx"], x["weights"], K)
    q, k = x["q"], x["k"]
    fd = lambda qi, ki, w: sa.dense_indexer_kl(
      q, k, qi, ki, w, kv_lengths=jnp.array([5])
    )
    fs = lambda qi, ki, w: sa.sparse_indexer_kl(
      q, k, qi, ki, w, idx, method="gather"
    )
    fc = lambda qi, ki, w: sa.sparse_indexer_kl(
      q, k, qi, ki, w, idx, method="counted"
    )
    for f in (fd, fs, fc):
      check_grads(
        f,
        (x["q_idx"], x["k_idx"], x["weights"]),
        order=1,
        modes=("rev",),
        atol=1e-5,
        rtol=1e-5,
      )


def test_kl_sends_no_gradient_to_main_qkv(rng):
  B, T, S, H, G, D, HI, DI, K = 2, 9, 9, 4, 2, 8, 2, 8, 4
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  idx = sa.lightning_topk(x["q_idx"], x["k_idx"], x["weights"], K)
  gd = jax.grad(
    lambda q, k: sa.dense_indexer_kl(q, k, *(x[n] for n in NAMES[2:])),
    argnums=(0, 1),
  )(x["q"], x["k"])
  gs = jax.grad(
    lambda q, k: sa.sparse_indexer_kl(q, k, *(x[n] for n in NAMES[2:]), idx),
    argnums=(0, 1),
  )(x["q"], x["k"])
  for g in gd + gs:
    assert np.all(g == 0)
  gi = jax.grad(
    lambda w: sa.sparse_indexer_kl(*(x[n] for n in NAMES[:4]), w, idx)
  )(x["weights"])
  assert np.any(gi != 0)


def test_kl_empty_rows_finite(rng):
  B, T, S, H, G, D, HI, DI = 1, 4, 6, 2, 1, 4, 2, 4
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  args = [x[n] for n in NAMES]
  idx = jnp.full((B, T, 3), -1, jnp.int32)
  val, g = jax.value_and_grad(
    lambda w: sa.sparse_indexer_kl(*args[:4], w, idx)
  )(x["weights"])
  assert val == 0 and np.all(np.isfinite(g))
  val, g = jax.value_and_grad(
    lambda w: sa.dense_indexer_kl(*args[:4], w, kv_lengths=jnp.array([0]))
  )(x["weights"])
  assert val == 0 and np.all(np.isfinite(g))


def test_lm_loss():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  loss, count = sa.lm_loss(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(loss, -np.log(0.5), rtol=1e-6)
  assert count == 1
  with pytest.raises(ValueError, match="targets"):
    sa.lm_loss(logits, jnp.array([0, 1]))
