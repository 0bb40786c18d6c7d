"""MLA's two execution forms on a CPU: MHA (per-head K/V) vs absorbed (MQA on the latent).

One DSA-on-MLA layer (`sparse_attn.nn.MLADSAAttention`) at DeepSeek-V3.2's
proportions scaled down (defaults: H=16 heads, q LoRA 192, kv LoRA 128,
qk 32 + 16 rope dims, v 32; absorbed keys 144 wide, values 128; indexer 4 x
64, top-k 512). For each context length L (batch 1) it times, side by side
in one process (the two forms alternate, median of --reps):
  - dense   : the layer forward over L tokens, mode="dense" (prefill, warm-up);
  - sparse  : the same with mode="sparse" (top-k of L, DSA's stage 2);
  - decode  : one decode step after L cached tokens (the latent cache; the
              MHA form expands it to per-head K/V every step).
and reports the absorbed / MHA time ratio (< 1: absorbed is cheaper).

    python experiments/bench_mla.py                      # L = 4096, 16384
    python experiments/bench_mla.py --smoke --out-dir /tmp/bm   # CI

Writes <out-dir>/bench_mla.csv and bench_mla.md.
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

from sparse_attn.nn import MLADSAAttention

COLUMNS = ("context", "op", "mha_ms", "absorbed_ms", "ratio", "max_abs_diff")
FORMS = ("mha", "absorbed")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--contexts", default="4096,16384")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--embed-dim", type=int, default=512)
  p.add_argument("--q-lora-rank", type=int, default=192)
  p.add_argument("--kv-lora-rank", type=int, default=128)
  p.add_argument("--qk-nope-dim", type=int, default=32)
  p.add_argument("--qk-rope-dim", type=int, default=16)
  p.add_argument("--v-dim", type=int, default=32)
  p.add_argument("--indexer-heads", type=int, default=4)
  p.add_argument("--indexer-dim", type=int, default=64)
  p.add_argument("--top-k", type=int, default=512)
  p.add_argument("--ops", default="dense,sparse,decode")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out-dir", default="results/bench_mla")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 rep")
  a = p.parse_args(argv)
  if a.smoke:
    a.contexts, a.heads, a.embed_dim, a.reps = "64", 2, 32, 1
    a.q_lora_rank, a.kv_lora_rank = 16, 16
    a.qk_nope_dim, a.qk_rope_dim, a.v_dim = 8, 4, 8
    a.indexer_heads, a.indexer_dim, a.top_k = 2, 8, 8
  return a


def make_layer(a, form: str) -> MLADSAAttention:
  return MLADSAAttention(
    a.embed_dim,
    a.heads,
    a.heads,
    a.qk_nope_dim + a.qk_rope_dim,
    q_lora_rank=a.q_lora_rank,
    kv_lora_rank=a.kv_lora_rank,
    qk_nope_head_dim=a.qk_nope_dim,
    qk_rope_head_dim=a.qk_rope_dim,
    v_head_dim=a.v_dim,
    top_k=a.top_k,
    indexer_heads=a.indexer_heads,
    indexer_dim=a.indexer_dim,
    form=form,
    implementation="xla",
    rngs=nnx.Rngs(0),  # same seed: both forms hold the same weights
  )


def forward_fn(layer, mode: str):
  graphdef, state = nnx.split(layer)

  @jax.jit
  def run(state, x):
    return nnx.merge(graphdef, state)(x, mode=mode)[0]

  return lambda x: run(state, x)


def decode_fn(layer, context: int):
  """One decode step after `context` cached tokens (random latent + keys)."""
  graphdef, state = nnx.split(layer)
  cache = layer.init_cache(1, context + 1)
  keys = jax.random.split(jax.random.key(1), 2)
  cache = cache.replace(
    kv=jax.random.normal(keys[0], cache.kv.shape),
    k_idx=jax.random.normal(keys[1], cache.k_idx.shape),
  )
  pos = jnp.full((1, 1), context, jnp.int32)

  @jax.jit
  def step(state, cache, x):
    y, _, cache = nnx.merge(graphdef, state)(
      x, positions=pos, mode="sparse", cache=cache
    )
    return y

  return lambda x: step(state, cache, x)


def time_pair(fns, x, reps):
  """Median ms of each fn (alternating calls), after one compile call each."""
  outs = [np.asarray(f(x)) for f in fns]
  times = [[] for _ in fns]
  for _ in range(reps):
    for i, f in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x))
      times[i].append(time.perf_counter() - t0)
  return [1e3 * float(np.median(t)) for t in times], outs


def main(argv=None):
  a = parse_args(argv)
  layers = {f: make_layer(a, f) for f in FORMS}
  rows = []
  print(C.env_line(), flush=True)
  for context in (int(c) for c in a.contexts.split(",")):
    for op in a.ops.split(","):
      t0 = time.perf_counter()
      if op == "decode":
        fns = [decode_fn(layers[f], context) for f in FORMS]
        x = jax.random.normal(jax.random.key(2), (1, 1, a.embed_dim))
      else:
        fns = [forward_fn(layers[f], op) for f in FORMS]
        x = jax.random.normal(jax.random.key(2), (1, context, a.embed_dim))
      (mha, absorbed), outs = time_pair(fns, x, a.reps)
      diff = float(np.max(np.abs(outs[0] - outs[1])))
      rows.append(
        dict(
          context=context,
          op=op,
          mha_ms=mha,
          absorbed_ms=absorbed,
          ratio=absorbed / mha,
          max_abs_diff=diff,
        )
      )
      print(
        f"L={context} {op}: mha {mha:.1f} ms, absorbed {absorbed:.1f} ms, "
        f"absorbed/mha {absorbed / mha:.2f}, max|diff| {diff:.1e} "
        f"[{time.perf_counter() - t0:.0f} s]",
        flush=True,
      )
  os.makedirs(a.out_dir, exist_ok=True)
  C.write_csv(os.path.join(a.out_dir, "bench_mla.csv"), rows, COLUMNS)
  table = C.markdown_table(
    [
      [
        r["context"],
        r["op"],
        f"{r['mha_ms']:.1f}",
        f"{r['absorbed_ms']:.1f}",
        f"{r['ratio']:.2f}",
        f"{r['max_abs_diff']:.1e}",
      ]
      for r in rows
    ],
    ["L", "op", "MHA ms", "absorbed ms", "absorbed / MHA", "max |diff|"],
  )
  with open(os.path.join(a.out_dir, "bench_mla.md"), "w") as f:
    f.write(f"{C.env_line()}\n\n{table}\n")
  print(table)
  return rows


if __name__ == "__main__":
  main()
