"""MLA and DSA on MLA: the two execution forms, scale, caches, gradients.

MHA form (per-head K/V) and absorbed form (W_UK folded into q, one latent
kv head) must give the same outputs and gradients (f32, measured max
|diff| ~2e-7; asserted 1e-5).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_attn import registry
from sparse_attn.nn import (
  MLAAttention,
  MLADSAAttention,
  MLADSAParams,
  MLAParams,
)
from sparse_attn.nn.base import Context
from sparse_attn.ops.attention import dense_attention
from sparse_attn.ops.rope import RopeScaling

TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = dict(
  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12
)
YARN = RopeScaling(
  type="yarn",
  factor=4.0,
  original_max_position_embeddings=8,
  mscale=0.9,
  mscale_all_dim=0.8,
)
DSA = dict(top_k=5, indexer_heads=4, indexer_dim=16)


def _layer(cls, form, q_lora_rank=24, rope_scaling=YARN, seed=0, **kw):
  extra = DSA if cls is MLADSAAttention else {}
  return cls(
    32,
    4,
    4,
    8,
    q_lora_rank=q_lora_rank,
    form=form,
    rope_scaling=rope_scaling,
    rngs=nnx.Rngs(seed),
    **SIZES,
    **{**extra, **kw},
  )


def _x(t=13, seed=1):
  return jax.random.normal(jax.random.key(seed), (2, t, 32))


# Dense MLA ignores `mode` (no indexer): one case; DSA on MLA: each stage.
FORM_CASES = [(MLAAttention, "dense")] + [
  (MLADSAAttention, mode) for mode in ("dense", "warmup", "sparse")
]


@pytest.mark.parametrize("cls,mode", FORM_CASES)
@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_mha_and_absorbed_forms_agree(cls, mode, q_lora_rank):
  """Outputs, the indexer KL and every gradient, with and without q LoRA."""
  x = _x()
  kv = jnp.array([13, 9], jnp.int32)
  res = {}
  for form in ("mha", "absorbed"):
    layer = _layer(cls, form, q_lora_rank)

    def loss(layer, x):
      y, aux = layer(x, kv_lengths=kv, mode=mode)
      return jnp.sum(y * jnp.cos(y)) + aux["indexer_kl"], (y, aux)

    (_, (y, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(layer, x)
    res[form] = (y, aux, grads)
  (y1, a1, g1), (y2, a2, g2) = res["mha"], res["absorbed"]
  np.testing.assert_allclose(y1, y2, **TOL)
  for key in a1:
    np.testing.assert_allclose(a1[key], a2[key], **TOL)
  for p1, p2 in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(p1, p2, atol=1e-4, rtol=1e-4)


def test_absorbed_form_is_mqa_over_the_latent():
  """One kv head, keys R + Dr wide, values R: the kernels' MQA shape."""
  layer = _layer(MLADSAAttention, "absorbed")
  x = _x()
  pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
  q, latent, v = layer.project(x, pos)
  assert latent.shape == (2, 13, 1, 16 + 4)
  np.testing.assert_array_equal(v, latent[..., :16])  # c_kv: the values
  assert q.shape == (2, 13, 4, 8 + 4)
  f = layer.forms(q, latent, "absorbed")
  assert f.q.shape == (2, 13, 4, 20) and f.k.shape == (2, 13, 1, 20)
  assert f.v.shape == (2, 13, 1, 16)
  m = layer.forms(q, latent, "mha")
  assert m.k.shape == (2, 13, 4, 12) and m.v.shape == (2, 13, 4, 12)


def test_auto_form_choice():
  layer = _layer(MLADSAAttention, "auto")
  ctx = lambda mode, t=4, cache=None: Context(  # noqa: E731
    jnp.zeros((1, t, 32)), jnp.zeros((1, t), jnp.int32), None, mode, cache=cache
  )
  assert layer.resolve_form(ctx("sparse")) == "absorbed"
  assert layer.resolve_form(ctx("dense")) == "mha"
  assert layer.resolve_form(ctx("warmup")) == "mha"
  assert layer.resolve_form(ctx("dense", t=1, cache=object())) == "absorbed"
  assert layer.resolve_form(ctx("dense", t=4, cache=object())) == "mha"


def test_scale_is_mla_scale_times_yarn_mscale_squared():
  """The layer passes its scale: (Dn + Dr) ** -0.5 * mscale**2, not D**-0.5."""
  layer = _layer(MLAAttention, "absorbed")
  assert layer.scale == pytest.approx(12**-0.5 * YARN.softmax_mscale())
  plain = _layer(MLAAttention, "mha", rope_scaling=None)
  assert plain.scale == pytest.approx(12**-0.5)
  # The output equals attention computed by hand at that scale (MHA form).
  x = _x()
  pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
  q, latent, _ = layer.project(x, pos)
  f = layer.forms(q, latent, "mha")
  want = layer.output(
    dense_attention(f.q, f.k, f.v, scale=12**-0.5 * YARN.softmax_mscale())
  )
  wrong = layer.output(dense_attention(f.q, f.k, f.v))  # D**-0.5 default
  got, _ = layer(x, mode="dense")
  np.testing.assert_allclose(got, want, **TOL)
  assert not np.allclose(got, wrong, atol=1e-4)


