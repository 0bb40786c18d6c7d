import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as ref
import sparse_attn as sa
from _testutil import CASES, as_jnp_opt, make_inputs


def assert_topk_matches(indices, scores, k):
  """Compares a selection with the reference scores as *sets of scores*."""
  indices, scores = np.asarray(indices), np.asarray(scores)
  assert indices.shape == scores.shape[:2] + (k,)
  for b in range(scores.shape[0]):
    for t in range(scores.shape[1]):
      row, sel = scores[b, t], indices[b, t]
      n_vis = int(np.isfinite(row).sum())
      m = min(k, n_vis)
      assert (sel == -1).sum() == k - m, (b, t, sel)
      chosen = sel[sel >= 0]
      assert len(set(chosen.tolist())) == m
      assert np.all(np.isfinite(row[chosen]))
      want = np.sort(row[np.isfinite(row)])[::-1][:m]
      np.testing.assert_allclose(
        np.sort(row[chosen])[::-1], want, rtol=1e-5, atol=1e-5
      )


@pytest.mark.parametrize("B,T,S,H,G,D,HI,DI,K,q_offset,kv_lengths", CASES)
def test_indexer_scores_and_topk_match_numpy(
  rng, B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths
):
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  kw = dict(
    q_offset=as_jnp_opt(q_offset) if isinstance(q_offset, list) else q_offset,
    kv_lengths=as_jnp_opt(kv_lengths),
  )
  want = ref.indexer_scores(
    x["q_idx"], x["k_idx"], x["weights"], q_offset, kv_lengths
  )
  got = sa.indexer_scores(x["q_idx"], x["k_idx"], x["weights"], **kw)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(
    np.asarray(got)[fin], want[fin], rtol=1e-4, atol=1e-4
  )

  assert_topk_matches(sa.select_topk(got, K), want, K)
  for chunk in (None, 1, 8):
    sel = sa.lightning_topk(
      x["q_idx"], x["k_idx"], x["weights"], K, query_chunk=chunk, **kw
    )
    assert sel.dtype == jnp.int32
    assert_topk_matches(sel, want, K)


def test_select_topk_fewer_visible_than_k():
  scores = jnp.array([[[1.0, -jnp.inf, 3.0, -jnp.inf]]])
  sel = np.asarray(sa.select_topk(scores, 3))[0, 0]
  assert sorted(sel.tolist()) == [-1, 0, 2]
  none = np.asarray(sa.select_topk(jnp.full((1, 1, 4), -jnp.inf), 2))
  assert (none == -1).all()


def test_lightning_topk_jit_vmap():
  rng = np.random.default_rng(1)
  x = make_inputs(rng, 2, 16, 16, 2, 1, 8, 2, 8)
  f = jax.jit(lambda qi, ki, w: sa.lightning_topk(qi, ki, w, 5, query_chunk=4))
  base = f(x["q_idx"], x["k_idx"], x["weights"])
  stacked = [jnp.stack([x[n], x[n]]) for n in ("q_idx", "k_idx", "weights")]
  out = jax.vmap(f)(*stacked)
  np.testing.assert_array_equal(np.sort(out[1], -1), np.sort(base, -1))


def test_lightning_topk_memory_is_chunked():
  """Compiled temp memory at T=S=16K stays far below one [T, S] f32 matrix."""
  B, T, S, HI, DI, K = 1, 16384, 16384, 4, 32, 128
  args = (
    jax.ShapeDtypeStruct((B, T, HI, DI), jnp.float32),
    jax.ShapeDtypeStruct((B, S, DI), jnp.float32),
    jax.ShapeDtypeStruct((B, T, HI), jnp.float32),
  )
  f = jax.jit(lambda qi, ki, w: sa.lightning_topk(qi, ki, w, K))
  mem = f.lower(*args).compile().memory_analysis()
  full_scores = B * T * S * 4
  topk_out = B * T * K * 4
  # O(T*K + chunk*S*HI): the bound is about 2 * 2^23 f32 per chunk + output.
  assert mem.temp_size_in_bytes < full_scores / 8, mem.temp_size_in_bytes
  assert mem.output_size_in_bytes == topk_out
  g = jax.jit(lambda qi, ki, w: sa.select_topk(sa.indexer_scores(qi, ki, w), K))
  dense_mem = g.lower(*args).compile().memory_analysis()
  assert (
    dense_mem.temp_size_in_bytes >= full_scores
  )  # the unchunked path does build [T, S]


def test_lightning_topk_causal_pairs_cost_and_memory():
  """At T = S = 8192 (past the top-k's budget) causal self-attention pairs
  query chunks: about half the flops and memory of the chunks a traced
  offset scores over all S keys."""
  B, T, HI, DI = 1, 8192, 4, 32
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

  def compiled(offset):
    f = lambda qi, ki, w: sa.lightning_topk(
      qi, ki, w, 64, q_offset=offset, implementation="xla"
    )
    return jax.jit(f).lower(f32(B, T, HI, DI), f32(B, T, DI), f32(B, T, HI))

  def stats(lowered):
    c = lowered.compile()
    ca = c.cost_analysis()
    flops = (ca[0] if isinstance(ca, list) else ca)["flops"]
    return flops, c.memory_analysis().temp_size_in_bytes

  (pf, pm), (tf, tm) = stats(compiled(None)), stats(compiled(jnp.zeros(1, int)))
  # Measured: 0.52 of the flops, 0.51 of the memory (35 vs 68 MB).
  assert pf < 0.6 * tf and pm < 0.6 * tm, (pf / tf, pm / tm)


