"""Context parallelism: the sequence layouts (here) and every context-parallel
op on 8-device meshes against one device (subprocess, 8 CPU devices)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn import sharding as shd
from sparse_attn.ops import context_layout as cl
from sparse_attn.ops import context_parallel as cp


def test_zigzag_gives_every_shard_one_early_and_one_late_chunk():
  order = cl.layout_order(16, 4, "zigzag")
  assert order.reshape(4, 4).tolist() == [
    [0, 1, 14, 15],
    [2, 3, 12, 13],
    [4, 5, 10, 11],
    [6, 7, 8, 9],
  ]
  assert cl.layout_order(8, 2, "contiguous").tolist() == list(range(8))
  # Equal causal work: each shard's queries see the same number of keys.
  work = (order.reshape(4, 4) + 1).sum(axis=1)
  assert len(set(work.tolist())) == 1


@pytest.mark.parametrize("layout", cl.LAYOUTS)
@pytest.mark.parametrize("seq_len,shards", [(48, 8), (12, 3), (6, 1)])
def test_layout_round_trip_positions_and_owners(layout, seq_len, shards):
  x = np.arange(2 * seq_len).reshape(2, seq_len)
  laid = cl.to_layout(x, shards, layout)
  np.testing.assert_array_equal(cl.from_layout(laid, shards, layout), x)
  np.testing.assert_array_equal(
    cl.from_layout(
      cl.to_layout(jnp.asarray(x), shards, layout), shards, layout
    ),
    x,
  )
  order = cl.layout_order(seq_len, shards, layout).reshape(shards, -1)
  for shard in range(shards):
    np.testing.assert_array_equal(
      cl.shard_positions(shard, seq_len, shards, layout), order[shard]
    )
  owner, row = cl.owner_and_row(jnp.arange(seq_len), seq_len, shards, layout)
  np.testing.assert_array_equal(
    order[np.asarray(owner), np.asarray(row)], np.arange(seq_len)
  )


def test_bad_layouts_and_strategies_name_the_argument():
  with pytest.raises(ValueError, match="sequence length 20 must divide into 8"):
    cl.chunk_length(20, 4, "zigzag")
  with pytest.raises(ValueError, match="layout must be one of"):
    cl.layout_order(8, 2, "striped")
  with pytest.raises(ValueError, match="strategy must be one of"):
    cp.check_strategy("ring")
  with pytest.raises(ValueError, match="strategy must be one of"):
    cp.check_strategy("fetch", cp.DENSE_STRATEGIES)


def test_mesh_has_a_context_axis():
  assert shd.MESH_AXES[-1] == shd.CONTEXT_AXIS
  assert shd.full_mesh_shape((2, 1, 4), 8) == (2, 1, 4, 1)
  assert shd.full_mesh_shape(None, 8) == (8, 1, 1, 1)
  assert shd.full_mesh_shape((1, 2, 2, 2), 8) == (1, 2, 2, 2)
  with pytest.raises(ValueError, match="3 or 4 positive ints"):
    shd.full_mesh_shape((2, 2), 4)
  mesh = shd.make_mesh((1, 1, 1), None)
  assert shd.context_size(mesh) == 1


def test_context_parallel_ops_on_8_devices_match_one_device():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  worker = os.path.join(
    os.path.dirname(__file__), "_context_parallel_worker.py"
  )
  proc = subprocess.run(
    [sys.executable, worker],
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "OK context parallel" in proc.stdout


def _train_worker_runs(cmd: str) -> list[dict]:
  """The RESULT list of `tests/_train_worker.py cmd` on 8 CPU devices."""
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  worker = os.path.join(os.path.dirname(__file__), "_train_worker.py")
  proc = subprocess.run(
    [sys.executable, worker, cmd],
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, (
    proc.stdout[-3000:] + proc.stderr[-5000:]
  )
  return json.loads(lines[-1][len("RESULT ") :])


def test_context_parallel_training_on_8_devices_matches_one_device():
  """Train steps (warm-up + sparse) with the sequence sharded over the
  context axis: losses, KLs and every parameter equal one device's
  (tests/_train_worker.py context_equiv; the runs are its CONTEXT_RUNS)."""
  runs = _train_worker_runs("context_equiv")
  assert len(runs) == 6
  for r in runs:
    assert r["same_keys"], r["run"]
    for a, b in zip(r["metrics_one"], r["metrics_sharded"], strict=True):
      assert a == pytest.approx(b, rel=1e-5, abs=1e-6), r["run"]
    # As tests/test_sharding.py's mesh test: Adam's first steps divide by
    # |g| + eps, so an entry whose gradient is near eps moves by up to
    # lr * (reduction-order noise) / eps; everything else agrees to 1e-6.
    assert r["max_param_diff"] < 1e-4, r["run"]
    assert r["entries_over_1e-6"] <= 1e-4 * r["param_entries"] + 1, r["run"]


def test_context_parallel_prefill_on_8_devices_matches_one_device():
  """Chunked prefill with each chunk split over the context axis, then
  decode steps: logits of every prompt token, every cache leaf's written
  rows and the decode logits equal the one-device Decoder's
  (tests/_train_worker.py context_prefill: DSA on three meshes incl. a bf16
  index cache, dense, DSA on MLA with the Pallas kernels and fp8 keys)."""
  runs = _train_worker_runs("context_prefill")
  assert len(runs) == 5
  for r in runs:
    assert r["same_leaves"], r["run"]
    # f32 reduction order only (the selections are identical: a different
    # key would move the logits by far more).
    for key in ("prefill_all", "prefill_last", "cache", "steps"):
      assert r[key] < 2e-5, (r["run"], key, r[key])


def test_context_parallel_rejects_what_it_cannot_run():
  from sparse_attn.config import override, tiny, validate

  cfg = override(tiny(), "train.mesh_shape=[1, 1, 1, 8]", "train.seq_len=40")
  with pytest.raises(ValueError, match=r"seq_len=40 must be divisible by 16"):
    validate(cfg, num_devices=8)
  cfg = override(
    tiny(),
    "train.mesh_shape=[1, 1, 1, 2]",
    'model.attention="sliding_window"',
    'train.context_strategy="fetch"',
  )
  with pytest.raises(ValueError, match="does not support context parallel"):
    validate(cfg, num_devices=2)
  for kind, params in (("hisa", {}), ("dsa", {"hisa_block_size": 8})):
    cfg = override(
      tiny(),
      "train.mesh_shape=[1, 1, 1, 2]",
      f'model.attention="{kind}"',
      **{"model.attention_params": params},
    )
    with pytest.raises(ValueError, match="context parallel|hisa_block_size"):
      validate(cfg, num_devices=2)
  cfg = override(
    tiny(), "train.mesh_shape=[1, 1, 1, 2]", 'train.context_layout="ring"'
  )
  with pytest.raises(ValueError, match="context_layout must be one of"):
    validate(cfg, num_devices=2)
  cfg = override(tiny(), "train.mesh_shape=[2, 2]")
  with pytest.raises(ValueError, match="3 or 4 positive ints"):
    validate(cfg, num_devices=4)


def _one_device_cp(**kw):
  import jax

  from sparse_attn.nn.context_parallel import ContextParallel

  return ContextParallel(shd.make_mesh((1, 1, 1, 1), jax.devices()[:1]), **kw)


@pytest.mark.parametrize("mode", ["dense", "warmup", "sparse"])
def test_layer_with_context_parallel_matches_plain_layer(mode):
  """One shard runs the same code path (shard_map, layout, ring of one):
  outputs and aux equal the unsharded layer's, on an odd length."""
  import jax
  from flax import nnx

  from sparse_attn.nn.dsa import DSAAttention

  layer = DSAAttention(
    16, 4, 2, 8, top_k=3, indexer_heads=2, indexer_dim=8, rngs=nnx.Rngs(0)
  )
  x = jax.random.normal(jax.random.key(1), (2, 14, 16))
  cp_ = _one_device_cp()
  pos = cp_.layout_positions(2, 14)
  y0, aux0 = layer(x, mode=mode)
  y1, aux1 = layer(x, positions=pos, mode=mode, context_parallel=cp_)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), atol=1e-5)
  for k in aux0:
    np.testing.assert_allclose(float(aux1[k]), float(aux0[k]), rtol=1e-5)


