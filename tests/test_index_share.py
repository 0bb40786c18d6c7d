"""Top-k reuse across layers (IndexCache): roles, the reused selection, the
multi-layer distillation loss, caches, the greedy search and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn import registry
from sparse_attn.config import ModelConfig, override, tiny, validate
from sparse_attn.models import build_model, count_params
from sparse_attn.nn.dsa import DSAAttention
from sparse_attn.nn.index_share import every_n_pattern, group_sizes
from sparse_attn.ops.attention import gathered_attention
from sparse_attn.ops.losses import dense_indexer_kl
from sparse_attn.training import index_share as search


def _model(kind="dsa", num_layers=4, seed=1, **params):
  cfg = ModelConfig(
    embed_dim=32,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention=kind,
    top_k=6,
    indexer_heads=4,
    indexer_dim=8,
    attention_params=params,
  )
  return build_model(cfg, seed=seed)


TOKENS = jax.random.randint(jax.random.key(0), (2, 41), 0, 256)


def test_roles_groups_and_parameters():
  m = _model(indexer_every=2)
  assert [b.attn.index_role for b in m.blocks] == ["full", "shared"] * 2
  assert [b.attn.index_group_size for b in m.blocks] == [2, 2, 2, 2]
  assert all(
    (b.attn.indexer is None) == (i % 2 == 1) for i, b in enumerate(m.blocks)
  )
  assert count_params(m)["indexer"] * 2 == count_params(_model())["indexer"]
  m = _model(indexer_layers=(0, 3))
  assert [b.attn.index_group_size for b in m.blocks] == [3, 3, 3, 1]
  assert every_n_pattern(6, 4) == (0, 4)
  assert group_sizes(["full", None, "shared", "full"]) == [2, 0, 2, 1]
  # the kind is the option with one indexer every 2 layers
  k = _model("indexcache")
  assert [b.attn.index_role for b in k.blocks] == ["full", "shared"] * 2


def test_every_layer_full_is_plain_dsa():
  a, b = _model(indexer_layers=(0, 1, 2, 3)), _model()
  for mode in ("warmup", "sparse"):
    la, xa = a(TOKENS, mode=mode)
    lb, xb = b(TOKENS, mode=mode)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert float(xa["indexer_kl"]) == float(xb["indexer_kl"])


def test_shared_layer_attends_the_full_layers_selection():
  """Layer-level: the reusing layer's output is gathered attention of its
  own q/k/v over exactly the indices the full layer exported."""
  kw = dict(top_k=5, indexer_heads=2, indexer_dim=8, indexer_every=2)
  full = DSAAttention(16, 4, 2, 8, layer_index=0, rngs=nnx.Rngs(0), **kw)
  shared = DSAAttention(16, 4, 2, 8, layer_index=1, rngs=nnx.Rngs(1), **kw)
  x0 = jax.random.normal(jax.random.key(2), (2, 19, 16))
  x1 = jax.random.normal(jax.random.key(3), (2, 19, 16))
  _, aux = full(x0, mode="sparse")
  s = aux["index_share"]
  want_idx = s.indices
  assert want_idx.shape == (2, 19, 5)
  y, aux1 = shared(x1, mode="sparse", shared=s)
  q, k, v = shared.project(x1, jnp.broadcast_to(jnp.arange(19), (2, 19)))
  want = shared.output(gathered_attention(q, k, v, want_idx))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-6)
  assert "index_share" not in aux1
  with pytest.raises(ValueError, match="needs its SharedIndex"):
    shared(x1, mode="sparse")
  with pytest.raises(ValueError, match="has no indexer"):
    shared.index(x1, jnp.zeros((2, 19), jnp.int32))


def test_distillation_loss_is_the_group_mean_and_trains_the_full_indexer():
  """Warm-up: the model's KL is, per group, the mean over its layers of
  KL(layer's dense attention || the full layer's indexer); the shared
  layers' terms reach the full layer's indexer. Without distillation only
  the full layers' own KLs count."""
  m = _model(num_layers=2, indexer_every=2)
  off = _model(num_layers=2, indexer_every=2, index_share_distill=False)
  nnx.update(off, nnx.state(m))
  x = m.embed_tokens(TOKENS)
  pos = jnp.broadcast_to(jnp.arange(41), (2, 41))
  b0, b1 = m.blocks
  h0 = b0.attn_norm(x)
  q_idx, k_idx, w = b0.attn.index(h0, pos)
  q0, k0, _ = b0.attn.project(h0, pos)
  x1, _ = b0(x, positions=pos, kv_lengths=None, mode="warmup")
  q1, k1, _ = b1.attn.project(b1.attn_norm(x1), pos)
  kl0 = dense_indexer_kl(q0, k0, q_idx, k_idx, w)
  kl1 = dense_indexer_kl(q1, k1, q_idx, k_idx, w)
  _, aux = m(TOKENS, mode="warmup")
  assert float(aux["indexer_kl"]) == pytest.approx(
    float(0.5 * (kl0 + kl1)), rel=1e-5
  )
  _, aux_off = off(TOKENS, mode="warmup")
  assert float(aux_off["indexer_kl"]) == pytest.approx(float(kl0), rel=1e-5)

  def model_kl(model):
    return model(TOKENS, mode="warmup")[1]["indexer_kl"]

  # with distillation: 0.5 grad(kl0) + 0.5 grad(kl1); without: grad(kl0)
  g, g_off = nnx.grad(model_kl)(m), nnx.grad(model_kl)(off)
  ind = lambda gr: jax.tree.leaves(nnx.state(gr.blocks[0].attn.indexer))
  half_kl1 = sum(
    float(jnp.abs(a - 0.5 * b).sum()) for a, b in zip(ind(g), ind(g_off))
  )
  assert half_kl1 > 0  # the shared layer's KL moves the full layer's indexer
  assert float(jnp.abs(g.blocks[1].attn.wq[...]).sum()) == 0  # KL: no trunk


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_trains_with_finite_gradients(mode):
  m = _model(indexer_every=2)

  def loss(model):
    logits, aux = model(TOKENS[:, :-1], mode=mode)
    ce = -jnp.mean(
      jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], -1)
    )
    return ce + aux["indexer_kl"]

  grads = nnx.grad(loss)(m)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nnx.state(grads)))
  assert float(jnp.abs(grads.blocks[1].attn.wq[...]).sum()) > 0


