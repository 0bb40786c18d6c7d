"""Context parallelism: the sequence layouts (here) and every context-parallel
op on 8-device meshes against one device (subprocess, 8 CPU devices)."""

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
