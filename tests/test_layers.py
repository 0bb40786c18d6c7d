import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparse_attn as sa


def make_dsa(top_k=4, **kw):
  return sa.DSAAttention(
    32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    top_k=top_k,
    indexer_heads=2,
    indexer_dim=8,
    rngs=nnx.Rngs(0),
    **kw,
  )


def _split(layer):
  """(indexer params, main params) as separate states."""
  graphdef, idx_state, main_state = nnx.split(
    layer,
    lambda path, v: isinstance(v, nnx.Param) and "indexer" in path,
    nnx.Param,
  )
  return graphdef, idx_state, main_state


@pytest.fixture
def x():
  return jax.random.normal(jax.random.key(1), (2, 12, 32))


def test_same_call_signature(x):
  dense = sa.DenseAttention(32, 4, 2, 8, rngs=nnx.Rngs(0))
  dsa = make_dsa()
  call = nnx.jit(lambda layer, x, mode: layer(x, mode=mode), static_argnums=2)
  for layer in (dense, dsa):
    for mode in ("dense", "warmup", "sparse"):
      y, aux = call(layer, x, mode)
      assert y.shape == x.shape
      assert set(aux) == {"indexer_kl", "attended_keys", "visible_keys"}
  with pytest.raises(ValueError, match="mode"):
    dsa(x, mode="fast")
  with pytest.raises(ValueError, match=r"x must be \[B, T, E=32\]"):
    dsa(x[..., :5])


def test_dsa_full_budget_equals_dense(x):
  layer = make_dsa(top_k=12)
  y_sparse, aux = layer(x, mode="sparse")
  y_dense, _ = layer(x, mode="dense")
  np.testing.assert_allclose(y_sparse, y_dense, rtol=1e-5, atol=1e-5)
  assert aux["attended_keys"] == aux["visible_keys"] == 2 * 12 * 13 / 2


def test_dsa_budget_counts(x):
  layer = make_dsa(top_k=4)
  _, aux = layer(x, mode="sparse")
  # query t attends min(4, t+1) keys
  assert aux["attended_keys"] == 2 * sum(min(4, t + 1) for t in range(12))
  _, aux = layer(x, mode="sparse", kv_lengths=jnp.array([12, 3]))
  want = sum(min(4, t + 1) for t in range(12)) + sum(
    min(4, t + 1, 3) for t in range(12)
  )
  assert aux["attended_keys"] == want


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_gradient_isolation(x, mode):
  layer = make_dsa(top_k=5)
  graphdef, idx_state, main_state = _split(layer)

  def run(idx_state, main_state, x):
    y, aux = nnx.merge(graphdef, idx_state, main_state)(x, mode=mode)
    return jnp.sum(y**2), aux["indexer_kl"]

  # jitted: eager op-by-op dispatch of the backward is the slow part here.
  lm_grads = jax.jit(jax.grad(lambda i, m, x: run(i, m, x)[0], argnums=(0, 1)))(
    idx_state, main_state, x
  )
  kl_grads = jax.jit(
    jax.grad(lambda i, m, x: run(i, m, x)[1], argnums=(0, 1, 2))
  )(idx_state, main_state, x)
  leaves = lambda t: jax.tree.leaves(t)
  # LM path: nothing reaches the indexer; the main model does learn.
  assert all(np.all(g == 0) for g in leaves(lm_grads[0]))
  assert any(np.any(g != 0) for g in leaves(lm_grads[1]))
  # Indexer KL: only the indexer learns; neither main params nor the input get gradient.
  assert any(np.any(g != 0) for g in leaves(kl_grads[0]))
  assert all(np.all(g == 0) for g in leaves(kl_grads[1]))
  assert np.all(kl_grads[2] == 0)


def test_logical_axes_on_every_param():
  layer = make_dsa()
  state = nnx.state(layer, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, (path, axes)


def test_layer_validation():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    sa.DenseAttention(32, 6, 4, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="top_k"):
    make_dsa(top_k=0)


def test_layer_jit_bf16(x):
  layer = sa.DSAAttention(
    32, 4, 1, 8, top_k=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
  )
  y, aux = nnx.jit(lambda m, x: m(x, mode="sparse"))(layer, x)
  assert y.dtype == jnp.bfloat16 and np.all(
    np.isfinite(np.asarray(y, np.float32))
  )
  assert np.isfinite(aux["indexer_kl"])
