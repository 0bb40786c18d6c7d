"""Reformer LSH attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn.kinds import lsh
from test_patterns import np_masked_attention

_STATIC = (
  "n_buckets",
  "n_hashes",
  "chunk_size",
  "lookback",
  "same_bucket",
  "return_counts",
)
lsh_attention = jax.jit(lsh.lsh_attention, static_argnames=_STATIC)


def shared_qk_reference(qk, v, allowed_other, scale=None):
  """Dense shared-QK attention over `allowed_other` (bool[B,H,T,S], self
  excluded), each token attending itself only if its row is empty."""
  qk = np.asarray(qk, np.float64)
  keys = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
  T = qk.shape[1]
  eye = np.eye(T, dtype=bool)
  allowed = allowed_other & ~eye
  allowed = allowed | (eye & ~allowed.any(-1, keepdims=True))
  H, G = qk.shape[2], v.shape[2]
  g = lambda h: h // (H // G)
  # Keys are per query head: fold heads into the kv axis of the reference.
  out = np.zeros(qk.shape[:3] + (v.shape[-1],))
  for h in range(H):
    out[:, :, h : h + 1] = np_masked_attention(
      qk[:, :, h : h + 1],
      keys[:, :, h : h + 1],
      v[:, :, g(h) : g(h) + 1],
      allowed[:, h : h + 1],
      scale=scale,
    )
  return out


def inputs(seed, B=2, T=16, H=4, G=2, D=8, Dv=5):
  rng = np.random.default_rng(seed)
  qk = rng.standard_normal((B, T, H, D)).astype(np.float32)
  v = rng.standard_normal((B, T, G, Dv)).astype(np.float32)
  return qk, v


def test_buckets_are_argmax_of_rotations():
  qk, _ = inputs(0)
  rot = lsh.lsh_rotations(jax.random.key(3), 8, 6, 2)
  assert rot.shape == (2, 8, 3)
  b = np.asarray(lsh.lsh_buckets(jnp.asarray(qk), rot))
  proj = np.einsum("bthd,rdn->rbhtn", qk, np.asarray(rot))
  want = np.argmax(np.concatenate([proj, -proj], -1), -1)
  np.testing.assert_array_equal(b, want)
  assert b.min() >= 0 and b.max() < 6


@pytest.mark.parametrize("lookback,chunk", [("chunk", 8), ("window", 16)])
def test_two_buckets_one_hash_equals_bucket_restricted_dense(lookback, chunk):
  # T=16 in two chunks of 8 (chunk mode) or a 16-slot window: every earlier
  # same-bucket key is a candidate, so LSH is exact attention over the bucket.
  qk, v = inputs(1)
  kv = np.array([16, 11], np.int32)
  rot = lsh.lsh_rotations(jax.random.key(0), 8, 2, 1)
  out, counts = lsh_attention(
    jnp.asarray(qk),
    jnp.asarray(v),
    n_buckets=2,
    n_hashes=1,
    chunk_size=chunk,
    rotations=rot,
    lookback=lookback,
    kv_lengths=jnp.asarray(kv),
    return_counts=True,
  )
  b = np.asarray(lsh.lsh_buckets(jnp.asarray(qk), rot))[0]  # [B, H, T]
  T = qk.shape[1]
  same = b[..., :, None] == b[..., None, :]
  causal = np.tril(np.ones((T, T), bool))
  allowed = same & causal & (np.arange(T) < kv[:, None, None, None])
  want = shared_qk_reference(qk, v, allowed)
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  eye = np.eye(T, dtype=bool)
  other = allowed & ~eye
  full = other | (eye & ~other.any(-1, keepdims=True))
  np.testing.assert_allclose(counts, full.sum(-1).mean(1), rtol=1e-6)
  assert 0 < len(np.unique(b)) <= 2


@functools.partial(jax.jit, static_argnames=("n_hashes",))
def _lsh(qk, v, key, n_hashes):
  return lsh.lsh_attention(
    qk,
    v,
    n_buckets=8,
    n_hashes=n_hashes,
    chunk_size=8,
    key=key,
    lookback="chunk",
  )


def test_more_hashes_do_not_increase_error():
  T = 64
  causal = np.tril(np.ones((T, T), bool))
  errs = {1: [], 2: [], 4: []}
  for seed in range(6):
    qk, v = inputs(seed, B=1, T=T, H=2, G=1, D=16)
    dense = shared_qk_reference(qk, v, np.broadcast_to(causal, (1, 2, T, T)))
    for n in errs:
      out = _lsh(jnp.asarray(qk), jnp.asarray(v), jax.random.key(100 + seed), n)
      errs[n].append(np.mean((np.asarray(out) - dense) ** 2))
  mean = {n: np.mean(e) for n, e in errs.items()}
  assert mean[1] > mean[2] > mean[4] > 0, mean


def test_union_of_rounds_is_exact():
  """With dedup the combined rounds are exact attention over the union."""
  qk, v = inputs(4, T=12)
  rot = lsh.lsh_rotations(jax.random.key(5), 8, 4, 3)
  out = lsh_attention(
    jnp.asarray(qk),
    jnp.asarray(v),
    n_buckets=4,
    n_hashes=3,
    chunk_size=16,
    rotations=rot,
  )
  b = np.asarray(lsh.lsh_buckets(jnp.asarray(qk), rot))  # [R, B, H, T]
  same = np.any(b[..., :, None] == b[..., None, :], axis=0)
  allowed = same & np.tril(np.ones((12, 12), bool))
  np.testing.assert_allclose(
    out, shared_qk_reference(qk, v, allowed), rtol=2e-5, atol=2e-5
  )


def test_causality():
  qk, v = inputs(6, T=24)
  t = 13
  qk2 = qk.copy()
  qk2[:, t:] = np.random.default_rng(9).standard_normal(qk2[:, t:].shape)
  v2 = v.copy()
  v2[:, t:] += 5.0
  kw = dict(n_buckets=4, n_hashes=2, chunk_size=4, key=jax.random.key(1))
  run = lambda a, b, **k: np.asarray(
    lsh_attention(jnp.asarray(a), jnp.asarray(b), **kw, **k)
  )
  # "window" is strictly causal: nothing about future tokens matters (up to
  # float summation order: the sorted slots of past keys may move).
  a, b = run(qk, v, lookback="window"), run(qk2, v2, lookback="window")
  np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, t:], b[:, t:])
  # "chunk": only past keys are attended, so future values never leak.
  a, b = run(qk, v, lookback="chunk"), run(qk, v2, lookback="chunk")
  np.testing.assert_array_equal(a[:, :t], b[:, :t])


def test_grad_finite_and_validation():
  qk, v = inputs(7, T=10)
  f = lambda qk, v: jnp.sum(
    lsh.lsh_attention(
      qk,
      v,
      n_buckets=4,
      n_hashes=2,
      chunk_size=4,
      key=jax.random.key(0),
      kv_lengths=jnp.array([10, 3]),
    )
    ** 2
  )
  g = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(qk), jnp.asarray(v))
  assert all(np.all(np.isfinite(x)) for x in g)
  assert np.any(np.asarray(g[0]) != 0)
  with pytest.raises(ValueError, match="even"):
    lsh_attention(
      qk, v, n_buckets=3, n_hashes=1, chunk_size=4, key=jax.random.key(0)
    )
  with pytest.raises(ValueError, match="exactly one"):
    lsh_attention(qk, v, n_buckets=4, n_hashes=1, chunk_size=4)
  with pytest.raises(ValueError, match="lookback"):
    lsh_attention(
      qk,
      v,
      n_buckets=4,
      n_hashes=1,
      chunk_size=4,
      key=jax.random.key(0),
      lookback="all",
    )


def test_layer_hashes_content_not_position():
  """Reformer's buckets are a function of a token's content: the layer
  hashes its shared-QK projection before RoPE. Identical content 256
  tokens apart lands in the same bucket in every round (hashing after RoPE
  gave 22% here, chance 1/8), while the attention logits still see RoPE."""
  from flax import nnx

  from sparse_attn.nn import LSHAttention

  layer = LSHAttention(32, 4, 2, 16, n_buckets=8, rngs=nnx.Rngs(0))
  block = jax.random.normal(jax.random.key(1), (1, 64, 32))
  x = jnp.concatenate([block] * 5, axis=1)[:, :320]  # period 64
  pos = jnp.arange(320)[None]
  q_rope, hashed, _ = layer.project(x, pos)
  rot = lsh.lsh_rotations(layer.hash_key(), 16, 8, layer.params.n_hashes)
  b = np.asarray(lsh.lsh_buckets(hashed, rot))  # [NH, B, H, T]
  np.testing.assert_array_equal(b[..., :64], b[..., 256:320])
  rotated = np.asarray(lsh.lsh_buckets(q_rope, rot))
  assert (rotated[..., :64] == rotated[..., 256:320]).mean() < 0.5
  # the layer's output uses those buckets: same as the pure function with
  # hash_qk = the content vectors
  y, _ = layer(x)
  o = lsh.lsh_attention(
    q_rope, layer.project(x, pos)[2], n_buckets=8,
    n_hashes=layer.params.n_hashes, chunk_size=layer.params.chunk_size,
    rotations=rot, lookback=layer.params.lookback, hash_qk=hashed,
  )  # fmt: skip
  np.testing.assert_allclose(y, layer.output(o), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="hash_qk shape"):
    lsh.lsh_attention(
      q_rope, layer.project(x, pos)[2], n_buckets=8, n_hashes=2,
      chunk_size=32, rotations=rot, hash_qk=hashed[:, :10],
    )  # fmt: skip
