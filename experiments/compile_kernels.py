"""Compile the Pallas kernels for a TPU or GPU that is not here (AOT, on CPU).

  pip install -e ".[test]"            # brings libtpu, the CUDA compiler plugin, ptxas
  python experiments/compile_kernels.py --target h100      # sm_90: H100 / H200
  python experiments/compile_kernels.py --target v5e:2x2   # or v4:2x2x1, v6e:2x2
  python experiments/compile_kernels.py --target h100 --cases mqa576 --json out.json

For every case it compiles the gathered-attention forward, its gradient
(custom_vjp backward) and the fused indexer top-k, at the platform's default
BlockSizes (recorded in --json), with the real target
compiler (Mosaic for TPU; Triton -> PTX -> ptxas for GPU) and prints, for GPU,
each Pallas kernel's registers, spill bytes and shared memory (the limits
that decide whether a tiling can run at all: 255 registers per thread,
227 KiB of shared memory per block on sm_90). A case that fails prints the
compiler's error and the script exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if __name__ == "__main__":  # before JAX starts; not when imported (tests)
  # The CUDA plugin must not look for a driver.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  # jax >= 0.11: ptxas -v reports reach us only through XLA's VLOG (aot.py).
  # Forced: a parent that loaded libtpu passes TF_CPP_MIN_LOG_LEVEL=1 down.
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
  os.environ["TF_CPP_VMODULE"] = ",".join(
    filter(None, [os.environ.get("TF_CPP_VMODULE"), "subprocess_compilation=2"])
  )
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from kernels_pallas.gathered_attention import (  # noqa: E402
  BlockSizes as GatheredAttentionBlockSizes,
)
from kernels_pallas.gathered_attention import (
  gathered_attention,
)
from kernels_pallas.topk import BlockSizes as TopkBlockSizes  # noqa: E402
from kernels_pallas.topk import lightning_topk
from sparse_attn import aot  # noqa: E402

# name: (B, T, S, H, G, D, Dv, K, HI, DI)
CASES = {
  "odd": (1, 37, 101, 6, 3, 40, 24, 17, 3, 24),
  "decode": (2, 1, 8192, 16, 1, 128, 128, 512, 8, 64),
  "gqa4k": (1, 4096, 4096, 16, 2, 128, 128, 256, 64, 128),
  "mqa576": (1, 4096, 4096, 128, 1, 576, 512, 2048, 64, 128),
}
SMEM_LIMIT = 232448  # sm_90 opt-in shared memory per block
MAX_REGISTERS = 255


def _programs(case, dtype, platform, sds):
  B, T, S, H, G, D, Dv, K, HI, DI = CASES[case]
  ga_args = (
    sds((B, T, H, D), dtype),
    sds((B, S, G, D), dtype),
    sds((B, S, G, Dv), dtype),
    sds((B, T, K), jnp.int32),
  )
  topk_args = (
    sds((B, T, HI, DI), dtype),
    sds((B, S, DI), dtype),
    sds((B, T, HI), dtype),
    sds((B,), jnp.int32),
    sds((B,), jnp.int32),
  )
  ga_bs = GatheredAttentionBlockSizes.get_default(platform, *ga_args)
  topk_bs = TopkBlockSizes.get_default(platform, *topk_args[:3], min(K, S))
  ga = lambda q, k, v, i: gathered_attention(
    q, k, v, i, platform=platform, interpret=False, block_sizes=ga_bs
  )
  grad = jax.grad(
    lambda q, k, v, i: jnp.sum(ga(q, k, v, i).astype(jnp.float32)), (0, 1, 2)
  )
  topk = lambda q, k, w, o, l: lightning_topk(
    q,
    k,
    w,
    min(K, S),
    q_offset=o,
    kv_lengths=l,
    platform=platform,
    interpret=False,
    block_sizes=topk_bs,
  )
  return {
    "gathered_fwd": (ga, ga_args, ga_bs),
    "gathered_fwd_bwd": (grad, ga_args, ga_bs),
    "topk": (topk, topk_args, topk_bs),
  }


def compile_case(target, case, dtype):
  """Returns a list of result dicts (one per program)."""
  gpu = target in aot.GPU_TARGETS
  devices = (
    aot.gpu_target_devices(target) if gpu else aot.topology_devices(target)
  )
  mesh = Mesh(devices[:1], ("x",))
  sharding = NamedSharding(mesh, P())
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  rows = []
  for prog, (fn, args, bs) in _programs(
    case, dtype, "gpu" if gpu else "tpu", sds
  ).items():
    row = {
      "target": target,
      "case": case,
      "dtype": jnp.dtype(dtype).name,
      "program": prog,
      "block_sizes": dataclasses.asdict(bs),
    }
    try:
      # jax >= 0.11: Pallas Triton reads the GPU it lowers for from the
      # context mesh (no sm_90 fallback without a local GPU).
      with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(*args)
      if gpu:
        kernels = [
          k
          for k in aot.gpu_kernel_resources(lowered)
          if "gathered_attention" in k.name or "lightning" in k.name
        ]
        row["kernels"] = [vars(k) for k in kernels]
        row["ok"] = bool(kernels) and all(
          k.shared_memory_bytes <= SMEM_LIMIT
          and (k.registers or 0) <= MAX_REGISTERS
          for k in kernels
        )
      else:
        mem = lowered.compile().memory_analysis()
        row["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0) or 0)
        row["ok"] = True
    except Exception as e:  # pylint: disable=broad-except
      row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e)[:2000]}"
    rows.append(row)
  return rows


def _print(row):
  head = f"{row['target']:8s} {row['case']:7s} {row['dtype']:8s} {row['program']:17s}"
  if "error" in row:
    print(f"{head} FAILED\n    {row['error']}")
    return
  if "kernels" in row:
    for k in row["kernels"]:
      print(
        f"{head} {k['name']:28s} regs {k['registers']!s:>4} spill st/ld "
        f"{k['spill_store_bytes']}/{k['spill_load_bytes']} B  smem {k['shared_memory_bytes']:>6} B"
        f"  threads {k['threads']}  grid {k['grid']}"
      )
  else:
    print(f"{head} compiled, temp {row['temp_bytes'] / 2**20:.1f} MiB")


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--target",
    default="h100",
    help=f"GPU target {tuple(aot.GPU_TARGETS)} or a TPU topology (v5e:2x2, ...)",
  )
  p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--json", help="write the results here")
  args = p.parse_args(argv)
  rows = []
  for case in args.cases:
    for row in compile_case(args.target, case, jnp.dtype(args.dtype)):
      _print(row)
      rows.append(row)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
