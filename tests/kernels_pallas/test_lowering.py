"""Both kernels lower for TPU (Mosaic) and CUDA (Triton) on a CPU-only machine.

Only ShapeDtypeStructs are used, nothing is allocated. Note: export runs the
Pallas -> Mosaic/Triton lowering; Mosaic's layout passes and Triton's PTX
compilation only run on real hardware.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.gathered_attention import gathered_attention
from kernels_pallas.topk import lightning_topk

SDS = jax.ShapeDtypeStruct
TARGETS = [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")]
# Triton custom calls carry no serialization-compatibility guarantee; lowering
# is what we check, so that safety check is disabled.
DISABLED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


# jax >= 0.11: Pallas Triton takes the GPU it lowers for from the context
# mesh's abstract device (no sm_90 fallback without a local GPU).
_H100 = jax.sharding.AbstractMesh(
  (1,),
  ("x",),
  abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
  ),
)


def _export(fn, xp, args):
  exp = jax.export.export(jax.jit(fn), platforms=[xp], disabled_checks=DISABLED)
  if xp != "cuda":
    return exp(*args)
  with jax.sharding.use_abstract_mesh(_H100):
    return exp(*args)


@pytest.mark.parametrize("platform,xp,marker", TARGETS, ids=["tpu", "cuda"])
@pytest.mark.parametrize(
  "shape",
  [
    (1, 4096, 4096, 16, 2, 128, 128, 256),  # GQA
    (1, 4096, 4096, 128, 1, 576, 512, 2048),  # DeepSeek MLA-as-MQA
  ],
  ids=["gqa", "mqa576"],
)
def test_gathered_attention_lowers(platform, xp, marker, shape):
  B, T, S, H, G, D, Dv, K = shape
  args = (
    SDS((B, T, H, D), jnp.bfloat16),
    SDS((B, S, G, D), jnp.bfloat16),
    SDS((B, S, G, Dv), jnp.bfloat16),
    SDS((B, T, K), jnp.int32),
  )
  f = lambda q, k, v, i: gathered_attention(
    q, k, v, i, platform=platform, interpret=False
  )
  g = jax.grad(
    lambda q, k, v, i: jnp.sum(f(q, k, v, i).astype(jnp.float32)), (0, 1, 2)
  )
  for fn in (f, g):
    exp = _export(fn, xp, args)
    assert marker in exp.mlir_module()


@pytest.mark.parametrize("platform,xp,marker", TARGETS, ids=["tpu", "cuda"])
@pytest.mark.parametrize(
  "dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"]
)
def test_lightning_topk_lowers(platform, xp, marker, dtype):
  B, T, S, HI, DI, K = 1, 4096, 4096, 64, 128, 256
  args = (
    SDS((B, T, HI, DI), dtype),
    SDS((B, S, DI), dtype),
    SDS((B, T, HI), dtype),
    SDS((B,), jnp.int32),
    SDS((B,), jnp.int32),
  )
  f = lambda q, k, w, o, l: lightning_topk(
    q, k, w, K, q_offset=o, kv_lengths=l, platform=platform, interpret=False
  )
  exp = _export(f, xp, args)
  assert marker in exp.mlir_module()
  # under grad (of a loss that uses the selected indices) it must lower too
  g = jax.grad(
    lambda q, k, w, o, l: jnp.sum(
      jnp.take_along_axis(
        w.astype(jnp.float32),
        jnp.maximum(f(q, k, w, o, l), 0)[..., :1] % w.shape[-1],
        -1,
      )
    ),
    argnums=2,
  )
  assert marker in _export(g, xp, args).mlir_module()