def test_greedy_search_flips_the_cheapest_layer_each_step():
  """Each step's loss is the minimum over the remaining candidates, and the
  chosen pattern's model computes that loss."""
  model = _model(num_layers=3)
  batches = [TOKENS, jax.random.randint(jax.random.key(5), (2, 41), 0, 256)]
  steps = search.greedy_index_share(model, batches)
  assert [s.indexer_layers for s in steps][0] == (0, 1, 2)
  assert len(steps) == 3 and steps[-1].indexer_layers == (0,)
  first = {
    layer: search.calibration_loss(
      search.with_index_pattern(model, [i for i in (0, 1, 2) if i != layer]),
      batches,
    )
    for layer in (1, 2)
  }
  best = min(first, key=lambda l: (first[l], l))
  assert steps[1].flipped == best
  assert steps[1].loss == pytest.approx(first[best])
  assert steps[0].loss == pytest.approx(search.calibration_loss(model, batches))
  with pytest.raises(ValueError, match="num_shared must be in"):
    search.greedy_index_share(model, batches, num_shared=3)
  with pytest.raises(ValueError, match="already reuse"):
    search.greedy_index_share(_model(num_layers=2, indexer_every=2), batches)


def test_with_index_pattern_keeps_the_weights():
  model = _model()
  shared = search.with_index_pattern(model, (0, 2))
  assert shared.blocks[1].attn.indexer is None
  np.testing.assert_array_equal(
    np.asarray(shared.blocks[2].attn.indexer.w_weights[...]),
    np.asarray(model.blocks[2].attn.indexer.w_weights[...]),
  )
  np.testing.assert_array_equal(
    np.asarray(shared.blocks[1].attn.wq[...]),
    np.asarray(model.blocks[1].attn.wq[...]),
  )


def test_errors():
  with pytest.raises(ValueError, match="none precedes it"):
    _model(indexer_layers=(1, 2))
  with pytest.raises(ValueError, match="indexer_layers must hold"):
    registry.get("dsa").make_params(indexer_layers=(0, -1))
  with pytest.raises(ValueError, match="indexer_layers must be a tuple"):
    registry.get("dsa").make_params(indexer_layers=3)
  with pytest.raises(ValueError, match="indexer_every must be"):
    registry.get("dsa").make_params(indexer_every=0)
  cfg = override(
    tiny(),
    "train.mesh_shape=[1, 1, 1, 2]",
    'model.attention_params={"indexer_every": 2}',
  )
  with pytest.raises(ValueError, match="top-k reuse across layers"):
    validate(cfg, num_devices=2)


def test_hf_formats_refuse_shared_layers():
  from sparse_attn.hf import deepseek_v32

  cfg = ModelConfig(
    attention="mla_dsa",
    scale_embeddings=False,
    attention_params={
      "q_lora_rank": 16,
      "kv_lora_rank": 16,
      "qk_nope_head_dim": 8,
      "qk_rope_head_dim": 4,
      "v_head_dim": 8,
      "indexer_every": 2,
    },
    indexer_rope_dim=4,
  )
  with pytest.raises(ValueError, match="reuses top-k across layers"):
    deepseek_v32.config_to_hf(cfg)