def test_context_parallel_layer_errors():
  import jax
  from flax import nnx

  from sparse_attn.nn.context_parallel import ContextParallel
  from sparse_attn.nn.dsa import DSAAttention
  from sparse_attn.nn.sliding_window import SlidingWindowAttention

  cp_ = _one_device_cp()
  x = jnp.zeros((1, 8, 16))
  pos = cp_.layout_positions(1, 8)
  sw = SlidingWindowAttention(16, 2, 2, 8, window=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="does not support a sharded sequence"):
    sw(x, positions=pos, context_parallel=cp_)
  dsa = DSAAttention(16, 2, 2, 8, top_k=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs positions"):
    dsa(x, context_parallel=cp_)
  with pytest.raises(ValueError, match="kv_lengths must be None"):
    dsa(x, positions=pos, kv_lengths=jnp.array([4]), context_parallel=cp_)
  two = ContextParallel(jax.sharding.AbstractMesh((1, 1, 1, 2), shd.MESH_AXES))
  with pytest.raises(ValueError, match=r"x of shape \(1, 6, 16\)"):
    two.check_length("x of shape (1, 6, 16)", 6)
  with pytest.raises(ValueError, match="strategy must be one of"):
    _one_device_cp(strategy="all_to_all")
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    _one_device_cp(axis_name="sequence")
  from sparse_attn.config import ModelConfig
  from sparse_attn.inference import Decoder
  from sparse_attn.models import build_model

  model = build_model(ModelConfig(embed_dim=16, num_layers=1, num_heads=2))
  with pytest.raises(ValueError, match=r"chunk_size=6: .*into 4 equal chunks"):
    Decoder(model, chunk_size=6, context_parallel=two)
