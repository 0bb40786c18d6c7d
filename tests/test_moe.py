"""DeepSeek MoE: routing as HF's DeepseekV32TopkRouter, the plain dispatch
against a per-token loop, validation, and the model's layer pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn.config import ModelConfig
from sparse_attn.models import build_model
from sparse_attn.nn import MoE, MoEParams, SwiGLU
from sparse_attn.nn.moe import route


def _np_route(x, w, bias, p):
  """HF's router, one token at a time (sigmoid, top-2 group sums)."""
  out_e, out_w = [], []
  for row in x.astype(np.float64):
    scores = 1 / (1 + np.exp(-(row @ w)))
    choice = scores + bias
    per = p.num_experts // p.num_groups
    groups = choice.reshape(p.num_groups, per)
    gscore = np.sort(groups, -1)[:, -2:].sum(-1)
    keep = np.argsort(-gscore)[: p.groups_per_token]
    mask = np.full(p.num_experts, -np.inf)
    for g in keep:
      mask[g * per : (g + 1) * per] = 0.0
    experts = np.argsort(-(choice + mask))[: p.experts_per_token]
    weights = scores[experts]
    if p.norm_topk_prob:
      weights = weights / (weights.sum() + 1e-20)
    out_e.append(experts)
    out_w.append(weights * p.routed_scaling_factor)
  return np.array(out_e), np.array(out_w)


P = MoEParams(
  num_experts=8,
  experts_per_token=3,
  expert_dim=8,
  num_shared_experts=1,
  num_groups=4,
  groups_per_token=2,
  routed_scaling_factor=2.5,
)


def test_routing_matches_hf_router():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  bias = rng.normal(size=(8,)).astype(np.float32) * 0.3
  experts, weights = route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), P)
  want_e, want_w = _np_route(x, w, bias, P)
  got = np.sort(np.asarray(experts), -1)
  np.testing.assert_array_equal(got, np.sort(want_e, -1))
  order = np.argsort(np.asarray(experts), -1)
  np.testing.assert_allclose(
    np.take_along_axis(np.asarray(weights), order, -1),
    np.take_along_axis(want_w, np.argsort(want_e, -1), -1),
    rtol=1e-5,
  )
  # only experts of the kept groups: 2 groups of 2 -> at most 4 experts
  groups = np.asarray(experts) // 2
  assert all(len(set(r)) <= 2 for r in groups)


def test_dispatch_matches_a_per_token_loop():
  moe = MoE(16, P, rngs=nnx.Rngs(0))
  moe.router_bias[...] = jax.random.normal(jax.random.key(1), (8,)) * 0.1
  x = jax.random.normal(jax.random.key(2), (2, 5, 16))
  y = np.asarray(moe(x))
  experts, weights = route(
    x.reshape(-1, 16), moe.router[...], moe.router_bias[...], P
  )
  gate, up, down = (
    np.asarray(getattr(moe, n)[...]) for n in ("gate", "up", "down")
  )
  shared = np.asarray(moe.shared(x)).reshape(-1, 16)
  xs = np.asarray(x).reshape(-1, 16)
  for n in range(xs.shape[0]):
    want = shared[n].copy()
    for e, wt in zip(np.asarray(experts)[n], np.asarray(weights)[n]):
      g, u = xs[n] @ gate[e], xs[n] @ up[e]
      want += wt * ((g / (1 + np.exp(-g)) * u) @ down[e])
    np.testing.assert_allclose(y.reshape(-1, 16)[n], want, rtol=1e-4, atol=1e-5)


def test_params_validation():
  with pytest.raises(ValueError, match="divisible by num_groups"):
    MoEParams(num_experts=6, num_groups=4)
  with pytest.raises(ValueError, match="top-2"):
    MoEParams(num_experts=4, num_groups=4, groups_per_token=2)
  with pytest.raises(ValueError, match="exceeds"):
    MoEParams(
      num_experts=8, num_groups=4, groups_per_token=1, experts_per_token=3
    )
  with pytest.raises(ValueError, match="score_func"):
    MoEParams(score_func="relu")


def test_model_layers_dense_then_moe_and_gradients():
  cfg = ModelConfig(
    embed_dim=16,
    num_layers=3,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=32,
    attention="dense",
    moe=dict(
      num_experts=4,
      experts_per_token=2,
      expert_dim=8,
      num_groups=2,
      groups_per_token=1,
      first_dense_layers=1,
    ),
  )
  model = build_model(cfg)
  kinds = [type(b.mlp) for b in model.blocks]
  assert kinds == [SwiGLU, MoE, MoE]
  tokens = jnp.arange(20).reshape(2, 10)

  def loss(model):
    return jnp.mean(model(tokens, mode="dense")[0] ** 2)

  g = nnx.jit(nnx.grad(loss))(model)
  for n in ("gate", "up", "down", "router"):
    assert float(jnp.abs(getattr(g.blocks[1].mlp, n)[...]).max()) > 0, n
  # the correction bias only selects: no gradient
  assert float(jnp.abs(g.blocks[1].mlp.router_bias[...]).max()) == 0.0