def test_no_future_leakage():
  for cls in (MLAAttention, MLADSAAttention):
    layer = _layer(cls, "auto")
    x = _x(16)
    y = layer(x, mode="sparse")[0]
    x2 = x.at[:, 10:].set(jax.random.normal(jax.random.key(9), (2, 6, 32)))
    y2 = layer(x2, mode="sparse")[0]
    np.testing.assert_allclose(y[:, :10], y2[:, :10], **TOL)
    assert not np.allclose(y[:, 10:], y2[:, 10:])


def test_indexer_reads_the_query_latent_and_its_loss_stays_there():
  """The indexer's query comes from c_q = q_norm(wq_a(x)); its KL reaches
  only the indexer (not wq_a, q_norm, nor the input), and the LM-side output
  never reaches the indexer."""
  layer = _layer(MLADSAAttention, "auto")
  assert layer.indexer.has_query_latent
  assert layer.indexer.wq.shape == (24, 4, 16)
  assert layer.indexer.rope_dim == 4  # qk_rope_head_dim, DeepSeek's choice
  x = _x()
  for mode in ("warmup", "sparse"):

    def kl(layer, x, mode=mode):
      return layer(x, mode=mode)[1]["indexer_kl"]

    def out(layer, x, mode=mode):
      return jnp.sum(layer(x, mode=mode)[0] ** 2)

    g_kl, gx_kl = nnx.grad(kl, argnums=(0, 1))(layer, x)
    g_out = nnx.grad(out)(layer, x)
    assert float(jnp.max(jnp.abs(gx_kl))) == 0.0
    for name in ("wq_a", "wq_b", "wkv_a", "w_uk", "w_uv", "wo"):
      assert float(jnp.max(jnp.abs(getattr(g_kl, name)[...]))) == 0.0, name
    assert float(jnp.max(jnp.abs(g_kl.q_norm.scale[...]))) == 0.0
    assert float(jnp.max(jnp.abs(g_kl.indexer.wq[...]))) > 0
    assert float(jnp.max(jnp.abs(g_kl.indexer.wk[...]))) > 0
    for leaf in jax.tree.leaves(nnx.state(g_out.indexer)):
      assert float(jnp.max(jnp.abs(leaf))) == 0.0


def test_topk_at_least_context_equals_dense_mla():
  x = _x()
  sparse = _layer(MLADSAAttention, "auto", top_k=64)
  dense_twin = _layer(MLAAttention, "auto")
  np.testing.assert_allclose(
    sparse(x, mode="sparse")[0], dense_twin(x, mode="dense")[0], **TOL
  )


def test_kernels_in_the_absorbed_shape_match_xla():
  """Sparse stage through the Pallas kernels (interpret mode on CPU)."""
  x = _x(9)
  outs = {}
  for impl in ("xla", "pallas"):
    layer = _layer(MLADSAAttention, "absorbed", implementation=impl)
    outs[impl] = layer(x, mode="sparse")[0]
  np.testing.assert_allclose(outs["xla"], outs["pallas"], atol=1e-4, rtol=1e-4)


def test_params_validation():
  with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
    MLAParams(qk_rope_head_dim=3)
  with pytest.raises(ValueError, match="form"):
    MLAParams(form="fused")
  with pytest.raises(ValueError, match="q_lora_rank"):
    MLAParams(q_lora_rank=0)
  with pytest.raises(ValueError, match="indexer_rope_dim"):
    MLADSAParams(qk_rope_head_dim=64, indexer_dim=32)
  with pytest.raises(ValueError, match="power of two"):
    MLADSAParams(indexer_dim=24, indexer_precision="fp8")
  assert registry.get("mla_dsa").has_indexer
  assert registry.get("mla").projections == "mla"
  assert "mla" not in registry.comparable_names()
  assert "mla" not in registry.BASELINE_LAYERS


def test_latent_cache_holds_r_plus_dr_per_token():
  layer = _layer(MLADSAAttention, "auto")
  cache = layer.init_cache(2, 32, index_dtype="float8_e4m3fn")
  assert cache.kv.shape == (2, 32, 16 + 4)
  assert (
    cache.k_idx.shape == (2, 32, 16) and cache.k_idx.dtype == jnp.float8_e4m3fn
  )
  assert cache.k_idx_scale.shape == (2, 32)
  assert _layer(MLAAttention, "auto").init_cache(1, 8).kv.shape == (1, 8, 20)
