"""Both kernels compile for real TPUs, on this CPU host.

With libtpu installed (the test extra pulls ``jax[tpu]``) JAX can describe a
TPU slice that is not there and run the whole TPU compiler for it, Mosaic's
layout passes and VMEM allocation included: the checks that `jax.export`
lowering (test_lowering.py) cannot make. This is how the per-row DMAs of the
gathered kernel were found to violate TPU tiling (fixed by the [.., 1, D] row
layout). Nothing is allocated or run.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip(
  "libtpu", reason="TPU compiler not installed: pip install 'jax[tpu]'"
)

from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from kernels_pallas.gathered_attention import gathered_attention  # noqa: E402
from kernels_pallas.topk import BlockSizes as TopkBlockSizes  # noqa: E402
from kernels_pallas.topk import lightning_topk
from sparse_attn import aot  # noqa: E402

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


@functools.cache
def _device(topology):
  return aot.topology_devices(topology)[0]


def _sds(topology, shape, dtype):
  sharding = NamedSharding(Mesh([_device(topology)], ("x",)), P())
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compile(fn, args):
  compiled = jax.jit(fn).lower(*args).compile()
  assert "tpu_custom_call" in compiled.as_text()
  return compiled


GA_SHAPES = {
  # B, T, S, H, G, D, Dv, K
  "odd": (1, 37, 101, 6, 3, 40, 24, 17),
  "decode": (2, 1, 8192, 16, 1, 128, 128, 512),
  "gqa4k": (1, 4096, 4096, 16, 2, 128, 128, 256),
  "mqa576": (1, 4096, 4096, 128, 1, 576, 512, 2048),
}


@pytest.mark.parametrize(
  "topology,shape,dtype",
  [
    ("v5e:2x2", "odd", jnp.float32),
    ("v5e:2x2", "odd", jnp.bfloat16),
    ("v5e:2x2", "decode", jnp.bfloat16),
    ("v5e:2x2", "mqa576", jnp.bfloat16),
    ("v4:2x2x1", "gqa4k", jnp.bfloat16),
    ("v6e:2x2", "gqa4k", jnp.bfloat16),
  ],
  ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_gathered_attention_compiles(topology, shape, dtype):
  B, T, S, H, G, D, Dv, K = GA_SHAPES[shape]
  sds = functools.partial(_sds, topology)
  args = (
    sds((B, T, H, D), dtype),
    sds((B, S, G, D), dtype),
    sds((B, S, G, Dv), dtype),
    sds((B, T, K), jnp.int32),
  )
  # Default block sizes: the backward's chunk comes from the buffer budget.
  f = lambda q, k, v, i: gathered_attention(
    q, k, v, i, platform="tpu", interpret=False
  )
  g = jax.grad(
    lambda q, k, v, i: jnp.sum(f(q, k, v, i).astype(jnp.float32)), (0, 1, 2)
  )
  _compile(f, args)
  _compile(g, args)


@pytest.mark.parametrize(
  "topology,shape,dtype,block_t",
  [
    ("v5e:2x2", (1, 37, 101, 3, 24, 17), jnp.float32, None),
    ("v5e:2x2", (2, 1, 8192, 8, 64, 512), jnp.bfloat16, None),  # decode step
    ("v5e:2x2", (1, 4096, 4096, 64, 128, 256), jnp.bfloat16, None),
    ("v6e:2x2", (1, 4096, 4096, 64, 128, 2048), jnp.bfloat16, None),
    # 24 does not divide 128: weights come in blocks of lcm(24, 128) queries,
    # not all 32K at once (which ran out of VMEM).
    ("v5e:2x2", (1, 32768, 32768, 64, 128, 256), jnp.bfloat16, 24),
  ],
  ids=["odd-f32", "decode", "4k", "v6e-k2048", "32k-bt24"],
)
def test_lightning_topk_compiles(topology, shape, dtype, block_t):
  B, T, S, HI, DI, K = shape
  sds = functools.partial(_sds, topology)
  args = (
    sds((B, T, HI, DI), dtype),
    sds((B, S, DI), dtype),
    sds((B, T, HI), dtype),
    sds((B,), jnp.int32),
    sds((B,), jnp.int32),
  )
  bs = TopkBlockSizes(block_t=block_t) if block_t else None
  f = lambda q, k, w, o, l: lightning_topk(
    q,
    k,
    w,
    K,
    q_offset=o,
    kv_lengths=l,
    platform="tpu",
    interpret=False,
    block_sizes=bs,
  )
  _compile(f, args)


def test_compile_kernels_script_tpu():
  # In this process: libtpu is already loaded here.
  path = os.path.join(ROOT, "experiments", "compile_kernels.py")
  spec = importlib.util.spec_from_file_location("compile_kernels", path)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  rows = script.compile_case("v5e:2x2", "odd", jnp.bfloat16)
  assert [r["program"] for r in rows] == [
    "gathered_fwd",
    "gathered_fwd_bwd",
    "topk",
  ]
  assert all(r["ok"] and "error" not in r for r in rows)
