"""HISA's top-k stage against DSA's flat one: time and selection overlap.

For each context length L, the last `--queries` queries of a causal
sequence (the last chunk of a chunked prefill: the chunk that sees the
most keys) select their top-k keys twice, with DSA's flat
`lightning_topk` and with HISA's `hisa_topk` (blocks of `--block-size`,
`--num-blocks` kept), on the same inputs. Reported per length and input:
  - the time of each (jit-compiled, median over `--reps`, the two run
    alternately so load changes hit both) and flat / HISA, the speedup;
  - the overlap of the two selections: |HISA & flat| / |flat| per query,
    mean and 5th percentile, and the fraction of queries with the same set.
The overlap depends on how much the keys that score high cluster in
blocks, so two synthetic inputs bracket it:
  iid     every indexer key drawn independently (nothing for block means to
          find: the worst case for the coarse filter);
  local   keys drift along the sequence (an AR(1) process, correlation
          `--rho` between neighbours), as neighbouring tokens' keys do.
The paper (arXiv:2603.28458) reports > 99% IoU on DeepSeek-V3.2's trained
indexer; these inputs are not trained keys.

  python experiments/bench_hisa.py                          # 16K, 32K, 64K
  python experiments/bench_hisa.py --lengths 4096 --reps 3
  python experiments/bench_hisa.py --smoke --out-dir /tmp/h  # seconds

Writes <out-dir>/bench_hisa.{md,csv}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparse_attn.ops.hisa import hisa_topk  # noqa: E402
from sparse_attn.ops.indexer import lightning_topk  # noqa: E402

COLUMNS = (
  "L",
  "input",
  "queries",
  "top_k",
  "block_size",
  "num_blocks",
  "flat_ms",
  "hisa_ms",
  "speedup",
  "overlap_mean",
  "overlap_p5",
  "same_set",
  "keys_scanned",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--lengths", default="16384,32768,65536")
  p.add_argument("--inputs", default="iid,local")
  p.add_argument("--queries", type=int, default=256)
  p.add_argument("--top-k", type=int, default=2048, help="the paper's K")
  p.add_argument("--block-size", type=int, default=128, help="paper: 128")
  p.add_argument("--num-blocks", type=int, default=64, help="paper: 64")
  p.add_argument("--indexer-heads", type=int, default=16)
  p.add_argument("--indexer-dim", type=int, default=64)
  p.add_argument("--rho", type=float, default=0.98)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default="results/bench_hisa")
  p.add_argument("--smoke", action="store_true", help="tiny sizes")
  a = p.parse_args(argv)
  if a.smoke:
    a.lengths, a.queries, a.top_k = "512", 16, 16
    a.block_size, a.num_blocks, a.reps = 16, 4, 1
    a.indexer_heads, a.indexer_dim = 2, 8
  return a


def make_inputs(kind: str, L: int, a, rng: np.random.Generator):
  """(q_idx [1, T, HI, DI], k_idx [1, L, DI], weights [1, T, HI])."""
  hi, di, t = a.indexer_heads, a.indexer_dim, a.queries
  if kind == "iid":
    keys = rng.standard_normal((L, di))
  elif kind == "local":
    noise = rng.standard_normal((L, di)) * np.sqrt(1 - a.rho**2)
    keys = np.empty((L, di))
    keys[0] = rng.standard_normal(di)
    for i in range(1, L):
      keys[i] = a.rho * keys[i - 1] + noise[i]
  else:
    raise ValueError(f"--inputs: unknown input {kind!r} (iid, local)")
  q = rng.standard_normal((1, t, hi, di)) / np.sqrt(di)
  w = np.abs(rng.standard_normal((1, t, hi))) / np.sqrt(hi)
  f = lambda x: jnp.asarray(x, jnp.float32)
  return f(q), f(keys[None]), f(w)


def overlap(flat: np.ndarray, hisa: np.ndarray) -> np.ndarray:
  """|hisa & flat| / |flat| per query (flat's valid slots)."""
  out = []
  for f, h in zip(
    flat.reshape(-1, flat.shape[-1]), hisa.reshape(-1, flat.shape[-1])
  ):
    f, h = f[f >= 0], h[h >= 0]
    out.append(len(np.intersect1d(f, h)) / max(len(f), 1))
  return np.asarray(out)


def time_pair(fns, args, reps: int) -> list[float]:
  """Median seconds of each fn, run alternately."""
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(reps):
    for i, fn in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]


