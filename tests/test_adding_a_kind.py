"""docs/adding_a_kind.md runs as written, and the kind it adds works everywhere.

The page's python blocks are executed in order (so the docs cannot drift
from the API); the kind they register is then trained in the model, decoded
(prefill + steps == the full forward), checked for future leakage, and its
budget compared with what the layer attends.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_attn import budgets, config, registry
from sparse_attn.inference import Decoder
from sparse_attn.models import build_model
from sparse_attn.ops.losses import lm_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "adding_a_kind.md")


@pytest.fixture(scope="module")
def kind_namespace():
  with open(DOC, encoding="utf-8") as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert len(blocks) >= 5
  ns: dict = {}
  try:
    for block in blocks:
      exec(compile(block, DOC, "exec"), ns)  # pylint: disable=exec-used
    yield ns
  finally:
    registry.unregister("dilated_window")


def _cfg(**params):
  return config.ModelConfig(
    embed_dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
    attention="dilated_window",
    attention_params=params,
  )


def test_registered_and_validated(kind_namespace):
  assert "dilated_window" in registry.names()
  assert kind_namespace["out"].tokens.shape == (2, 4)
  cfg = config.Config(model=_cfg(window=4, dilation=2))
  config.validate(cfg, num_devices=1)
  with pytest.raises(ValueError, match="dilation"):
    config.validate(config.Config(model=_cfg(dilation=0)), num_devices=1)
  with pytest.raises(ValueError, match="not parameters"):
    config.validate(config.Config(model=_cfg(stride=3)), num_devices=1)


def test_budget_matches_the_layer_and_no_future_leakage(kind_namespace):
  del kind_namespace
  model = build_model(_cfg(window=5, dilation=3), seed=1)
  tokens = jax.random.randint(jax.random.key(0), (2, 37), 0, 256)
  fwd = nnx.jit(lambda m, t: m(t))
  logits, aux = fwd(model, tokens)
  want = (
    2 * 2 * 37 * budgets.key_budget("dilated_window", 37, window=5, dilation=3)
  )
  assert float(aux["attended_keys"]) == pytest.approx(want)
  changed = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % 256)
  logits2, _ = fwd(model, changed)
  np.testing.assert_allclose(logits2[:, :20], logits[:, :20], atol=1e-5)
  params = budgets.match_budget("dilated_window", 4096, 48.0, dilation=4)
  assert set(params) == {"dilation", "window"} and params["dilation"] == 4
  got = budgets.key_budget("dilated_window", 4096, **params)
  for other in (params["window"] - 1, params["window"] + 1):
    assert abs(got - 48.0) <= abs(
      budgets.key_budget("dilated_window", 4096, window=other, dilation=4)
      - 48.0
    )


def test_decode_matches_forward_and_trains(kind_namespace):
  del kind_namespace
  model = build_model(_cfg(window=6, dilation=2), seed=2)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (2, 30))
  ref = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens)))
  dec = Decoder(model, chunk_size=8, min_view=16)
  cache = dec.init_cache(2, 32)
  logits, cache = dec.prefill(cache, tokens[:, :25], [25, 18], return_all=True)
  np.testing.assert_allclose(
    np.asarray(logits)[0], ref[0, :25], atol=1e-4, rtol=1e-4
  )
  np.testing.assert_allclose(
    np.asarray(logits)[1, :18], ref[1, :18], atol=1e-4, rtol=1e-4
  )
  step, _ = dec.step(cache, tokens[:, 25])
  np.testing.assert_allclose(
    np.asarray(step)[0], ref[0, 25], atol=1e-4, rtol=1e-4
  )

  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  batch = jnp.asarray(tokens)

  @nnx.jit
  def train_step(model, opt):
    def loss_fn(model):
      logits, _ = model(batch[:, :-1])
      return lm_loss(logits, batch[:, 1:])[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(train_step(model, opt)) for _ in range(4)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
