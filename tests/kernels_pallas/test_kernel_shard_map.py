"""Kernels inside jax.shard_map over batch/head axes on 8 virtual CPU devices.

Run in a subprocess: XLA_FLAGS must be set before jax is imported and other
test modules have already imported jax in this process.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from kernels_pallas import gathered_attention, gathered_attention_reference
    from kernels_pallas import lightning_topk, lightning_topk_reference, indexer_scores_reference
    assert jax.device_count() == 8, jax.devices()
    _sm = getattr(jax, "shard_map", None)
    if _sm is None:
      from jax.experimental.shard_map import shard_map as _sm
    # check_vma=False: the Pallas *interpreter* (CPU) slices varying operands
    # with non-varying grid indices and trips the vma checker in jax 0.10.2.
    shard_map = functools.partial(_sm, check_vma=False)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    B, T, S, H, G, D, Dv, K = 2, 6, 24, 8, 4, 16, 8, 5
    ks = jax.random.split(jax.random.key(0), 8)
    q = jax.random.normal(ks[0], (B, T, H, D)); k = jax.random.normal(ks[1], (B, S, G, D))
    v = jax.random.normal(ks[2], (B, S, G, Dv))
    qi = jax.random.normal(ks[3], (B, T, 2, 8)); ki = jax.random.normal(ks[4], (B, S, 8))
    w = jax.random.normal(ks[5], (B, T, 2)); lens = jnp.array([20, 24], jnp.int32)

    topk = shard_map(lambda a, b, c, l: lightning_topk(a, b, c, K, kv_lengths=l), mesh=mesh,
                     in_specs=(P("data"), P("data"), P("data"), P("data")), out_specs=P("data"))
    idx = jax.jit(topk)(qi, ki, w, lens)
    sc = indexer_scores_reference(qi, ki, w, kv_lengths=lens)
    ref = lightning_topk_reference(qi, ki, w, K, kv_lengths=lens)
    g = lambda i: jnp.sort(jnp.take_along_axis(sc, jnp.maximum(i, 0), -1), -1)
    np.testing.assert_allclose(g(idx), g(ref), rtol=1e-6)

    # heads sharded over "model": 8 heads / 4 kv groups -> each shard 2 heads, 1 group
    attn = shard_map(gathered_attention, mesh=mesh,
                     in_specs=(P("data", None, "model"), P("data", None, "model"),
                               P("data", None, "model"), P("data")),
                     out_specs=P("data", None, "model"))
    loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, idx))))
    o = jax.jit(attn)(q, k, v, idx)
    np.testing.assert_allclose(o, gathered_attention_reference(q, k, v, idx), atol=2e-5)
    gk = jax.jit(jax.grad(loss(attn), (0, 1, 2)))(q, k, v)
    gr = jax.grad(loss(gathered_attention_reference), (0, 1, 2))(q, k, v)
    for a, b in zip(gk, gr):
      np.testing.assert_allclose(a, b, atol=5e-5)
    print("SHARD_MAP_OK")
""")


def test_shard_map_8_devices():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  res = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert res.returncode == 0 and "SHARD_MAP_OK" in res.stdout, (
    res.stdout[-3000:] + res.stderr[-5000:]
  )
