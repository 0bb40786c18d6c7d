"""HISA (hierarchical top-k of the lightning indexer): definition, exactness,
causality, budgets, the layer's stages, gradients, decode and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn import budgets, registry
from sparse_attn.config import ModelConfig
from sparse_attn.models import build_model
from sparse_attn.nn import hisa as hisa_layer
from sparse_attn.ops.hisa import (
  hisa_attention,
  hisa_keys_per_query,
  hisa_topk,
  select_blocks,
)
from sparse_attn.ops.indexer import indexer_scores, select_topk
from sparse_attn.ops.pooling import mean_pool_blocks


def _inputs(seed, B=2, T=45, S=None, HI=3, DI=8, ties=False):
  rng = np.random.default_rng(seed)
  S = T if S is None else S
  if ties:  # integer-valued, unit weights: exact ties everywhere
    q = rng.integers(-2, 3, (B, T, HI, DI))
    k = rng.integers(-2, 3, (B, S, DI))
    w = np.ones((B, T, HI))
  else:
    q = rng.normal(size=(B, T, HI, DI))
    k = rng.normal(size=(B, S, DI))
    w = rng.normal(size=(B, T, HI))
  f = lambda a: jnp.asarray(a, jnp.float32)
  return f(q), f(k), f(w)


def _reference(q, k, w, K, *, block_size, num_blocks, q_offset=None, kv=None):
  """HISA per query in plain numpy, by the paper's eqs. 4-5."""
  q, k, w = (np.asarray(a, np.float64) for a in (q, k, w))
  B, T, _, _ = q.shape
  S = k.shape[1]
  off = S - T if q_offset is None else q_offset
  M = -(-S // block_size)
  out = np.full((B, T, K), -1)
  for b in range(B):
    n = S if kv is None else int(kv[b])
    reps = []
    for j in range(M):
      lo, hi = j * block_size, min((j + 1) * block_size, n)
      reps.append(k[b, lo:hi].mean(0) if hi > lo else np.zeros(k.shape[2]))
    reps = np.stack(reps)
    for t in range(T):
      p = off + t
      qt, wt = q[b, t], w[b, t]

      def score(keys, qt=qt, wt=wt):
        return np.maximum(keys @ qt.T, 0) @ wt

      vis = [j for j in range(M) if j * block_size <= p and j * block_size < n]
      if not vis:
        continue
      forced = {0, p // block_size} & set(vis)
      rest = sorted(
        (j for j in vis if j not in forced),
        key=lambda j: (-score(reps[j][None])[0], -j),
      )
      kept = sorted(forced | set(rest[: num_blocks - len(forced)]))
      cand = [
        s
        for j in kept
        for s in range(j * block_size, (j + 1) * block_size)
        if s <= p and s < min(n, S)
      ]
      sc = score(k[b, cand])
      order = sorted(range(len(cand)), key=lambda i: (-sc[i], -cand[i]))
      picked = [cand[i] for i in order[:K]]
      out[b, t, : len(picked)] = picked
  return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 7, 64])
def test_every_block_kept_is_flat_dsa(ties, block_size):
  """num_blocks >= ceil(S / B_s): HISA's top-k is DSA's, order and ties too."""
  q, k, w = _inputs(0, ties=ties)
  want = select_topk(indexer_scores(q, k, w), 6)
  got = hisa_topk(
    q, k, w, 6, block_size=block_size, num_blocks=64, query_chunk=8
  )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_every_block_kept_is_flat_dsa_with_offset_and_padding():
  q, k, w = _inputs(1, T=13, S=50)
  kv = jnp.array([50, 31])
  want = select_topk(indexer_scores(q, k, w, q_offset=20, kv_lengths=kv), 5)
  got = hisa_topk(
    q, k, w, 5, block_size=4, num_blocks=13, q_offset=20, kv_lengths=kv
  )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
  "T,S,block_size,num_blocks,K,q_offset,kv",
  [
    (45, 45, 4, 3, 6, None, None),
    (33, 33, 5, 2, 9, None, None),  # m = 2: only the forced blocks
    (9, 61, 8, 4, 7, 40, (61, 44)),  # a chunk at an offset, padding
    (1, 70, 6, 5, 8, 69, None),  # one decode step
  ],
)
def test_matches_plain_reference(
  ties, T, S, block_size, num_blocks, K, q_offset, kv
):
  """Blocks scored on their mean key, first and own block forced, the more
  recent block and key first among equals: the paper's procedure in numpy."""
  q, k, w = _inputs(2, T=T, S=S, ties=ties)
  kv_arr = None if kv is None else jnp.asarray(kv)
  got = hisa_topk(
    q,
    k,
    w,
    K,
    block_size=block_size,
    num_blocks=num_blocks,
    q_offset=q_offset,
    kv_lengths=kv_arr,
    query_chunk=4,
  )
  want = _reference(
    q,
    k,
    w,
    K,
    block_size=block_size,
    num_blocks=num_blocks,
    q_offset=q_offset,
    kv=kv,
  )
  np.testing.assert_array_equal(np.asarray(got), want)


