"""Decode benchmark: per-token decode step time and memory, DSA vs dense.

For each context length L, one attention layer (H heads, G kv heads, head
dim D; DSA adds HI indexer heads of dim DI and keeps top-k K) holds a cache
of L tokens (random contents; decode cost does not depend on them) and runs
one decode step: project the new token, write its K/V (and indexer key)
into the cache at per-row offsets, attend. Dense and DSA steps are timed
alternately (side by side, same process, same moment), median of --reps.
Memory: cache bytes and XLA's compiled temp bytes of the step.

--kinds adds other registered kinds (e.g. csa,hca) to the same interleaved
timing, each at its default parameters with its budget parameter matched
to DSA's top-k at the decode position (`match_budget(..., at="last")`).

Prefill: a chunked prefill of a --prefill-context prompt through a
one-layer DSA Transformer (`sparse_attn.inference.Decoder.prefill`), run in a
subprocess to measure its peak RSS; dense prefill too with --prefill-dense.

    python experiments/bench_decode.py                  # 4K .. 128K, prefill 64K
    python experiments/bench_decode.py --smoke --out-dir /tmp/bd   # CI

Writes <out-dir>/bench_decode.csv and bench_decode.png, prints a table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attn import budgets, registry
from sparse_attn import inference as D
from sparse_attn.nn import DenseAttention, DSAAttention
from sparse_attn.nn.kind import as_kwargs


def kind_params(kind: str, a, context: int) -> dict:
  """A non-DSA kind's parameters at DSA's decode budget (top_k keys)."""
  target = min(a.top_k, context + 1)
  return budgets.match_budget(kind, context + 1, target, at="last")


def make_layer(kind: str, a, context: int = 0) -> nnx.Module:
  e = a.heads * a.head_dim
  if kind == "dense":
    return DenseAttention(e, a.heads, a.kv_heads, a.head_dim, rngs=nnx.Rngs(0))
  if kind != "dsa":
    spec = registry.get(kind)
    p = spec.make_params(**kind_params(kind, a, context))
    assert spec.layer is not None, kind
    return spec.layer(
      e,
      a.heads,
      a.kv_heads,
      a.head_dim,
      **as_kwargs(p),
      implementation="xla",
      rngs=nnx.Rngs(0),
    )
  return DSAAttention(
    e,
    a.heads,
    a.kv_heads,
    a.head_dim,
    top_k=a.top_k,
    indexer_heads=a.indexer_heads,
    indexer_dim=a.indexer_dim,
    implementation="xla",
    rngs=nnx.Rngs(0),
  )


def random_cache(layer, batch: int, context: int, index_dtype):
  """The layer's own cache, capacity context + 1, holding `context` random tokens."""

  @jax.jit
  def fill():
    cache = layer.init_cache(
      batch, context + 1, dtype=jnp.float32, index_dtype=index_dtype
    )
    leaves = {
      f.name: getattr(cache, f.name)
      for f in dataclasses.fields(cache)
      if isinstance(getattr(cache, f.name), jax.Array)
      and jnp.issubdtype(getattr(cache, f.name).dtype, jnp.floating)
      and not f.name.endswith("_scale")
    }
    keys = iter(jax.random.split(jax.random.key(0), len(leaves)))
    out = {}
    for name, s in leaves.items():
      if s is not None:
        x = jax.random.normal(next(keys), s.shape, jnp.float32)
        if name == "k_idx":
          x, scale = D.quantize_index_keys(x, s.dtype)
          if scale is not None:
            out["k_idx_scale"] = scale
        out[name] = x.astype(s.dtype)
    return cache.replace(**out)

  return fill()


def make_step(layer, view: int):
  """Jitted decode step of one layer: its own forward with a cache."""
  graphdef, params = nnx.split(layer)

  def step(params, lc, x, lengths):
    lyr = nnx.merge(graphdef, params)
    y, _, lc = lyr(
      x,
      positions=lengths[:, None],
      kv_lengths=lengths + 1,
      mode="sparse",
      cache=lc,
      view=view,
    )
    return y, lc

  return params, jax.jit(step, donate_argnums=(1,))


