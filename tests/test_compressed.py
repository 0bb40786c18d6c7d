"""DeepSeek-V4's CSA and HCA: the pooling and the attention against plain
numpy versions of the paper's equations, causality, decode == forward,
the indexer's stages and gradients, budgets and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn import budgets, registry
from sparse_attn.nn.compressed import CSAAttention, HCAAttention
from sparse_attn.ops import compressed as comp

E, H, G, D = 32, 4, 2, 8


def np_pool(kv, gate, bias, ratio):
  """Eqs. 9-12 / 20-22 with loops: kv, gate [B, S, G, P, D]."""
  b, s, g, p, d = kv.shape
  n = s // ratio
  out = np.zeros((b, n, g, d))
  for w in range(n):
    slots_c, slots_z = [], []
    if p == 2 and w > 0:
      for j in range(ratio):
        t = (w - 1) * ratio + j
        slots_c.append(kv[:, t, :, 0])
        slots_z.append(gate[:, t, :, 0] + bias[j, :, 0])
    for j in range(ratio):
      t = w * ratio + j
      slots_c.append(kv[:, t, :, p - 1])
      slots_z.append(gate[:, t, :, p - 1] + bias[j, :, p - 1])
    c, z = np.stack(slots_c, 1), np.stack(slots_z, 1)  # [B, J, G, D]
    e = np.exp(z - z.max(1, keepdims=True))
    out[:, w] = (c * e / e.sum(1, keepdims=True)).sum(1)
  return out


def np_attention(q, k, v, ck, cv, ratio, window, sets, sinks, scale):
  """Softmax over window tokens + the entries in sets[b][t] + a sink."""
  b, t_, h, d = q.shape
  g = k.shape[2]
  out = np.zeros((b, t_, h, v.shape[-1]))
  for bi in range(b):
    for t in range(t_):
      toks = [s for s in range(max(0, t - window + 1), t + 1)]
      ents = sets[bi][t]
      for hi in range(h):
        gi = hi // (h // g)
        logits = [q[bi, t, hi] @ k[bi, s, gi] * scale for s in toks]
        logits += [q[bi, t, hi] @ ck[bi, w, gi] * scale for w in ents]
        vals = [v[bi, s, gi] for s in toks] + [cv[bi, w, gi] for w in ents]
        allv = np.array(logits + ([sinks[hi]] if sinks is not None else []))
        e = np.exp(allv - allv.max())
        p = e / e.sum()
        out[bi, t, hi] = (p[: len(vals), None] * np.array(vals)).sum(0)
  return out


@pytest.mark.parametrize("series", [1, 2])
@pytest.mark.parametrize("s,ratio", [(13, 4), (16, 4), (9, 3)])
def test_pool_matches_equations(series, s, ratio):
  rng = np.random.default_rng(s)
  kv = rng.normal(size=(2, s, G, series, D)).astype(np.float32)
  gate = rng.normal(size=(2, s, G, series, D)).astype(np.float32)
  bias = rng.normal(size=(ratio, G, series, D)).astype(np.float32)
  got = comp.pool_groups(
    jnp.asarray(kv), jnp.asarray(gate), jnp.asarray(bias), ratio
  )
  np.testing.assert_allclose(got, np_pool(kv, gate, bias, ratio), atol=1e-5)


@pytest.mark.parametrize("series", [1, 2])
@pytest.mark.parametrize("count", [1, 3])
def test_pool_group_range_is_a_slice_of_pool_groups(series, count):
  rng = np.random.default_rng(count)
  s, ratio = 14, 3  # 4 complete groups and a partial one
  kv, gate = (
    jnp.asarray(rng.normal(size=(3, s, G, series, D)), jnp.float32)
    for _ in range(2)
  )
  bias = jnp.asarray(rng.normal(size=(ratio, G, series, D)), jnp.float32)
  full = comp.pool_groups(kv, gate, bias, ratio)
  first = jnp.asarray([0, 1, 4 - count], jnp.int32)  # group 0 has no group -1
  got = comp.pool_group_range(kv, gate, bias, ratio, first, count)
  assert got.shape == (3, count, G, D)
  for b, f in enumerate(np.asarray(first)):
    np.testing.assert_allclose(got[b], full[b, f : f + count], atol=1e-6)
  # A group past S (the decode cache's partial group) stays finite.
  for dt in (jnp.float32, jnp.float16, jnp.bfloat16):
    past = comp.pool_group_range(
      kv.astype(dt), gate.astype(dt), bias, ratio, first + count, 2
    )
    assert np.isfinite(np.asarray(past, np.float32)).all(), dt


@pytest.mark.parametrize("use_indices", [False, True])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_matches_reference(use_indices, with_sinks):
  rng = np.random.default_rng(0)
  b, t, ratio, window, kk = 2, 19, 3, 4, 2
  n = t // ratio
  q, k, v = (
    rng.normal(size=(b, t, *sh)).astype(np.float32)
    for sh in ((H, D), (G, D), (G, D))
  )
  ck, cv = (rng.normal(size=(b, n, G, D)).astype(np.float32) for _ in range(2))
  sinks = rng.normal(size=(H,)).astype(np.float32) if with_sinks else None
  visible = [
    [[w for w in range(n) if (w + 1) * ratio - 1 <= i] for i in range(t)]
    for _ in range(b)
  ]
  indices = None
  if use_indices:
    # Arbitrary picks, some not yet visible (they must be skipped), -1 slots.
    picks = rng.integers(-1, n, size=(b, t, kk)).astype(np.int32)
    indices = jnp.asarray(picks)
    visible = [
      [
        [w for w in picks[bi, i] if w >= 0 and (w + 1) * ratio - 1 <= i]
        for i in range(t)
      ]
      for bi in range(b)
    ]
  got, counts = comp.compressed_attention(
    *map(jnp.asarray, (q, k, v, ck, cv)),
    ratio=ratio,
    window=window,
    indices=indices,
    sinks=None if sinks is None else jnp.asarray(sinks),
    query_chunk=8,
    return_counts=True,
  )
  want = np_attention(q, k, v, ck, cv, ratio, window, visible, sinks, D**-0.5)
  np.testing.assert_allclose(got, want, atol=2e-5)
  want_counts = [
    [min(window, i + 1) + len(visible[bi][i]) for i in range(t)]
    for bi in range(b)
  ]
  np.testing.assert_array_equal(counts, want_counts)


def test_topk_picks_visible_entries_with_tie_rule():
  b, t, n, ratio = 1, 12, 4, 3
  q_idx = jnp.ones((b, t, 1, 2))
  k_idx = jnp.ones((b, n, 2))  # every score ties
  w = jnp.ones((b, t, 1))
  pos = jnp.arange(t)[None]
  idx = comp.compressed_topk(q_idx, k_idx, w, 2, ratio=ratio, q_pos=pos)
  for i in range(t):
    vis = [e for e in range(n) if (e + 1) * ratio - 1 <= i]
    want = sorted(vis, reverse=True)[:2]  # the more recent first
    want += [-1] * (2 - len(want))
    assert list(np.asarray(idx[0, i])) == want, i


@nnx.jit(static_argnames="mode")
def _fwd(layer, x, mode):
  return layer(x, mode=mode)


@nnx.jit(static_argnames="view")
def _step(layer, x, positions, cache, view=None):
  return layer(x, positions=positions, cache=cache, view=view)


def _layer(kind, **kw):
  cls = CSAAttention if kind == "csa" else HCAAttention
  base = dict(ratio=4, window=5)
  if kind == "csa":
    base["top_k"] = 2
  base.update(kw)
  return cls(E, H, G, D, rngs=nnx.Rngs(0), **base)


@pytest.mark.parametrize(
  "kind,mode", [("csa", "sparse"), ("csa", "warmup"), ("hca", "sparse")]
)
def test_no_future_leakage(kind, mode):
  layer = _layer(kind)
  x = jax.random.normal(jax.random.key(1), (2, 23, E))
  cut = 13
  x2 = x.at[:, cut:].add(jax.random.normal(jax.random.key(2), (2, 23 - cut, E)))
  y, aux = _fwd(layer, x, mode)
  y2, _ = _fwd(layer, x2, mode)
  np.testing.assert_allclose(y[:, :cut], y2[:, :cut], atol=1e-6)
  assert not np.allclose(y[:, cut:], y2[:, cut:])
  assert np.isfinite(aux["indexer_kl"])


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_decode_equals_forward(kind):
  layer = _layer(kind)
  t, prompt, chunk = 32, 7, 6
  x = jax.random.normal(jax.random.key(3), (2, t, E))
  y_full, _ = _fwd(layer, x, "sparse")
  cache = layer.init_cache(2, t)  # filled to the last slot
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  # A prefill reading a view shorter than the cache, a chunk that ends
  # inside a group and completes two, then steps.
  y0, _, cache = _step(layer, x[:, :prompt], pos[:, :prompt], cache, view=16)
  mid = prompt + chunk
  y1, _, cache = _step(layer, x[:, prompt:mid], pos[:, prompt:mid], cache)
  outs = [y0, y1]
  for i in range(mid, t):
    yi, _, cache = _step(layer, x[:, i : i + 1], pos[:, i : i + 1], cache)
    outs.append(yi)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, atol=2e-5)
  # The entry cache holds what pooling the whole sequence gives.
  full = layer.compressor.entries(*layer.compressor.project(x))
  np.testing.assert_allclose(cache.c_entries[:, : t // 4], full, atol=1e-5)
  # Keys are stored with RoPE at each group's first position (applied once,
  # when the entry is written).
  groups = jnp.arange(t // 4, dtype=jnp.int32) * 4
  full_keys = layer.rope(full, jnp.broadcast_to(groups, full.shape[:2]))
  np.testing.assert_allclose(cache.c_keys[:, : t // 4], full_keys, atol=1e-5)
  if kind == "csa":
    idx = layer.indexer
    ientries = idx.compressor.entries(*idx.compressor.project(x))
    ikeys = idx.rope(ientries, jnp.broadcast_to(groups, ientries.shape[:2]))
    np.testing.assert_allclose(cache.i_keys[:, : t // 4], ikeys, atol=1e-5)


def test_csa_stages_and_gradients():
  layer = _layer("csa")
  x = jax.random.normal(jax.random.key(4), (2, 20, E))
  graphdef, params = nnx.split(layer, nnx.Param)

  def loss(params, mode):
    y, aux = nnx.merge(graphdef, params)(x, mode=mode)
    return jnp.mean(y**2), aux["indexer_kl"]

  def grads_of(fn):
    g = jax.jit(jax.grad(fn))(params)
    flat = nnx.to_flat_state(g)
    return {
      "/".join(map(str, path)): np.abs(np.asarray(v[...])).sum()
      for path, v in flat
    }

  # The KL trains the indexer only; the LM side never reaches it.
  for mode in ("warmup", "sparse"):
    kl_g = grads_of(lambda p, mode=mode: loss(p, mode)[1])
    assert loss(params, mode)[1] > 0
    assert any(v > 0 for n, v in kl_g.items() if n.startswith("indexer"))
    assert all(v == 0 for n, v in kl_g.items() if not n.startswith("indexer"))
  lm_g = grads_of(lambda p: loss(p, "sparse")[0])
  assert all(v == 0 for n, v in lm_g.items() if n.startswith("indexer"))
  for name in (
    "compressor/w_kv",
    "compressor/w_gate",
    "compressor/bias",
    "sinks",
    "wq",
  ):
    assert lm_g[name] > 0, name
  assert loss(params, "dense")[1] == 0


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_counts_match_budget(kind):
  layer = _layer(kind)
  x = jax.random.normal(jax.random.key(5), (1, 30, E))
  _, aux = _fwd(layer, x, "sparse")
  spec = registry.get(kind)
  want = spec.keys_per_query(30, layer.params).sum()
  assert float(aux["attended_keys"]) == want
  # match_budget tunes the kind's budget parameter.
  got = budgets.match_budget(kind, 512, 24.0, window=8)
  assert spec.make_params(**got)


def test_padded_rows_finite_and_zero():
  layer = _layer("csa")
  x = jax.random.normal(jax.random.key(6), (2, 12, E))
  cache = layer.init_cache(2, 16)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  y, _, _ = layer(x, positions=pos, kv_lengths=jnp.array([12, 5]), cache=cache)
  assert np.all(np.isfinite(y))
  q = jnp.ones((1, 3, H, D))
  k = jnp.ones((1, 3, G, D))
  ck = jnp.ones((1, 0, G, D))
  o = comp.compressed_attention(
    q,
    k,
    k,
    ck,
    ck,
    ratio=4,
    window=2,
    sinks=jnp.zeros(H),
    kv_lengths=jnp.array([0]),
  )
  np.testing.assert_array_equal(o, 0.0)


def test_errors():
  with pytest.raises(ValueError, match="ratio"):
    _layer("hca", ratio=0)
  with pytest.raises(ValueError, match="window"):
    _layer("csa", window=0)
  with pytest.raises(ValueError, match="indexer_rope_dim"):
    _layer("csa", indexer_rope_dim=3)
  q = jnp.ones((1, 4, H, D))
  k = jnp.ones((1, 4, G, D))
  with pytest.raises(ValueError, match="ck shape"):
    comp.compressed_attention(
      q, k, k, jnp.ones((1, 1, 3, D)), jnp.ones((1, 1, 3, D)), ratio=4, window=2
    )
  with pytest.raises(ValueError, match="sinks shape"):
    comp.compressed_attention(
      q,
      k,
      k,
      jnp.ones((1, 1, G, D)),
      jnp.ones((1, 1, G, D)),
      ratio=4,
      window=2,
      sinks=jnp.ones(3),
    )
  with pytest.raises(ValueError, match="bias shape"):
    comp.pool_groups(
      jnp.ones((1, 8, G, 2, D)),
      jnp.ones((1, 8, G, 2, D)),
      jnp.ones((3, G, 2, D)),
      4,
    )
  span = jnp.ones((1, 6, G, 2, D))
  with pytest.raises(ValueError, match="span must be"):
    comp.pool_span(
      span, span, jnp.ones((1, 6), bool), jnp.ones((4, G, 2, D)), 4
    )
  with pytest.raises(ValueError, match="first shape"):
    comp.pool_group_range(
      span, span, jnp.ones((4, G, 2, D)), 4, jnp.zeros((2,), jnp.int32), 1
    )


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_shorter_than_one_group_is_the_window(kind):
  """No complete group: no entry, the layer attends its window (+ sink)."""
  layer = _layer(kind, ratio=8, window=2)
  x = jax.random.normal(jax.random.key(7), (1, 5, E))
  for mode in ("sparse", "warmup"):
    y, aux = _fwd(layer, x, mode)
    assert np.all(np.isfinite(y)) and float(aux["indexer_kl"]) == 0.0
    assert float(aux["attended_keys"]) == 1 + 2 * 4
  g = jax.grad(lambda x: jnp.sum(layer(x, mode="sparse")[0]))(x)
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------
# csa_hca: DeepSeek-V4's schedule of CSA and HCA layers


def test_csa_hca_schedule_is_v4s():
  from sparse_attn.nn.compressed_hybrid import CSAHCAParams

  p = CSAHCAParams()
  # transformers' DeepseekV4Config default: 2 HCA, then HCA / CSA in turn.
  want = ["hca"] * 2 + ["hca" if i % 2 == 0 else "csa" for i in range(6)]
  assert [p.layer_type(i) for i in range(8)] == want
  q = CSAHCAParams(layer_types=["csa", "csa", "hca"])
  assert [q.layer_type(i) for i in range(6)] == ["csa", "csa", "hca"] * 2
  assert p.layer_params(3) == p.csa and p.layer_params(2) == p.hca
  for bad in (dict(layer_types=[]), dict(layer_types=["csa", "dsa"])):
    with pytest.raises(ValueError, match="layer_types"):
      CSAHCAParams(**bad)
  with pytest.raises(ValueError, match="hca_first"):
    CSAHCAParams(hca_first=-1)
  with pytest.raises(ValueError, match="ratio"):
    CSAHCAParams(hca_ratio=0)
  with pytest.raises(ValueError, match="layer_index"):
    p.layer_type(-1)


def test_csa_hca_model_builds_each_layer_and_trains_csas_indexers():
  from sparse_attn.config import ModelConfig
  from sparse_attn.models import build_model

  cfg = ModelConfig(
    embed_dim=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention="csa_hca",
    top_k=3,
    indexer_heads=2,
    indexer_dim=8,
    attention_params={"hca_ratio": 8, "window": 4, "hca_first": 1},
  )
  model = build_model(cfg)
  layers = [b.attn for b in model.blocks]
  assert [type(a).__name__ for a in layers] == [
    "HCAAttention",
    "HCAAttention",
    "CSAAttention",
    "HCAAttention",
  ]
  assert layers[0].params.ratio == 8 and layers[2].params.ratio == 4
  assert layers[2].params.top_k == 3 and layers[2].indexer.num_heads == 2
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 256)
  _, aux = nnx.jit(lambda m, t: m(t, mode="warmup"))(model, tokens)
  assert float(aux["indexer_kl"]) > 0  # the CSA layer's warm-up KL
  # One CSA layer's budget and one HCA layer's, by layer_index; their mean
  # without one.
  spec = registry.get("csa_hca")
  p = spec.params_from_config(cfg)
  csa = budgets.keys_per_query("csa", 64, ratio=4, window=4, top_k=3)
  hca = budgets.keys_per_query("hca", 64, ratio=8, window=4)
  np.testing.assert_array_equal(spec.keys_per_query(64, p, layer_index=2), csa)
  np.testing.assert_array_equal(spec.keys_per_query(64, p, layer_index=0), hca)
  np.testing.assert_allclose(spec.keys_per_query(64, p), (csa + hca) / 2)
  assert "csa_hca" not in registry.comparable_names()


@pytest.mark.parametrize("kind,ratio", [("csa", 3), ("hca", 3)])
def test_ragged_chunked_decode_equals_forward(kind, ratio):
  """Rows advance by random chunks (some longer than the ring, most not a
  multiple of ratio), each row taking a random number of its tokens and
  the rest random padding: every real token's output equals the forward."""
  layer = _layer(kind, ratio=ratio)
  rng = np.random.default_rng(ratio)
  lens = np.array([26, 17, 23])
  x = jax.random.normal(jax.random.key(5), (3, int(lens.max()), E))
  want = np.asarray(_fwd(layer, x, "sparse")[0])  # causal: rows' prefixes
  chunks = (1, 5, 4 * ratio + 1)

  @nnx.jit
  def step(layer, x, pos, kv_lengths, cache):
    return layer(x, positions=pos, kv_lengths=kv_lengths, cache=cache)

  cache = layer.init_cache(3, int(lens.max()) + max(chunks))
  done = np.zeros(3, int)
  while (done < lens).any():
    t = int(rng.choice(chunks))
    take = np.minimum(
      np.where(rng.random(3) < 0.5, rng.integers(0, t + 1, 3), t), lens - done
    )
    xc = np.array(
      jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (3, t, E))
    )
    for b in range(3):
      xc[b, : take[b]] = np.asarray(x[b, done[b] : done[b] + take[b]])
    pos = jnp.asarray(done[:, None] + np.arange(t), jnp.int32)
    y, _, cache = step(
      layer, jnp.asarray(xc), pos, jnp.asarray(done + take, jnp.int32), cache
    )
    for b in range(3):
      got = np.asarray(y[b, : take[b]])
      np.testing.assert_allclose(
        got, want[b][done[b] : done[b] + take[b]], atol=2e-5
      )
    done = done + take