def test_selection_lies_in_kept_blocks_with_first_and_own_block():
  q, k, w = _inputs(3, T=96, HI=2, DI=4)
  bs, m, K = 8, 3, 12
  idx = np.asarray(hisa_topk(q, k, w, K, block_size=bs, num_blocks=m))
  pos = jnp.broadcast_to(jnp.arange(96, dtype=jnp.int32), (2, 96))
  pooled = mean_pool_blocks(k, bs)
  kept = np.asarray(
    select_blocks(q, pooled, w, pos, block_size=bs, num_blocks=m)
  )
  M = pooled.shape[1]
  for b in range(2):
    for t in range(96):
      blocks = kept[b, t][kept[b, t] < M]
      assert {0, t // bs} <= set(blocks.tolist())
      assert len(blocks) == min(m, t // bs + 1)
      sel = idx[b, t][idx[b, t] >= 0]
      assert np.all(sel <= t) and set((sel // bs).tolist()) <= set(blocks)


def test_no_future_leakage():
  """Keys after query t (its own block's later keys included, which its
  block representative pools) never change t's selection."""
  q, k, w = _inputs(4, T=40)
  base = np.asarray(hisa_topk(q, k, w, 5, block_size=8, num_blocks=2))
  for t in (3, 17, 30):
    k2 = k.at[:, t + 1 :].set(100.0 * jnp.sign(k[:, t + 1 :]) + 7.0)
    got = np.asarray(hisa_topk(q, k2, w, 5, block_size=8, num_blocks=2))
    np.testing.assert_array_equal(got[:, : t + 1], base[:, : t + 1])


@pytest.mark.parametrize("bs,m,K", [(4, 3, 6), (8, 2, 20), (5, 4, 3)])
def test_keys_per_query_is_what_it_selects(bs, m, K):
  q, k, w = _inputs(5, T=57)
  idx = np.asarray(hisa_topk(q, k, w, K, block_size=bs, num_blocks=m))
  counted = (idx >= 0).sum(-1)
  want = hisa_keys_per_query(57, top_k=K, block_size=bs, num_blocks=m)
  np.testing.assert_array_equal(counted, np.broadcast_to(want, counted.shape))
  got = budgets.keys_per_query(
    "hisa", 57, top_k=K, hisa_block_size=bs, hisa_blocks=m
  )
  np.testing.assert_array_equal(got, want)


def test_hisa_attention_is_gathered_attention_over_its_selection():
  q, k, w = _inputs(6, T=21)
  rng = np.random.default_rng(6)
  qa = jnp.asarray(rng.normal(size=(2, 21, 4, 8)), jnp.float32)
  ka = jnp.asarray(rng.normal(size=(2, 21, 2, 8)), jnp.float32)
  va = jnp.asarray(rng.normal(size=(2, 21, 2, 5)), jnp.float32)
  out, idx = hisa_attention(
    qa,
    ka,
    va,
    q,
    k,
    w,
    top_k=4,
    block_size=4,
    num_blocks=2,
    return_indices=True,
  )
  # per query, softmax over its selected keys (plain numpy)
  o = np.zeros((2, 21, 4, 5))
  for b in range(2):
    for t in range(21):
      sel = np.asarray(idx[b, t])
      sel = sel[sel >= 0]
      for h in range(4):
        g = h // 2
        lg = np.asarray(ka[b, sel, g]) @ np.asarray(qa[b, t, h]) / np.sqrt(8)
        p = np.exp(lg - lg.max())
        o[b, t, h] = (p / p.sum()) @ np.asarray(va[b, sel, g])
  np.testing.assert_allclose(np.asarray(out), o, atol=1e-5)
  # the kind's pure form is the same function
  params = registry.get("hisa").make_params(
    top_k=4, hisa_block_size=4, hisa_blocks=2
  )
  pure = registry.get("hisa").attention(
    qa, ka, va, params, q_idx=q, k_idx=k, weights=w
  )
  np.testing.assert_allclose(np.asarray(pure), np.asarray(out), atol=1e-6)


def _model(kind="hisa", top_k=6, **params):
  cfg = ModelConfig(
    embed_dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=kind,
    top_k=top_k,
    indexer_heads=4,
    indexer_dim=8,
    attention_params=params,
  )
  return build_model(cfg, seed=1)


def test_layer_with_every_block_kept_equals_dsa():
  """Same weights, all blocks kept: the hisa kind's logits and indexer KL
  are DSA's in both training stages."""
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
  hisa = _model(hisa_block_size=4, hisa_blocks=10)
  dsa = _model("dsa")
  nnx.update(dsa, nnx.state(hisa))
  for mode in ("warmup", "sparse"):
    lh, ah = hisa(tokens, mode=mode)
    ld, ad = dsa(tokens, mode=mode)
    np.testing.assert_allclose(np.asarray(lh), np.asarray(ld), atol=1e-6)
    np.testing.assert_allclose(ah["indexer_kl"], ad["indexer_kl"], rtol=1e-6)


def test_dsa_option_is_the_hisa_kind():
  """attention='dsa' with hisa_block_size set runs the hisa kind."""
  tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)
  hisa = _model(hisa_block_size=4, hisa_blocks=3)
  dsa = _model("dsa", hisa_block_size=4, hisa_blocks=3)
  nnx.update(dsa, nnx.state(hisa))
  lh, ah = hisa(tokens, mode="sparse")
  ld, ad = dsa(tokens, mode="sparse")
  np.testing.assert_array_equal(np.asarray(lh), np.asarray(ld))
  assert ah["attended_fraction"] == ad["attended_fraction"]
  flat = _model("dsa")
  nnx.update(flat, nnx.state(hisa))
  lf, _ = flat(tokens, mode="sparse")
  assert not np.allclose(np.asarray(lf), np.asarray(lh))  # m=3 of 10 blocks


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_gradients_reach_trunk_and_indexer(mode):
  model = _model(hisa_block_size=4, hisa_blocks=3)
  tokens = jax.random.randint(jax.random.key(2), (2, 41), 0, 256)

  def loss(m):
    logits, aux = m(tokens[:, :-1], mode=mode)
    lm = -jnp.mean(
      jnp.take_along_axis(
        jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1
      )
    )
    return lm, aux["indexer_kl"]

  lm_grads = nnx.grad(lambda m: loss(m)[0])(model)
  kl_grads = nnx.grad(lambda m: loss(m)[1])(model)
  attn = lm_grads.blocks[0].attn
  assert float(jnp.abs(attn.wq[...]).sum()) > 0
  assert float(jnp.abs(attn.wv[...]).sum()) > 0
  # the indexer learns from its KL only (its input is detached)
  idx_lm = jax.tree.leaves(nnx.state(attn.indexer))
  assert all(float(jnp.abs(g).sum()) == 0 for g in idx_lm)
  idx_kl = jax.tree.leaves(nnx.state(kl_grads.blocks[0].attn.indexer))
  assert sum(float(jnp.abs(g).sum()) for g in idx_kl) > 0
  assert float(jnp.abs(kl_grads.blocks[0].attn.wq[...]).sum()) == 0


def test_budget_matching_tunes_top_k():
  params = budgets.match_budget(
    "hisa", 512, 15.9, hisa_block_size=16, hisa_blocks=8
  )
  assert params["top_k"] == 16
  assert budgets.key_budget("hisa", 512, **params) == pytest.approx(
    budgets.key_budget("dsa", 512, top_k=16)
  )


def test_errors_name_the_argument():
  q, k, w = _inputs(7, T=8)
  with pytest.raises(ValueError, match="num_blocks must be >= 2"):
    hisa_topk(q, k, w, 2, block_size=4, num_blocks=1)
  with pytest.raises(ValueError, match="block_size must be a Python int"):
    hisa_topk(q, k, w, 2, block_size=0, num_blocks=4)
  with pytest.raises(ValueError, match="k_idx shape"):
    hisa_topk(q, k[..., :4], w, 2, block_size=4, num_blocks=4)
  with pytest.raises(ValueError, match="needs hisa_block_size"):
    registry.get("hisa").make_params(hisa_block_size=None)
  with pytest.raises(ValueError, match="num_blocks must be >= 2"):
    registry.get("dsa").make_params(hisa_block_size=8, hisa_blocks=1)
  with pytest.raises(ValueError, match="needs hisa_block_size"):
    _model(hisa_block_size=None)
  assert not hisa_layer.HISAAttention.supports_context_parallel