def bench_decode(a):
  rows = []
  batch = a.batch
  kinds = ["dense", "dsa"] + [k for k in a.kinds if k not in ("dense", "dsa")]
  e = a.heads * a.head_dim
  x = jax.random.normal(jax.random.key(1), (batch, 1, e), jnp.float32)
  eta = C.Eta([float(c) for c in a.contexts])  # a decode step reads all ctx
  for i_ctx, ctx in enumerate(a.contexts):
    print(
      f"[{i_ctx + 1}/{len(a.contexts)}] context {ctx}{eta.text()}", flush=True
    )
    lengths = jnp.full((batch,), ctx, jnp.int32)
    runs = {}
    for kind in kinds:
      layer = make_layer(kind, a, ctx)
      lc = random_cache(layer, batch, ctx, a.index_dtype)
      params, step = make_step(layer, ctx + 1)
      compiled = step.lower(params, lc, x, lengths).compile()
      mem = compiled.memory_analysis()
      temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
      cache_bytes = sum(l.nbytes for l in jax.tree.leaves(lc))
      y, lc = step(params, lc, x, lengths)  # warm-up
      y, lc = step(params, lc, x, lengths)
      y.block_until_ready()
      runs[kind] = dict(
        step=step,
        params=params,
        lc=lc,
        times=[],
        cache_mb=cache_bytes / 2**20,
        temp_mb=temp / 2**20,
      )
    for _ in range(a.reps):  # interleaved
      for kind in kinds:
        r = runs[kind]
        t0 = time.perf_counter()
        y, r["lc"] = r["step"](r["params"], r["lc"], x, lengths)
        y.block_until_ready()
        r["times"].append(time.perf_counter() - t0)
    ms = {k: 1e3 * float(np.median(r["times"])) for k, r in runs.items()}
    row: dict = dict(context=ctx, dense_ms=ms["dense"], dsa_ms=ms["dsa"])
    row["ratio"] = ms["dsa"] / ms["dense"]
    for kind in kinds:
      row[f"{kind}_cache_mb"] = runs[kind]["cache_mb"]
      row[f"{kind}_temp_mb"] = runs[kind]["temp_mb"]
    for kind in kinds[2:]:
      row[f"{kind}_ms"] = ms[kind]
      row[f"{kind}_ratio"] = ms[kind] / ms["dense"]
      row[f"{kind}_params"] = json.dumps(kind_params(kind, a, ctx))
    rows.append(row)
    print(
      f"  context {ctx:>7}: dense {ms['dense']:8.3f} ms  "
      + "  ".join(
        f"{k} {ms[k]:8.3f} ms (ratio {ms[k] / ms['dense']:.3f})"
        for k in kinds[1:]
      ),
      flush=True,
    )
    del runs
    eta.done(i_ctx)
  return rows


def prefill_worker(kind: str, context: int, a) -> dict:
  """Chunked prefill of one random prompt through a one-layer model."""
  from sparse_attn.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from sparse_attn.models import build_model  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig(
    embed_dim=a.heads * a.head_dim,
    num_layers=1,
    num_heads=a.heads,
    num_kv_heads=a.kv_heads,
    head_dim=a.head_dim,
    mlp_dim=64,
    attention=kind,
    top_k=a.top_k,
    indexer_heads=a.indexer_heads,
    indexer_dim=a.indexer_dim,
    implementation="xla",
  )
  model = build_model(cfg)
  dec = D.Decoder(model, chunk_size=a.chunk_size, index_dtype=a.index_dtype)
  tokens = np.random.default_rng(0).integers(0, 256, (a.batch, context))
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  cache = dec.init_cache(a.batch, context + 1)
  t0 = time.perf_counter()
  logits, cache = dec.prefill(cache, tokens)
  logits.block_until_ready()
  secs = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  cache_mb = sum(l.nbytes for l in jax.tree.leaves(cache.layers)) / 2**20
  return dict(
    kind=kind,
    context=context,
    seconds=secs,
    peak_rss_mb=peak,
    rss_before_mb=rss0,
    cache_mb=cache_mb,
    tokens_per_s=a.batch * context / secs,
  )