def test_map_causal_pairs_sees_each_visible_key_once():
  """Each query's row holds every key it can see exactly once (by the
  pair's key_index), whatever the chunk; padding and future keys never."""
  from sparse_attn.ops import chunking

  for T, chunk, kv in ((16, 4, None), (23, 5, [23, 9]), (9, 1, [0, 9])):
    kvl = as_jnp_opt(kv)

    def fn(pair, queries, keys, kvl=kvl):
      valid = pair.rows(pair.visible(2, kvl), False)  # [B, 2, C, J*C]
      cols = jnp.broadcast_to(jnp.arange(valid.shape[-1]), valid.shape)
      return jnp.where(valid, pair.key_index(cols), -1)

    x = jnp.zeros((2, T, 1))
    keys_seen = np.asarray(chunking.map_causal_pairs(fn, chunk, (x,), (x,)))
    limit = np.arange(1, T + 1)[None].repeat(2, 0)
    if kv is not None:
      limit = np.minimum(limit, np.asarray(kv)[:, None])
    for b in range(2):
      for t in range(T):
        seen = np.sort(keys_seen[b, t][keys_seen[b, t] >= 0])
        np.testing.assert_array_equal(seen, np.arange(limit[b, t]))


def test_indexer_module_shapes_and_rope():
  from flax import nnx

  idx = sa.LightningIndexer(
    32, num_heads=4, head_dim=16, rope_dim=8, rngs=nnx.Rngs(0)
  )
  x = jax.random.normal(jax.random.key(0), (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  q, k, w = idx(x, pos)
  assert (
    q.shape == (2, 10, 4, 16)
    and k.shape == (2, 10, 16)
    and w.shape == (2, 10, 4)
  )
  # Dims past rope_dim are position-free: shifting positions leaves them unchanged.
  q2, k2, _ = idx(x, pos + 5)
  np.testing.assert_allclose(q[..., 8:], q2[..., 8:], rtol=1e-6)
  np.testing.assert_allclose(k[..., 8:], k2[..., 8:], rtol=1e-6)
  assert not np.allclose(q[..., :8], q2[..., :8])
  # Relative-position invariance of the rotated part: q.k depends on t - s only.
  s1 = jnp.einsum("bthd,bsd->bths", q, k)
  s2 = jnp.einsum("bthd,bsd->bths", q2, k2)
  np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-4)


def test_indexer_query_latent():
  from flax import nnx

  idx = sa.LightningIndexer(32, 2, 8, query_input_dim=12, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3, 32))
  pos = jnp.zeros((1, 3), jnp.int32)
  q, _, _ = idx(x, pos, q_latent=jnp.ones((1, 3, 12)))
  assert q.shape == (1, 3, 2, 8)
  with pytest.raises(ValueError, match="q_latent"):
    idx(x, pos)


@pytest.mark.parametrize("sub_block", [None, 1, 2, 4, 16])
def test_two_stage_selection_with_ties(sub_block):
  """Integer-valued scores with many ties and masked entries: same score sets."""
  from sparse_attn.ops.indexer import two_stage_topk

  rng = np.random.default_rng(3)
  scores = rng.integers(0, 6, size=(2, 9, 203)).astype(np.float32)
  scores[rng.random(scores.shape) < 0.3] = -np.inf
  scores[1, 4] = -np.inf
  scores[1, 5, 7:] = -np.inf
  for k in (1, 13, 64, 300):
    sel = two_stage_topk(jnp.asarray(scores), k, sub_block)
    assert_topk_matches(sel, scores, k)
    # the tie rule: the same indices as a plain sort, order included
    np.testing.assert_array_equal(np.asarray(sel), ref.select_topk(scores, k))


def test_lightning_topk_causal_segments_cost():
  """XLA's flop count at T = S = 1024 in one chunk: a static offset scores
  the queries in 8 causal segments, (n+1)/(2n) = 0.56 of the pairs a
  traced offset scores (the selection is checked in test_topk_ties)."""
  B, T, HI, DI = 1, 1024, 4, 16
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

  def flops(offset):
    f = lambda qi, ki, w: sa.lightning_topk(
      qi, ki, w, 16, q_offset=offset, implementation="xla"
    )
    lowered = jax.jit(f).lower(f32(B, T, HI, DI), f32(B, T, DI), f32(B, T, HI))
    ca = lowered.compile().cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]

  ratio = flops(None) / flops(jnp.zeros((B,), jnp.int32))
  assert 0.5 < ratio < 0.65, ratio


@pytest.mark.parametrize(
  "T,chunk,kv", [(64, 8, None), (61, 4, [61, 30]), (100, 16, [7, 100])]
)
def test_causal_paired_topk_matches_reference(T, chunk, kv):
  rng = np.random.default_rng(T)
  x = make_inputs(rng, 2, T, T, 1, 1, 4, 3, 8)
  kvl = as_jnp_opt(kv)
  want = np.asarray(
    sa.indexer_scores(x["q_idx"], x["k_idx"], x["weights"], kv_lengths=kvl)
  )
  for k in (5, 40):
    sel = sa.lightning_topk(
      x["q_idx"], x["k_idx"], x["weights"], k, kv_lengths=kvl, query_chunk=chunk
    )
    assert_topk_matches(sel, want, k)
