"""Subprocess body: Pallas kernels (interpret mode) under a mesh on 8 CPU devices.

Run by tests/test_sharded_kernels.py with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax starts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn import sharding as shd  # noqa: E402

assert jax.device_count() == 8
B, T, S, H, G, D, HI, DI, K = 4, 16, 16, 4, 2, 16, 2, 8, 5
rng = np.random.default_rng(0)
mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
q, k, v = mk(B, T, H, D), mk(B, S, G, D), mk(B, S, G, D)
qi, ki, w = (jnp.abs(mk(B, T, HI, DI)), jnp.abs(mk(B, S, DI)), jnp.abs(mk(B, T, HI)))
kv = jnp.array([16, 9, 16, 3], jnp.int32)


def loss(q, k, v, impl):
  out = sa.dsa_attention(q, k, v, qi, ki, w, top_k=K, kv_lengths=kv, implementation=impl)
  return jnp.sum(out ** 2), out


want_grads, want = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla")
mesh = shd.make_mesh((2, 2, 2))
heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
args = [jax.device_put(x, heads) for x in (q, k, v)]
with jax.set_mesh(mesh):
  f = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, "pallas"), argnums=(0, 1, 2),
                       has_aux=True))
  got_grads, got = f(*args)
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
for a, b in zip(got_grads, want_grads):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
print("OK sharded pallas == xla", got.sharding.spec)
