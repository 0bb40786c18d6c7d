"""The decoder-only transformer: shapes, aux, modes, registry, axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn import models as M
from sparse_attn import registry
from sparse_attn.config import ModelConfig
from sparse_attn.nn import DenseAttention

CFG = ModelConfig(
  embed_dim=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  top_k=4,
  indexer_heads=2,
  indexer_dim=8,
)


def _run(model, tok, mode="sparse"):
  """Jitted forward (eager NNX dispatch is slow on CPU)."""
  return nnx.jit(lambda m, t: m(t, mode=mode))(model, tok)


def _tokens(b=2, t=12, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32
  )


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_forward_shapes_and_aux(mode):
  model = M.build_model(CFG)
  logits, aux = _run(model, _tokens(), mode)
  assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
  assert set(aux) == {
    "indexer_kl",
    "attended_keys",
    "visible_keys",
    "attended_fraction",
  }
  visible = 2 * 2 * sum(range(1, 13))  # layers * batch * causal pairs
  assert float(aux["visible_keys"]) == visible
  if mode == "sparse":
    attended = 2 * 2 * sum(min(t, 4) for t in range(1, 13))
    assert float(aux["attended_keys"]) == attended
    assert float(aux["attended_fraction"]) == pytest.approx(attended / visible)
  else:
    assert float(aux["attended_fraction"]) == 1.0
  if mode == "dense":
    assert float(aux["indexer_kl"]) == 0.0
  else:
    assert float(aux["indexer_kl"]) > 0.0


def test_sparse_with_topk_covering_all_keys_equals_dense():
  model = M.build_model(dataclasses.replace(CFG, top_k=16))
  tok = _tokens()
  dense, _ = _run(model, tok, "dense")
  sparse, _ = _run(model, tok, "sparse")
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["dense", "dsa"])
def test_causal(attention):
  model = M.build_model(dataclasses.replace(CFG, attention=attention))
  a = _tokens(seed=1)
  b = a.at[:, 8:].set((a[:, 8:] + 7) % 256)
  la, _ = _run(model, a)
  lb, _ = _run(model, b)
  np.testing.assert_allclose(la[:, :8], lb[:, :8], atol=1e-5)
  assert not np.allclose(la[:, 8:], lb[:, 8:])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv", [1, 4])
def test_tied_untied_gqa_mqa(tie, kv):
  cfg = dataclasses.replace(
    CFG, tie_embeddings=tie, num_kv_heads=kv, attention="dense", num_layers=1
  )
  model = M.build_model(cfg)
  logits, _ = _run(model, _tokens(1, 5))
  assert logits.shape == (1, 5, 256)
  assert hasattr(model, "unembed") != tie
  assert model.blocks[0].attn.wk.shape == (32, kv, 8)


def test_parameter_groups_and_logical_axes():
  model = M.build_model(CFG)
  counts = M.count_params(model)
  assert counts["indexer"] > 0 and counts["main"] > 0
  dense = M.build_model(dataclasses.replace(CFG, attention="dense"))
  assert M.count_params(dense)["indexer"] == 0
  assert M.count_params(dense)["main"] == counts["main"]
  missing = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
      missing.append(path)
    else:
      assert len(axes) == var.get_value().ndim, path
  # Only the indexer's k LayerNorm (built by nnx.LayerNorm) is untagged; it
  # is replicated by the sharding rules.
  assert all("k_norm" in p for p in missing), missing


def test_registry_is_extensible():
  class Doubled(DenseAttention):
    pass

  registry.register(
    dataclasses.replace(
      registry.get("dense"), name="test_doubled", layer=Doubled
    )
  )
  try:
    model = M.build_model(dataclasses.replace(CFG, attention="test_doubled"))
    assert isinstance(model.blocks[0].attn, Doubled)
    assert not registry.has_indexer("test_doubled")
    assert registry.has_indexer("dsa")
    _run(model, _tokens(1, 4))
  finally:
    registry.unregister("test_doubled")
  assert "test_doubled" not in registry.names()


def test_first_api_registration_still_works():
  """register_attention(name, factory) and the ATTENTION_KINDS view."""

  class Doubled(DenseAttention):
    pass

  registry.register_attention(
    "test_legacy",
    lambda cfg, *, rngs: Doubled(
      cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rngs=rngs
    ),
  )
  try:
    assert "test_legacy" in registry.ATTENTION_KINDS
    model = M.build_model(dataclasses.replace(CFG, attention="test_legacy"))
    assert isinstance(model.blocks[0].attn, Doubled)
    assert not registry.kind_has_indexer("test_legacy")
  finally:
    registry.unregister("test_legacy")
  assert "test_legacy" not in registry.ATTENTION_KINDS


def test_bad_inputs_raise():
  model = M.build_model(dataclasses.replace(CFG, num_layers=1))
  with pytest.raises(ValueError, match="mode"):
    model(_tokens(), mode="bogus")
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((2, 3, 4), jnp.int32))
  with pytest.raises(ValueError, match="unknown attention"):
    M.build_model(dataclasses.replace(CFG, attention="nope"))


def test_jit_and_grad():
  model = M.build_model(dataclasses.replace(CFG, num_layers=1))

  @nnx.jit
  def loss(m, tok):
    logits, aux = m(tok, mode="sparse")
    return jnp.mean(logits**2) + aux["indexer_kl"]

  grads = nnx.grad(loss)(model, _tokens())
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
  "family,name",
  [
    ("transformer", "tiny"),
    ("transformer", "small"),
    ("transformer", "base"),
    ("deepseek_v32", "tiny"),
    ("deepseek_v32", "small"),
  ],
)
def test_preset_docstrings_state_the_real_parameter_count(family, name):
  import re  # pylint: disable=g-import-not-at-top

  from sparse_attn import config  # pylint: disable=g-import-not-at-top

  cfg = config.preset(name, model=family)
  model = nnx.eval_shape(lambda: M.Transformer(cfg.model, rngs=nnx.Rngs(0)))
  total = sum(M.count_params(model).values())
  doc = config.MODELS[family][name].__doc__
  stated = float(re.match(r"([\d.]+)M params", doc).group(1)) * 1e6
  assert abs(stated - total) <= 0.006e6 * max(1, stated / 1e6), (doc, total)


def test_kernel_block_sizes_reach_the_kernels_from_the_config():
  """model.kernel_block_sizes -> every layer -> the Pallas calls."""
  cfg = dataclasses.replace(CFG, num_layers=1, implementation="pallas")
  tok = _tokens(1, 16)
  ref, _ = _run(M.build_model(cfg), tok)
  ok = dataclasses.replace(
    cfg,
    kernel_block_sizes={
      "topk": {"block_t": 16},
      "gathered_attention": {"bwd_chunk_t": 3},
    },
  )
  model = M.build_model(ok)
  attn = model.blocks[0].attn
  assert attn.topk_block_sizes.block_t == 16
  assert attn.attention_block_sizes.bwd_chunk_t == 3
  got, _ = _run(model, tok)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # Sizes the (interpreted) TPU formulation cannot take fail in the kernel.
  bad = M.build_model(
    dataclasses.replace(cfg, kernel_block_sizes={"topk": {"block_t": 12}})
  )
  with pytest.raises(ValueError, match="multiple of 8"):
    _run(bad, tok)
  with pytest.raises(ValueError, match="unknown kernels"):
    DenseAttention(32, 4, 2, 8, block_sizes={"flash": {}}, rngs=nnx.Rngs(0))