def run_prefill(kind: str, a, argv) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--prefill-worker",
    kind,
  ] + argv
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode != 0:
    raise RuntimeError(f"prefill worker failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def write_outputs(rows, prefill, a):
  os.makedirs(a.out_dir, exist_ok=True)
  path = os.path.join(a.out_dir, "bench_decode.csv")
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  if prefill:
    with open(
      os.path.join(a.out_dir, "bench_prefill.json"), "w", encoding="utf-8"
    ) as f:
      json.dump(prefill, f, indent=2)
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ctx = [r["context"] for r in rows]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.loglog(ctx, [r["dense_ms"] for r in rows], "o-", label="dense")
  ax1.loglog(
    ctx, [r["dsa_ms"] for r in rows], "s-", label=f"DSA (top-k {a.top_k})"
  )
  ax1.set_xlabel("context (tokens)")
  ax1.set_ylabel("decode step (ms)")
  ax1.legend()
  ax1.set_title("per-token decode, one layer")
  ax2.semilogx(ctx, [r["ratio"] for r in rows], "o-")
  ax2.axhline(0.05, ls="--", c="gray", label="0.05 target")
  ax2.set_xlabel("context (tokens)")
  ax2.set_ylabel("DSA / dense")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(a.out_dir, "bench_decode.png"), dpi=100)
  return path


def parse(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
  C.add_layer_shape_args(p)
  p.add_argument("--index-dtype", default="float32", choices=D.INDEX_DTYPES)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument(
    "--kinds",
    default="",
    help="other kinds to time beside dense and DSA (comma-separated, e.g. "
    "csa,hca)",
  )
  p.add_argument(
    "--prefill-context",
    type=int,
    default=65536,
    help="prompt length of the prefill measurement (0: skip)",
  )
  p.add_argument(
    "--prefill-dense",
    action="store_true",
    help="also prefill the dense model (slow: O(L^2) work)",
  )
  p.add_argument("--chunk-size", type=int, default=2048)
  p.add_argument("--out-dir", default="bench_decode_out")
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
  p.add_argument("--prefill-worker", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.smoke:
    a.contexts, a.reps, a.top_k = "256", 2, 16
    a.prefill_context, a.chunk_size = 200, 128
  a.contexts = [int(c) for c in str(a.contexts).split(",") if c]
  a.kinds = [k for k in str(a.kinds).split(",") if k]
  for k in a.kinds:
    registry.get(k)  # ValueError naming the known kinds
  return a


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  a = parse(argv)
  if a.prefill_worker:  # this process is the prefill subprocess
    print(json.dumps(prefill_worker(a.prefill_worker, a.prefill_context, a)))
    return
  print(
    f"decode step, one layer: H={a.heads} G={a.kv_heads} D={a.head_dim} "
    f"HI={a.indexer_heads} DI={a.indexer_dim} K={a.top_k} B={a.batch} "
    f"index cache {a.index_dtype}, {jax.devices()[0].platform}, fp32"
  )
  rows = bench_decode(a)
  prefill = []
  if a.prefill_context:
    fwd = [x for x in argv if x != "--prefill-dense"]
    for kind in ("dsa", "dense") if a.prefill_dense else ("dsa",):
      # --smoke runs in-process (CI time); its RSS then includes the above.
      prefill.append(
        prefill_worker(kind, a.prefill_context, a)
        if a.smoke
        else run_prefill(kind, a, fwd)
      )
  path = write_outputs(rows, prefill, a)
  print()
  print(
    "| context | dense ms/token | DSA ms/token | DSA/dense | dense cache MB "
    "| DSA cache MB | dense temp MB | DSA temp MB |"
  )
  print("|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(
      f"| {r['context']} | {r['dense_ms']:.3f} | {r['dsa_ms']:.3f} | "
      f"{r['ratio']:.3f} | {r['dense_cache_mb']:.1f} | "
      f"{r['dsa_cache_mb']:.1f} | {r['dense_temp_mb']:.1f} | "
      f"{r['dsa_temp_mb']:.1f} |"
    )
  for kind in a.kinds:
    if kind in ("dense", "dsa"):
      continue
    print()
    print(
      f"| context | {kind} ms/token | {kind}/dense | {kind} cache MB | params |"
    )
    print("|---:|---:|---:|---:|---|")
    for r in rows:
      print(
        f"| {r['context']} | {r[kind + '_ms']:.3f} | {r[kind + '_ratio']:.3f} "
        f"| {r[kind + '_cache_mb']:.1f} | {r[kind + '_params']} |"
      )
  for p in prefill:
    print(
      f"prefill {p['kind']} {p['context']} tokens (chunk {a.chunk_size}): "
      f"{p['seconds']:.1f} s, {p['tokens_per_s']:.0f} tok/s, peak RSS "
      f"{p['peak_rss_mb']:.0f} MB (cache {p['cache_mb']:.1f} MB)"
    )
  print(f"wrote {path} and bench_decode.png")


if __name__ == "__main__":
  main()