def run(a) -> list[dict]:
  lengths = [int(x) for x in a.lengths.split(",")]
  inputs = a.inputs.split(",")
  cases = [(L, kind) for L in lengths for kind in inputs]
  eta = C.Eta([L for L, _ in cases])
  rows = []
  rng = np.random.default_rng(a.seed)
  for i, (L, kind) in enumerate(cases):
    q, k, w = make_inputs(kind, L, a, rng)
    offset = L - a.queries
    flat = jax.jit(
      lambda q, k, w, offset=offset: lightning_topk(
        q, k, w, a.top_k, q_offset=offset
      )
    )
    hier = jax.jit(
      lambda q, k, w, offset=offset: hisa_topk(
        q,
        k,
        w,
        a.top_k,
        block_size=a.block_size,
        num_blocks=a.num_blocks,
        q_offset=offset,
      )
    )
    f_idx = np.asarray(flat(q, k, w))  # compiles
    h_idx = np.asarray(hier(q, k, w))
    f_s, h_s = time_pair((flat, hier), (q, k, w), a.reps)
    ov = overlap(f_idx, h_idx)
    same = float(np.mean(ov == 1.0))
    rows.append(
      dict(
        L=L,
        input=kind,
        queries=a.queries,
        top_k=a.top_k,
        block_size=a.block_size,
        num_blocks=a.num_blocks,
        flat_ms=1e3 * f_s,
        hisa_ms=1e3 * h_s,
        speedup=f_s / h_s,
        overlap_mean=float(ov.mean()),
        overlap_p5=float(np.percentile(ov, 5)),
        same_set=same,
        keys_scanned=-(-L // a.block_size)
        + min(a.num_blocks, -(-L // a.block_size)) * a.block_size,
      )
    )
    eta.done(i)
    r = rows[-1]
    print(
      f"[{i + 1}/{len(cases)}] L={L} {kind}: flat {r['flat_ms']:.1f} ms, "
      f"HISA {r['hisa_ms']:.1f} ms ({r['speedup']:.2f}x), overlap "
      f"{r['overlap_mean']:.3f}{eta.text()}",
      flush=True,
    )
  return rows


def report(a, rows, argv) -> str:
  cmd = "python experiments/bench_hisa.py" + (
    " " + " ".join(argv) if argv else ""
  )
  head = (
    f"HISA top-k vs flat top-k; {C.env_line()}. The last {a.queries} "
    f"queries of a causal sequence of L keys, K={a.top_k}, HI="
    f"{a.indexer_heads}, DI={a.indexer_dim}, blocks of {a.block_size}, "
    f"{a.num_blocks} kept. Times: median of {a.reps}, the two run "
    f"alternately. Overlap: |HISA & flat| / K per query.\n\n`{cmd}`\n"
  )
  table = C.markdown_table(
    (
      (
        r["L"],
        r["input"],
        f"{r['flat_ms']:.1f}",
        f"{r['hisa_ms']:.1f}",
        f"{r['speedup']:.2f}",
        f"{r['overlap_mean']:.4f}",
        f"{r['overlap_p5']:.4f}",
        f"{r['same_set']:.2f}",
        r["keys_scanned"],
      )
      for r in rows
    ),
    (
      "L",
      "input",
      "flat ms",
      "HISA ms",
      "flat / HISA",
      "overlap mean",
      "overlap p5",
      "same set",
      "keys scored / query (HISA)",
    ),
  )
  return head + "\n" + table + "\n"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  rows = run(a)
  os.makedirs(a.out_dir, exist_ok=True)
  C.write_csv(os.path.join(a.out_dir, "bench_hisa.csv"), rows, COLUMNS)
  text = report(a, rows, argv)
  with open(os.path.join(a.out_dir, "bench_hisa.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
