"""Benchmark the Pallas kernels against their XLA references.

GPU/TPU: times lightning_topk and gathered_attention (fwd and fwd+bwd) for the
Pallas kernel and the XLA reference side by side, with FLOP/s and ratio
columns. CPU: the Pallas kernels only run in interpret mode, which is not a
timing, so only the XLA reference is timed (at small sizes).

  python experiments/bench_kernels.py                # default shapes
  python experiments/bench_kernels.py --smoke        # tiny, < 30 s on CPU (CI)
  python experiments/bench_kernels.py --csv out.csv
  python experiments/bench_kernels.py --cases mqa --peak-tflops 790   # H200 bf16 target
  python experiments/bench_kernels.py --cases mqa --attention-block-sizes '{"block_k": 64}'

--peak-tflops adds each implementation's fraction of that peak (the issue's
target: the gathered forward at the MQA shape >= 0.5 of an H200's ~790).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels_pallas import backend  # noqa: E402
from kernels_pallas.gathered_attention import (
  gathered_attention,
  gathered_attention_reference,
)  # noqa: E402
from kernels_pallas.topk import lightning_topk, lightning_topk_reference  # noqa: E402

# (B, T, S, K, H, G, D, Dv, HI, DI)
FULL = {
  "gqa": (1, 4096, 4096, 256, 16, 2, 128, 128, 64, 128),
  "mha": (1, 4096, 4096, 2048, 16, 16, 128, 128, 64, 128),
  "mqa": (
    1,
    4096,
    8192,
    2048,
    128,
    1,
    576,
    512,
    64,
    128,
  ),  # DeepSeek MLA as MQA
}
CPU = [
  (1, 256, 256, 32, 8, 2, 64, 64, 4, 32),
  (1, 512, 512, 64, 8, 1, 64, 64, 4, 32),
]
SMOKE = [(1, 64, 64, 8, 4, 2, 32, 32, 2, 16)]


def _time(fn, *args, iters):
  out = jax.block_until_ready(fn(*args))  # compile
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def _flops(case):
  B, T, S, K, H, G, D, Dv, HI, DI = case
  causal = 0.5 if T == S else 1.0
  topk = 2.0 * B * T * S * HI * DI * causal
  attn_fwd = 2.0 * B * T * K * H * (D + Dv)
  return topk, attn_fwd, attn_fwd * 3.5  # fwd + bwd ~ 1 + 2.5


def run(
  cases,
  dtype,
  iters,
  pallas: bool,
  peak_tflops: float | None = None,
  topk_block_sizes=None,
  attention_block_sizes=None,
):
  rows = []
  # A case's cost: its top-k scoring plus the gathered attention.
  eta = C.Eta([sum(_flops(c)) for c in cases])
  for i_case, case in enumerate(cases):
    print(f"[{i_case + 1}/{len(cases)}] case {case}{eta.text()}", flush=True)
    B, T, S, K, H, G, D, Dv, HI, DI = case
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, D), dtype)
    k = jax.random.normal(ks[1], (B, S, G, D), dtype)
    v = jax.random.normal(ks[2], (B, S, G, Dv), dtype)
    qi = jax.random.normal(ks[3], (B, T, HI, DI), dtype)
    ki = jax.random.normal(ks[4], (B, S, DI), dtype)
    w = jax.random.normal(ks[5], (B, T, HI), dtype)
    f_topk, f_fwd, f_bwd = _flops(case)
    impls = {
      "xla": dict(
        topk=lambda a, b, c, K=K: lightning_topk_reference(a, b, c, K),
        attn=gathered_attention_reference,
      )
    }
    if pallas:
      impls["pallas"] = dict(
        topk=lambda a, b, c, K=K: lightning_topk(
          a, b, c, K, block_sizes=topk_block_sizes
        ),
        attn=functools.partial(
          gathered_attention, block_sizes=attention_block_sizes
        ),
      )
    res = {}
    for name, fns in impls.items():
      topk = jax.jit(fns["topk"])
      idx = topk(qi, ki, w)
      attn = jax.jit(fns["attn"])
      grad = jax.jit(
        jax.grad(
          lambda q, k, v, i, fn=fns["attn"]: jnp.sum(
            fn(q, k, v, i).astype(jnp.float32)
          ),
          (0, 1, 2),
        )
      )
      res[name] = dict(
        topk=_time(topk, qi, ki, w, iters=iters),
        fwd=_time(attn, q, k, v, idx, iters=iters),
        fwdbwd=_time(grad, q, k, v, idx, iters=iters),
      )
    for kernel, fl in (("topk", f_topk), ("fwd", f_fwd), ("fwdbwd", f_bwd)):
      row = dict(
        kernel=kernel,
        B=B,
        T=T,
        S=S,
        K=K,
        H=H,
        G=G,
        D=D,
        Dv=Dv,
        HI=HI,
        DI=DI,
        dtype=jnp.dtype(dtype).name,
      )
      for name in impls:
        row[f"{name}_ms"] = round(res[name][kernel] * 1e3, 3)
        row[f"{name}_tflops"] = round(fl / res[name][kernel] / 1e12, 4)
        if peak_tflops:
          row[f"{name}_frac_peak"] = round(
            row[f"{name}_tflops"] / peak_tflops, 4
          )
      if pallas:
        row["speedup_pallas_vs_xla"] = round(
          res["xla"][kernel] / res["pallas"][kernel], 3
        )
      rows.append(row)
      print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    eta.done(i_case)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--smoke", action="store_true", help="tiny shapes, 1 iteration (CI)"
  )
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--csv", default=None, help="write results to this CSV file")
  p.add_argument(
    "--cases",
    nargs="*",
    choices=list(FULL),
    default=list(FULL),
    help="accelerator shapes to run (default: all)",
  )
  p.add_argument(
    "--peak-tflops",
    type=float,
    default=None,
    help="device peak for the dtype, adds *_frac_peak columns",
  )
  p.add_argument(
    "--topk-block-sizes",
    type=json.loads,
    default=None,
    help="JSON dict of kernels_pallas.topk.BlockSizes fields (None: defaults)",
  )
  p.add_argument(
    "--attention-block-sizes",
    type=json.loads,
    default=None,
    help="JSON dict of kernels_pallas.gathered_attention.BlockSizes fields",
  )
  args = p.parse_args(argv)
  hw = backend.detected_platform()
  pallas = hw in ("gpu", "tpu")
  if args.smoke:
    cases, iters = SMOKE, 1
  else:
    cases, iters = (
      ([FULL[c] for c in args.cases] if pallas else CPU),
      args.iters,
    )
  print(f"backend={jax.default_backend()} devices={jax.devices()}")
  if not pallas:
    print(
      "CPU: Pallas kernels only run in interpret mode, which is not a timing; "
      "timing the XLA reference path only."
    )
  rows = run(
    cases,
    jnp.dtype(args.dtype),
    iters,
    pallas,
    args.peak_tflops,
    args.topk_block_sizes,
    args.attention_block_sizes,
  )
  if args.csv:
    with open(args.csv, "w", newline="") as fh:
      wr = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
      wr.writeheader()
      wr.writerows(rows)
    print(f"wrote {args.csv}")
  return rows


if __name__ == "__main__":
  main()
