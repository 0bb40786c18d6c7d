"""Top-k agreement of DeepSeek's FP8 indexer (and low-precision key caches) with f32.

A lightning indexer at DeepSeek-V3.2's sizes (64 heads of 128 dims, 64 of
them with RoPE, top-k 2048; hidden size --embed-dim) scores the last
--queries queries of a sequence of each length against all their keys, in
f32 and in each variant:
  fp8          DeepSeek's FP8 indexer: Hadamard rotation, e4m3 codes, one
               scale per vector (amax floor 1e-4), q scales in the weights
  fp8_ue8m0    the same with power-of-two scales (DeepSeek's released config)
  fp8_no_rot   FP8 without the Hadamard rotation (ablation)
  bf16_cache   f32 scores from a bfloat16 key cache
  fp8_cache    f32 queries, keys from an float8_e4m3fn cache (+ f32 scale)
and reports, per variant and length, the mean overlap |S_v & S_f32| / K
and the fraction of queries whose set is identical.

Inputs: a random-init indexer on hidden states N(0, 1) ("gaussian"); or
the same with 4 channels of q_idx and k_idx scaled x20 ("outliers": the
outlier channels the Hadamard rotation exists for, which stretch the amax
of every vector they touch). The FP8 variants apply
`sparse_attn.ops.quantize.fp8_indexer_inputs` to the f32 indexer outputs,
which is what `LightningIndexer(precision="fp8")` does.

    python experiments/indexer_precision.py            # 4K .. 32K, both inputs
    python experiments/indexer_precision.py --smoke --out-dir /tmp/ip   # CI

Writes <out-dir>/indexer_precision.csv and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attn.nn import LightningIndexer
from sparse_attn.ops import quantize
from sparse_attn.ops.indexer import lightning_topk

VARIANTS = ("fp8", "fp8_ue8m0", "fp8_no_rot", "bf16_cache", "fp8_cache")
COLUMNS = ("inputs", "length", "top_k", "variant", "mean_overlap", "identical")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--lengths", default="4096,8192,16384,32768")
  p.add_argument("--top-k", type=int, default=2048)
  p.add_argument("--queries", type=int, default=128)
  p.add_argument("--heads", type=int, default=64)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--rope-dim", type=int, default=64)
  p.add_argument("--embed-dim", type=int, default=256)
  p.add_argument("--inputs", default="gaussian,outliers")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default="results/indexer_precision")
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args(argv)
  if a.smoke:
    a.lengths, a.top_k, a.queries = "128", 16, 8
    a.heads, a.head_dim, a.rope_dim, a.embed_dim = 4, 16, 8, 32
  return a


def indexer_inputs(a, kind, length):
  """f32 (q_idx, k_idx, weights) of a random-init indexer."""
  if kind not in ("gaussian", "outliers"):
    raise ValueError(f"--inputs must be gaussian / outliers, got {kind!r}")
  x = jax.random.normal(jax.random.key(a.seed + 1), (1, length, a.embed_dim))
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  ind = LightningIndexer(
    a.embed_dim, a.heads, a.head_dim, rope_dim=a.rope_dim, rngs=nnx.Rngs(a.seed)
  )
  q, k, w = ind(x, pos)
  if kind == "outliers":  # the last 4 (position-free) channels x20
    q, k = q.at[..., -4:].multiply(20.0), k.at[..., -4:].multiply(20.0)
  return q, k, w


def selections(a, kind, length):
  """{variant: int32[Q, K] sorted} for the last a.queries queries."""
  q0 = length - a.queries

  @jax.jit
  def topk(q, k, w):
    return jnp.sort(lightning_topk(q[:, q0:], k, w[:, q0:], a.top_k), -1)[0]

  q, k, w = indexer_inputs(a, kind, length)
  out = {"f32": topk(q, k, w)}
  fp8 = quantize.fp8_indexer_inputs
  out["fp8"] = topk(*fp8(q, k, w))
  out["fp8_ue8m0"] = topk(*fp8(q, k, w, scale_fmt="ue8m0"))
  out["fp8_no_rot"] = topk(*fp8(q, k, w, hadamard=False))
  for name, dt in (("bf16_cache", "bfloat16"), ("fp8_cache", "float8_e4m3fn")):
    stored, scale = quantize.quantize_index_keys(k, dt)
    out[name] = topk(q, quantize.dequantize_index_keys(stored, scale), w)
  return {n: np.asarray(v) for n, v in out.items()}


def agreement(sel, ref, k):
  overlap = [len(np.intersect1d(a, b)) / k for a, b in zip(sel, ref)]
  same = [np.array_equal(a, b) for a, b in zip(sel, ref)]
  return float(np.mean(overlap)), float(np.mean(same))


def main(argv=None):
  a = parse_args(argv)
  print(C.env_line(), flush=True)
  rows = []
  for kind in a.inputs.split(","):
    for length in (int(x) for x in a.lengths.split(",")):
      t0 = time.perf_counter()
      sel = selections(a, kind, length)
      for v in VARIANTS:
        ov, same = agreement(sel[v], sel["f32"], a.top_k)
        rows.append(
          dict(
            inputs=kind,
            length=length,
            top_k=a.top_k,
            variant=v,
            mean_overlap=ov,
            identical=same,
          )
        )
      print(
        f"{kind} L={length}: "
        + ", ".join(
          f"{r['variant']} {r['mean_overlap']:.4f}/{r['identical']:.2f}"
          for r in rows[-len(VARIANTS) :]
        )
        + f" [{time.perf_counter() - t0:.0f} s]",
        flush=True,
      )
  os.makedirs(a.out_dir, exist_ok=True)
  C.write_csv(os.path.join(a.out_dir, "indexer_precision.csv"), rows, COLUMNS)
  table = C.markdown_table(
    [
      [
        r["inputs"],
        r["length"],
        r["variant"],
        f"{r['mean_overlap']:.4f}",
        f"{r['identical']:.2f}",
      ]
      for r in rows
    ],
    ["inputs", "L", "variant", "mean overlap with f32", "identical sets"],
  )
  with open(os.path.join(a.out_dir, "indexer_precision.md"), "w") as f:
    f.write(f"{C.env_line()}; top-k {a.top_k}, last {a.queries} queries\n\n")
    f.write(table + "\n")
  print(table)
  return rows


if __name__ == "__main__":
  main()
