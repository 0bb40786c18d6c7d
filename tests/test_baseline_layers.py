"""The baseline attention layers behind the common AttentionLayer interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn import budgets, nn, registry
from sparse_attn.nn import AttentionLayer, DenseAttention

E, H, G, D, T = 24, 6, 3, 8, 37

# Small kind params so that T=37 is genuinely sparse for every kind.
KINDS = [
  pytest.param("sliding_window", dict(window=5), id="sliding_window"),
  pytest.param("strided", dict(stride=4, combine="split"), id="strided"),
  pytest.param("fixed", dict(stride=8, summary=2), id="fixed"),
  pytest.param("lsh", dict(n_buckets=4, n_hashes=2, chunk_size=4), id="lsh"),
  pytest.param(
    "nsa",
    dict(
      cmp_block=8,
      cmp_stride=4,
      select_block=8,
      num_selected=4,
      window=4,
      compress="mean",
    ),
    id="nsa_mean",
  ),
  pytest.param(
    "nsa",
    dict(
      cmp_block=8,
      cmp_stride=4,
      select_block=8,
      num_selected=2,
      num_initial=0,
      num_local=1,
      window=4,
      independent_kv=False,
    ),
    id="nsa_shared_kv",
  ),
  pytest.param(
    "nsa",
    dict(
      cmp_block=4,
      cmp_stride=4,
      select_block=8,
      num_selected=4,
      window=4,
      compress="mlp",
    ),
    id="nsa_mlp",
  ),
  pytest.param("moba", dict(block_size=8, top_k=2), id="moba"),
]


def test_registry():
  assert set(registry.BASELINE_LAYERS) == {
    "sliding_window",
    "strided",
    "fixed",
    "lsh",
    "nsa",
    "moba",
    "hca",
  }
  for cls in registry.BASELINE_LAYERS.values():
    assert issubclass(cls, AttentionLayer)
    layer = cls(
      16,
      4,
      2,
      8,
      layer_index=3,
      rope_base=500.0,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs=nnx.Rngs(0),
    )
    assert layer.layer_index == 3 and layer.rope_base == 500.0
    for p in jax.tree.leaves(
      nnx.state(layer, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Param)
    ):
      assert len(p.logical_axes) == p[...].ndim


@pytest.mark.parametrize("kind,params", KINDS)
def test_layer_jit_grad_causal_and_counts(kind, params):
  layer = registry.BASELINE_LAYERS[kind](E, H, G, D, rngs=nnx.Rngs(0), **params)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (2, T, E))
  t = 20
  x2 = x.at[:, t:].add(jax.random.normal(jax.random.key(2), (2, T - t, E)))

  @jax.jit
  def run(state, x, x2):
    def loss(state):
      y, aux = nnx.merge(graphdef, state)(x, mode="sparse")
      return jnp.mean(y**2), (y, aux)

    (l, (y, aux)), grads = jax.value_and_grad(loss, has_aux=True)(state)
    y2, _ = nnx.merge(graphdef, state)(x2, mode="dense")
    return y, aux, grads, y2

  y, aux, grads, y2 = run(state, x, x2)
  assert y.shape == x.shape
  assert set(aux) == {"indexer_kl", "attended_keys", "visible_keys"}
  assert float(aux["indexer_kl"]) == 0.0
  assert float(aux["visible_keys"]) == 2 * T * (T + 1) / 2
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert all(np.any(np.asarray(g) != 0) for g in leaves)  # every param learns
  # No future leakage: changing tokens >= t leaves outputs < t unchanged.
  np.testing.assert_allclose(y2[:, :t], y[:, :t], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y2[:, t:], y[:, t:])
  attended = float(aux["attended_keys"])
  if kind == "lsh":
    assert 2 * T <= attended <= 2 * 2 * 4 * T  # >= 1 key, <= rounds*(c+1) each
  else:
    want = 2 * budgets.key_budget(kind, T, num_heads=H, **params) * T
    assert attended == pytest.approx(want)
    if kind != "nsa":  # NSA's branches may attend a key more than once
      assert attended < float(aux["visible_keys"])


def test_kv_lengths_and_interface_match_dense():
  x = jax.random.normal(jax.random.key(3), (2, 12, E))
  kv = jnp.array([12, 7])
  dense = DenseAttention(E, H, G, D, rngs=nnx.Rngs(0))
  y_dense, aux_dense = dense(x, kv_lengths=kv)
  # Budgets covering the whole sequence reproduce dense attention (same
  # weights: the q/k/v/o projections are drawn first from the same Rngs).
  full = {
    "sliding_window": dict(window=12),
    "strided": dict(stride=12),
    "moba": dict(block_size=4, top_k=3),
  }
  for kind, params in full.items():
    layer = registry.BASELINE_LAYERS[kind](
      E, H, G, D, rngs=nnx.Rngs(0), **params
    )
    y, aux = nnx.jit(lambda l, x: l(x, kv_lengths=kv))(layer, x)
    np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-5)
    assert aux["attended_keys"] == aux_dense["visible_keys"]


def test_alternate_uses_layer_parity():
  x = jax.random.normal(jax.random.key(4), (1, 16, E))
  counts = []
  for li in (0, 1, 2):
    layer = nn.StridedAttention(
      E,
      H,
      G,
      D,
      stride=4,
      combine="alternate",
      layer_index=li,
      rngs=nnx.Rngs(0),
    )
    counts.append(float(layer(x)[1]["attended_keys"]))
  assert (
    counts[0]
    == counts[2]
    == budgets.key_budget(
      "strided", 16, stride=4, combine="alternate", layer_index=0
    )
    * 16
  )
  assert (
    counts[1]
    == budgets.key_budget(
      "strided", 16, stride=4, combine="alternate", layer_index=1
    )
    * 16
  )
  assert counts[0] != counts[1]


def test_key_budgets_and_matching():
  n = 1024
  assert budgets.key_budget("dense", n) == (n + 1) / 2
  assert budgets.key_budget("sliding_window", n, window=1) == 1.0
  assert budgets.key_budget("dsa", n, top_k=n) == (n + 1) / 2
  # Defaults come from the kind's params dataclass.
  assert budgets.key_budget("moba", n) == budgets.key_budget(
    "moba", n, **{k: v for k, v in registry.get("moba").defaults.items()}
  )
  for kind in (
    "dsa",
    "sliding_window",
    "strided",
    "fixed",
    "lsh",
    "nsa",
    "moba",
  ):
    # NSA's floor at its CPU preset is ~134 keys (the compressed branch, the
    # window and the 3 always-selected blocks); LSH's ceiling with 8 buckets
    # and 2 rounds ~120.
    target = 160.0 if kind == "nsa" else 96.0
    params = budgets.match_budget(kind, n, target)
    got = budgets.key_budget(kind, n, **params)
    assert abs(got - target) / target < 0.1, (kind, params, got)
  p = budgets.match_budget("sliding_window", n, 100.0)
  assert p["window"] == int(
    round(
      np.argmin(
        [
          abs(budgets.key_budget("sliding_window", n, window=w) - 100)
          for w in range(1, n + 1)
        ]
      )
      + 1
    )
  )
  with pytest.raises(ValueError, match="unknown attention kind"):
    budgets.key_budget("bigbird", n)


def test_bfloat16_forward():
  x = jax.random.normal(jax.random.key(5), (1, 16, E))
  layer = nn.MoBAAttention(
    E, H, G, D, block_size=4, top_k=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
  )
  y, aux = nnx.jit(lambda l, x: l(x))(layer, x)
  assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, float)))


def test_match_budget_long_sequences_use_a_grid():
  """Above 1024 the free parameter runs over a 1.25x grid; still close."""
  cands = budgets.candidates(40_000)
  assert cands[:1024] == list(range(1, 1025)) and cands[-1] == 40_000
  assert all(b / a <= 1.26 for a, b in zip(cands[1023:], cands[1024:]))
  for kind in ("sliding_window", "moba", "nsa"):
    target = budgets.key_budget("dsa", 32768, top_k=2048)
    params = budgets.match_budget(kind, 32768, target)
    got = budgets.key_budget(kind, 32768, **params)
    assert abs(got - target) / target < 0.15, (kind, params, got)


def test_match_budget_at_the_decode_position():
  """at="last" matches the keys of the last query (a decode step): HCA's
  grow with the position, so its ratio doubles against the mean match."""
  n = 4096
  mean = budgets.match_budget("hca", n, 128.0)
  last = budgets.match_budget("hca", n, 128.0, at="last")
  counts = budgets.keys_per_query("hca", n, **last)
  assert abs(counts[-1] - 128.0) <= 4, (last, counts[-1])
  assert last["ratio"] > 1.8 * mean["ratio"], (mean, last)
  with pytest.raises(ValueError, match="at must be"):
    budgets.match_budget("hca", n, 128.0, at="first")


def test_kind_params_are_validated():
  with pytest.raises(ValueError, match="window"):
    registry.get("sliding_window").make_params(window=0)
  with pytest.raises(ValueError, match="not parameters of attention kind"):
    registry.get("moba").make_params(window=3)
  with pytest.raises(ValueError, match="summary"):
    registry.get("fixed").make_params(stride=2, summary=3)


def test_nsa_layer_is_the_papers():
  """Independent K/V per branch on one [E, 3G, D] projection (and cache),
  gates from an MLP + sigmoid, phi an MLP with intra-block positions."""
  from sparse_attn.nn import NSAAttention

  layer = NSAAttention(32, 4, 2, 8, rngs=nnx.Rngs(0))
  assert layer.wk.shape == layer.wv.shape == (32, 6, 8)
  assert layer.w_gate1.shape == (32, 8) and layer.w_gate2.shape == (8, 4, 3)
  assert layer.params.compress == "mlp" and layer.cmp_pos_k.shape == (16, 8)
  cache = layer.init_cache(2, 64)
  assert cache.k.shape == (2, 64, 6, 8)
  x = jax.random.normal(jax.random.key(0), (2, 40, 32))
  g = np.asarray(layer.gates(x))
  assert g.shape == (2, 40, 4, 3) and ((g > 0) & (g < 1)).all()
  # Each branch reads its own slice of the K/V heads.
  y, _ = layer(x)
  w = layer.wk[...]
  layer.wk[...] = w.at[:, 2::3].add(1.0)  # the window branch's keys only
  y2, _ = layer(x)
  assert not np.allclose(y, y2)
  shared = NSAAttention(32, 4, 2, 8, independent_kv=False, rngs=nnx.Rngs(0))
  assert shared.wk.shape == (32, 2, 8)


def test_nsa_from_a_dense_model_starts_each_branch_with_its_kv():
  """A dense checkpoint fills every NSA branch's K/V (group-major copies),
  through training.init_from and the kind's dense_copies."""
  from sparse_attn import training as T
  from sparse_attn.config import override, tiny

  base = override(
    tiny(), "model.num_layers=1", "train.mesh_shape=[1,1,1]",
    'model.attention="dense"',
  )  # fmt: skip
  nsa_cfg = override(base, 'model.attention="nsa"')
  dev = jax.devices()[:1]
  dense = T.init_state(T.setup(base, dev))
  nsa_state = T.init_state(T.setup(nsa_cfg, dev))
  state, moved = T.init_from(
    nsa_state,
    dense["params"]["main"],
    repeat=registry.get("nsa").dense_copies,
  )
  assert {
    "['blocks'][0]['attn']['wk'].value",
    "['blocks'][0]['attn']['wv'].value",
  } <= set(moved.repeated)
  wk = state["params"]["main"]["blocks"][0]["attn"]["wk"][...]
  dense_wk = dense["params"]["main"]["blocks"][0]["attn"]["wk"][...]
  g = dense_wk.shape[1]
  for branch in range(3):
    np.testing.assert_array_equal(wk[:, branch::3], dense_wk)
  assert wk.shape[1] == 3 * g
