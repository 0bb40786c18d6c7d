"""Pallas kernels under a mesh: how kernel_sharding splits them, and that
every 8-device mesh gives the XLA result (subprocess, 8 CPU devices)."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparse_attn import dispatch
from sparse_attn.ops import kernel_sharding

AXES = ("data", "fsdp", "tensor")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _plan(mesh_shape, B, H=None, G=None):
  dims = {"batch": [B]}
  if H is not None:
    dims["heads"] = [H, G]
  plan = kernel_sharding.plan_axes(AbstractMesh(mesh_shape, AXES), dims)
  return plan["batch"], plan.get("heads", ())


def test_plan_splits_heads_only_in_whole_kv_groups():
  # The reported bug: 8 query heads divide by tensor=4, 2 kv heads do not.
  assert _plan((2, 1, 4), B=2, H=8, G=2) == (("data",), ())
  assert _plan((1, 1, 8), B=2, H=8, G=2) == ((), ())
  assert _plan((4, 1, 2), B=2, H=8, G=2) == ((), ("tensor",))
  assert _plan((2, 2, 2), B=8, H=8, G=2) == (("data", "fsdp"), ("tensor",))
  assert _plan((2, 1, 4), B=2, H=8, G=8) == (("data",), ("tensor",))
  assert _plan((1, 1, 4), B=2, H=6, G=3) == (
    (),
    (),
  )  # 3 groups never split 4 ways


def test_plan_gives_left_over_axes_to_the_batch():
  # tensor cannot split one kv head (MQA), so it splits the batch.
  assert _plan((2, 1, 4), B=8, H=8, G=1) == (("data", "tensor"), ())
  assert _plan((1, 8, 1), B=8) == (("fsdp",), ())
  assert _plan((1, 8, 1), B=4, H=8, G=8) == ((), ("fsdp",))
  assert _plan((8, 1, 1), B=3, H=4, G=2) == ((), ())


def test_kernel_spec_and_errors():
  plan = {"batch": ("data", "fsdp"), "heads": ("tensor",)}
  assert kernel_sharding.kernel_spec(plan, ("batch", None, "heads", None)) == P(
    ("data", "fsdp"), None, "tensor", None
  )
  assert kernel_sharding.kernel_spec({"batch": ()}, ("batch", None)) == P(
    None, None
  )
  with pytest.raises(ValueError, match="unknown role 'time'"):
    kernel_sharding.kernel_spec(plan, ("time",))
  with pytest.raises(ValueError, match="unknown roles"):
    kernel_sharding.plan_axes(AbstractMesh((2,), ("data",)), {"time": [4]})


def test_no_mesh_calls_the_kernel_as_is():
  out = kernel_sharding.call_kernel_sharded(
    lambda a: a + 1, (jnp.zeros(3),), [("batch",)], ("batch",)
  )
  assert out.tolist() == [1, 1, 1]


def test_pallas_under_every_mesh_matches_xla():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  worker = os.path.join(os.path.dirname(__file__), "_sharded_kernels_worker.py")
  proc = subprocess.run(
    [sys.executable, worker],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "OK sharded pallas == xla" in proc.stdout


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="TPU compiler not installed: pip install 'jax[tpu]'"
)
def test_native_kernels_keep_check_vma_under_a_mesh():
  # Native kernels (compile_target) keep shard_map's varying-axes check: the
  # outputs and the backward's accumulators are typed for it. TPU: lowered
  # for 8 v5e chips; GPU formulation: traced (the check runs at trace time).
  import sparse_attn as sa
  from sparse_attn import aot
  from sparse_attn import sharding as shd

  mesh = shd.make_mesh((2, 2, 2), aot.topology_devices("v5e:2x4"))
  B, T, S, H, G, D, HI, DI, K = 4, 16, 16, 8, 2, 16, 2, 8, 4
  sds = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
    s, dt, sharding=NamedSharding(mesh, P())
  )
  args = (
    sds(B, T, H, D),
    sds(B, S, G, D),
    sds(B, S, G, D),
    sds(B, T, HI, DI),
    sds(B, S, DI),
    sds(B, T, HI),
    sds(B, dt=jnp.int32),
  )

  def loss(q, k, v, qi, ki, w, kv):
    out = sa.dsa_attention(q, k, v, qi, ki, w, top_k=K, kv_lengths=kv)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, (0, 1, 2)))
  with jax.set_mesh(mesh):
    with dispatch.compile_target("tpu"):
      traced = grad.trace(*args)
      assert (
        str(traced.jaxpr).count("check_vma=True") >= 2
      )  # top-k, attention (+ its vjp)
      assert "tpu_custom_call" in traced.lower().as_text()
    with dispatch.compile_target("gpu"):
      assert "check_vma=True" in str(grad.trace(*args).jaxpr)
