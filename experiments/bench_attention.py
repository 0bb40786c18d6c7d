"""Efficiency benchmark: one attention layer, DSA vs dense vs every baseline.

For each context length L (T = S = L, causal) and each mode
  fwd     forward of the pure attention function,
  fwdbwd  forward + backward (grads w.r.t. q, k, v; DSA: the top-k is a
          forward-only integer selection, as in training),
  decode  one query (T = 1, q_offset = L - 1) against a full K/V of length L
          (the attention call a decode step makes),
every kind is compiled ahead of time (`jit(...).lower(...).compile()`, which
also gives XLA's memory analysis) and then timed side by side: repetitions
are interleaved across kinds (rep 1 of every kind, then rep 2, ...), so load
changes on a shared machine hit every kind alike; the median is reported,
with ratios to both dense references of the same length and mode:
  dense_xla  jax.nn.dot_product_attention(is_causal=True) (materialises [T, S]),
  dense_sa   sparse_attn.dense_attention (query-chunked),
and `ratio` = time / min(dense_xla, dense_sa).

DSA = sa.lightning_topk + sa.gathered_attention with the indexer inputs
(q_idx, k_idx, weights) given as tensors; the rows dsa:topk and dsa:attn time
the two halves separately (breakdown). HISA (DSA with the hierarchical
top-k, `sa.hisa_topk`) runs at DSA's top_k with blocks of
--hisa-block-size, --hisa-blocks kept (the paper's 128 / 64 at K=2048 keep
4K candidates; the defaults 32 / 16 keep the same 4 x K at K=128);
hisa:topk times its top-k alone, beside dsa:topk. Every other registered kind runs its
pure form (`registry.get(kind).attention`) with the kind parameter matched
to DSA's key budget at each L (mean keys per query; see docs/baselines.md);
the `budget` column gives what was reached.
A FLOP model (and a byte model for decode) gives the theoretical cost ratio
to dense (causal, i.e. half the T*S pairs) to read the measured ratios
against.

Dense that does not fit is a result, not a crash: a case whose compiled temp
memory exceeds --mem-limit-gb, whose L exceeds --dense-max-len (dense and the
O(T*S) Sparse Transformer kinds) / --bwd-max-len (same, fwdbwd), or that
raises, is written with status "skipped: ..." / "error: ...".

  python experiments/bench_attention.py                     # 1K..32K + 64K DSA
  python experiments/bench_attention.py --lengths 1024,4096 --modes fwd
  python experiments/bench_attention.py --smoke --out-dir /tmp/b   # CI, < 30 s

Writes <out-dir>/bench_attention.csv, bench_attention.md, bench_attention.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts the repo root on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn import budgets, registry  # noqa: E402

MODES = ("fwd", "fwdbwd", "decode")
# The two dense references and DSA's two halves, then every kind DSA is
# compared with on one GQA layer (read from the registry: a new kind is
# benchmarked too; the MLA kinds' latent projections: experiments/bench_mla.py).
# IndexCache (cross-layer top-k reuse) is DSA on any one layer: its saving
# is model-level (experiments/index_share.py measures it).
BASELINE_KINDS = tuple(
  k
  for k in registry.comparable_names()
  if k not in ("dense", "dsa", "hisa", "indexcache")
)
KINDS = (
  "dense_xla",
  "dense_sa",
  "dsa",
  "dsa:topk",
  "dsa:attn",
  "hisa",
  "hisa:topk",
) + BASELINE_KINDS
TOPK_KINDS = ("dsa:topk", "hisa:topk")  # integer selections: no backward
QUADRATIC = ("dense_xla", "dense_sa", "strided", "fixed")  # O(T*S) XLA paths
COLUMNS = (
  "L",
  "mode",
  "kind",
  "status",
  "time_s",
  "reps",
  "ratio",
  "ratio_dense_xla",
  "ratio_dense_sa",
  "budget",
  "temp_bytes",
  "output_bytes",
  "arg_bytes",
  "peak_bytes",
  "model_flops",
  "model_bytes",
  "model_ratio",
  "compile_s",
  "params",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--kinds", default=",".join(KINDS))
  C.add_layer_shape_args(p)
  p.add_argument("--hisa-block-size", type=int, default=32)
  p.add_argument("--hisa-blocks", type=int, default=16)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--decode-reps", type=int, default=20)
  p.add_argument(
    "--max-case-s",
    type=float,
    default=20.0,
    help="after the first timed run, repeat a case only while its "
    "total stays under this many seconds",
  )
  p.add_argument(
    "--dense-max-len",
    type=int,
    default=32768,
    help="largest L for dense and the O(T*S) kinds (fwd, decode)",
  )
  p.add_argument(
    "--bwd-max-len",
    type=int,
    default=16384,
    help="largest L for dense and the O(T*S) kinds in fwdbwd",
  )
  p.add_argument(
    "--mem-limit-gb",
    type=float,
    default=8.0,
    help="skip a case whose compiled temp+output exceeds this",
  )
  p.add_argument(
    "--rss-check",
    type=int,
    default=65536,
    help="also run the DSA forward at this L in a subprocess and "
    "report its peak RSS (0 = off)",
  )
  p.add_argument("--out-dir", default="results/bench")
  p.add_argument("--smoke", action="store_true", help="tiny sizes for CI")
  p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.smoke:
    a.lengths, a.reps, a.decode_reps, a.rss_check = "128", 2, 2, 0
    a.heads, a.head_dim, a.top_k = 4, 32, 32
  return a


# ---------------------------------------------------------------------------
# inputs, kind parameters, cost models


def make_inputs(a, length, num_q):
  dt = jnp.dtype(a.dtype)
  ks = jax.random.split(jax.random.key(length), 7)
  b, h, g, d = a.batch, a.heads, a.kv_heads, a.head_dim
  hi, di = a.indexer_heads, a.indexer_dim
  n = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dt)
  return dict(
    q=n(ks[0], (b, num_q, h, d)),
    k=n(ks[1], (b, length, g, d)),
    v=n(ks[2], (b, length, g, d)),
    q_idx=n(ks[3], (b, num_q, hi, di)),
    k_idx=n(ks[4], (b, length, di)),
    w=n(ks[5], (b, num_q, hi)),
    gates=jax.nn.sigmoid(n(ks[6], (b, num_q, h, 3))),
  )


def kind_params(a, kind, length):
  if kind.startswith("dsa"):
    return {"top_k": a.top_k}
  if kind.startswith("hisa"):
    return {
      "top_k": a.top_k,
      "hisa_block_size": a.hisa_block_size,
      "hisa_blocks": a.hisa_blocks,
    }
  if kind in BASELINE_KINDS:
    target = budgets.key_budget("dsa", length, top_k=a.top_k)
    return budgets.match_budget(kind, length, target)
  return {}


def keys_per_query(kind, length, params):
  base = kind.split(":")[0]
  if base.startswith("dense"):
    return budgets.keys_per_query("dense", length)
  return budgets.keys_per_query(base, length, **params)


def cost_model(a, kind, mode, length, params):
  """(flops, bytes) of the kind's ideal algorithm (causal: no masked work)."""
  item = jnp.dtype(a.dtype).itemsize
  b, h, g, d, hi, di = (
    a.batch,
    a.heads,
    a.kv_heads,
    a.head_dim,
    a.indexer_heads,
    a.indexer_dim,
  )
  counts = keys_per_query(kind, length, params)
  dense_counts = np.arange(1, length + 1, dtype=np.float64)
  if mode == "decode":
    counts, dense_counts = counts[-1:], dense_counts[-1:]
  attn = 2.0 * b * h * (2 * d) * counts.sum()
  index = 2.0 * b * hi * (di + 1) * dense_counts.sum()
  base = kind.split(":")[0]
  if base == "hisa":  # block representatives + the kept blocks' keys
    bs, m = params["hisa_block_size"], params["hisa_blocks"]
    seen = np.arange(length) // bs + 1
    scored = seen + np.minimum(m, seen) * bs
    if mode == "decode":
      scored = scored[-1:]
    index = 2.0 * b * hi * (di + 1) * scored.sum()
  if base == "csa":  # the indexer scores every visible entry
    ratio = registry.get("csa").make_params(**params).ratio
    scored = np.arange(1, length + 1) // ratio
    if mode == "decode":
      scored = scored[-1:]
    index = 2.0 * b * hi * (di + 1) * scored.sum()
  if mode == "fwdbwd":
    attn *= 3.0  # backward ~ 2x forward (dQ, dK, dV, dP matmuls)
  if kind in TOPK_KINDS:
    flops = index
  elif kind == "dsa:attn":
    flops = attn
  elif base in ("dsa", "hisa", "csa"):
    flops = attn + index
  else:
    flops = attn
  # Bytes read: each attended key/value row once per query (decode), plus the
  # indexer keys of every visible token for DSA; q/o are negligible.
  kv_row = g * 2 * d * item
  nbytes = b * counts.sum() * kv_row
  if base == "dsa" and kind != "dsa:attn":
    nbytes = (
      0 if kind == "dsa:topk" else nbytes
    ) + b * dense_counts.sum() * di * item
  if base == "hisa":
    nbytes = (
      0 if kind == "hisa:topk" else nbytes
    ) + b * scored.sum() * di * item
  return float(flops), float(nbytes)


# ---------------------------------------------------------------------------
# the functions timed


def attention_fn(a, kind, params, decode: bool):
  """f(inputs dict) -> output [B, T, H, D] for one kind (pure, jittable)."""
  off = (lambda x: x["k"].shape[1] - 1) if decode else (lambda x: None)
  if kind == "dense_xla":
    return lambda x: jax.nn.dot_product_attention(
      x["q"], x["k"], x["v"], is_causal=not decode
    )
  if kind == "dense_sa":
    return lambda x: sa.dense_attention(x["q"], x["k"], x["v"], q_offset=off(x))
  if kind == "dsa":
    return lambda x: sa.dsa_attention(
      x["q"],
      x["k"],
      x["v"],
      x["q_idx"],
      x["k_idx"],
      x["w"],
      top_k=params["top_k"],
      q_offset=off(x),
      implementation="xla",
    )
  if kind == "dsa:topk":
    return lambda x: sa.lightning_topk(
      x["q_idx"],
      x["k_idx"],
      x["w"],
      params["top_k"],
      q_offset=off(x),
      implementation="xla",
    )
  if kind == "hisa:topk":
    return lambda x: sa.hisa_topk(
      x["q_idx"],
      x["k_idx"],
      x["w"],
      params["top_k"],
      block_size=params["hisa_block_size"],
      num_blocks=params["hisa_blocks"],
      q_offset=off(x),
    )
  if kind == "dsa:attn":
    return lambda x: sa.gathered_attention(
      x["q"], x["k"], x["v"], x["idx"], implementation="xla"
    )
  spec = registry.get(kind)
  p = spec.make_params(**params)

  def fn(x):
    return spec.attention(
      x["q"],
      x["k"],
      x["v"],
      p,
      q_offset=off(x),
      implementation="xla",
      q_idx=x["q_idx"],
      k_idx=x["k_idx"],
      weights=x["w"],
      gates=x["gates"],
    )

  if decode:
    try:  # kinds without an incremental form (LSH) refuse T != S
      jax.eval_shape(fn, make_inputs(a, 8, 1))
    except ValueError:
      return None
  return fn


def timed_fn(a, kind, mode, params):
  fn = attention_fn(a, kind, params, decode=(mode == "decode"))
  if fn is None:
    return None
  if mode != "fwdbwd" or kind in TOPK_KINDS:
    return fn  # the top-k has no backward

  def loss(q, k, v, x):
    y = fn(dict(x, q=q, k=k, v=v))
    return jnp.sum(y.astype(jnp.float32) * x["ct"])

  def fwdbwd(x):
    return jax.grad(loss, argnums=(0, 1, 2))(x["q"], x["k"], x["v"], x)

  return fwdbwd


def skip_reason(a, kind, mode, length):
  if kind in QUADRATIC:
    limit = a.bwd_max_len if mode == "fwdbwd" else a.dense_max_len
    if length > limit:
      flag = "--bwd-max-len" if mode == "fwdbwd" else "--dense-max-len"
      return f"skipped: O(L^2) path, L > {flag}={limit}"
  return None


# ---------------------------------------------------------------------------
# the benchmark


def _block(x):
  return jax.block_until_ready(x)


def run_group(a, length, mode, kinds, log):
  """All kinds of one (L, mode), compiled then timed interleaved."""
  num_q = 1 if mode == "decode" else length
  x = make_inputs(a, length, num_q)
  rows, ready = {}, {}
  for kind in kinds:
    params = kind_params(a, kind, length)
    row = {
      "L": length,
      "mode": mode,
      "kind": kind,
      "params": json.dumps(
        {k: v for k, v in params.items() if v is not None}, sort_keys=True
      ),
    }
    counts = keys_per_query(kind, length, params)
    row["budget"] = float(counts[-1] if mode == "decode" else counts.mean())
    row["model_flops"], row["model_bytes"] = cost_model(
      a, kind, mode, length, params
    )
    rows[kind] = row
    reason = skip_reason(a, kind, mode, length)
    fn = timed_fn(a, kind, mode, params)
    if fn is None:
      reason = "n/a: no incremental (decode) form"
    if reason:
      row["status"] = reason
      continue
    args = dict(x)
    if kind == "dsa:attn":
      args["idx"] = jax.jit(
        lambda y, params=params: sa.lightning_topk(
          y["q_idx"],
          y["k_idx"],
          y["w"],
          params["top_k"],
          q_offset=(length - 1 if mode == "decode" else None),
          implementation="xla",
        )
      )(x)
    if mode == "fwdbwd":
      args["ct"] = jnp.ones((a.batch, num_q, a.heads, a.head_dim), jnp.float32)
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(args).compile()
      row["compile_s"] = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      if mem is not None:
        row["temp_bytes"] = int(mem.temp_size_in_bytes)
        row["output_bytes"] = int(mem.output_size_in_bytes)
        row["arg_bytes"] = int(mem.argument_size_in_bytes)
        row["peak_bytes"] = row["temp_bytes"] + row["output_bytes"]
        if row["peak_bytes"] > a.mem_limit_gb * 2**30:
          row["status"] = (
            f"skipped: compiled temp+output "
            f"{row['peak_bytes'] / 2**30:.1f} GiB > "
            f"--mem-limit-gb={a.mem_limit_gb}"
          )
          continue
      ready[kind] = (compiled, args, [])
    except Exception as e:  # pylint: disable=broad-except
      row["status"] = (
        f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
      )
  reps = a.decode_reps if mode == "decode" else a.reps
  for r in range(reps):
    for kind, (compiled, args, times) in list(ready.items()):
      if r > 0 and (
        sum(times) + times[-1] > a.max_case_s
        or (r >= 2 and sum(times) > a.max_case_s)
      ):
        continue
      try:
        t0 = time.perf_counter()
        _block(compiled(args))
        times.append(time.perf_counter() - t0)
      except Exception as e:  # pylint: disable=broad-except
        rows[kind]["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
        del ready[kind]
  for kind, (_, _, times) in ready.items():
    # The first run of a compiled executable is a warm-up when there are more.
    use = times[1:] if len(times) > 2 else times
    rows[kind]["time_s"] = statistics.median(use)
    rows[kind]["reps"] = len(use)
    rows[kind]["status"] = "ok"
  dense = {
    k: rows[k].get("time_s") for k in ("dense_xla", "dense_sa") if k in rows
  }
  valid = [t for t in dense.values() if t]
  ref_flops = cost_model(a, "dense_sa", mode, length, {})
  for kind, row in rows.items():
    t = row.get("time_s")
    if t:
      for k, td in dense.items():
        if td:
          row[f"ratio_{k}"] = t / td
      if valid:
        row["ratio"] = t / min(valid)
    ref = ref_flops[1] if mode == "decode" else ref_flops[0]
    val = row["model_bytes"] if mode == "decode" else row["model_flops"]
    row["model_ratio"] = val / ref if ref else None
    log(
      f"  L={length:6d} {mode:6s} {kind:15s} {row.get('status', '?'):8.60s} "
      f"t={C.fmt(t)}s ratio={C.fmt(row.get('ratio'))} "
      f"model={C.fmt(row['model_ratio'])} budget={row['budget']:.1f} "
      f"mem={C.fmt((row.get('peak_bytes') or 0) / 2**20)}MiB"
    )
  return list(rows.values())


def rss_child(a, length):
  """Runs the DSA forward once at L = length; prints peak RSS (bytes) as JSON."""
  x = make_inputs(a, length, length)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  fn = jax.jit(attention_fn(a, "dsa", {"top_k": a.top_k}, decode=False))
  t0 = time.perf_counter()
  _block(fn(x))
  t = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(
    json.dumps(
      {"L": length, "peak_rss": peak, "rss_before": base, "first_call_s": t}
    )
  )


def run_rss_check(a, length, log):
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--rss-child",
    str(length),
    "--heads",
    str(a.heads),
    "--kv-heads",
    str(a.kv_heads),
    "--head-dim",
    str(a.head_dim),
    "--indexer-heads",
    str(a.indexer_heads),
    "--indexer-dim",
    str(a.indexer_dim),
    "--top-k",
    str(a.top_k),
    "--batch",
    str(a.batch),
    "--dtype",
    a.dtype,
  ]
  try:
    out = (
      subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, check=True
      )
      .stdout.strip()
      .splitlines()[-1]
    )
    res = json.loads(out)
  except Exception as e:  # pylint: disable=broad-except
    log(f"RSS check at L={length} failed: {e}")
    return None
  log(
    f"DSA forward at L={length}: peak process RSS "
    f"{res['peak_rss'] / 2**30:.2f} GiB (after inputs: "
    f"{res['rss_before'] / 2**30:.2f} GiB), first call {res['first_call_s']:.1f}s"
  )
  return res


# ---------------------------------------------------------------------------
# report


def summary_markdown(rows, a, rss=None):
  lines = []
  by = {(r["L"], r["mode"], r["kind"]): r for r in rows}
  lengths = sorted({r["L"] for r in rows})
  kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
  for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
    lines.append(
      f"\n**{mode}**: time ratio to the faster dense (measured / "
      f"FLOP{' or byte' if mode == 'decode' else ''} model); "
      f"dense times in seconds\n"
    )
    header = ["kind"] + [f"L={l}" for l in lengths]
    table = []
    for kind in kinds:
      cells = [kind]
      for l in lengths:
        r = by.get((l, mode, kind))
        if r is None:
          cells.append("")
        elif kind.startswith("dense"):
          t = r.get("time_s")
          cells.append(f"{t:.4g}s" if t else _short(r.get("status")))
        elif r.get("ratio") is not None:
          cells.append(f"{r['ratio']:.3f} / {r['model_ratio']:.3f}")
        elif r.get("time_s"):
          cells.append(
            f"{r['time_s']:.4g}s (no dense) / {r['model_ratio']:.3f}"
          )
        else:
          cells.append(_short(r.get("status")))
      table.append(cells)
    lines.append(C.markdown_table(table, header))
  lines.append(
    "\n**peak memory** (compiled temp + output, MiB), fwd / fwdbwd\n"
  )
  header = ["kind"] + [f"L={l}" for l in lengths]
  table = []
  for kind in kinds:
    cells = [kind]
    for l in lengths:
      vals = []
      for mode in ("fwd", "fwdbwd"):
        r = by.get((l, mode, kind))
        pb = r.get("peak_bytes") if r else None
        vals.append(f"{pb / 2**20:.0f}" if pb else "-")
      cells.append(" / ".join(vals))
    table.append(cells)
  lines.append(C.markdown_table(table, header))
  if rss:
    lines.append(
      f"\nDSA forward at L={rss['L']} in a fresh process: peak RSS "
      f"{rss['peak_rss'] / 2**30:.2f} GiB (inputs allocated: "
      f"{rss['rss_before'] / 2**30:.2f} GiB)."
    )
  return "\n".join(lines)


def _short(status):
  if not status:
    return ""
  if status.startswith("skipped: compiled"):
    return "skip (mem)"
  if status.startswith("skipped"):
    return "skip (len)"
  if status.startswith("n/a"):
    return "n/a"
  return "error"


def plot(rows, path):
  plt = C.pyplot()
  if plt is None:
    return False
  modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
  fig, axes = plt.subplots(
    1, len(modes) + 1, figsize=(5 * (len(modes) + 1), 4.2)
  )
  kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
  for ax, mode in zip(axes, modes):
    for kind in kinds:
      pts = sorted(
        (r["L"], r["time_s"])
        for r in rows
        if r["mode"] == mode and r["kind"] == kind and r.get("time_s")
      )
      if pts:
        style = "-" if ":" not in kind else ":"
        lw = 2.5 if kind == "dsa" else 1.2
        ax.loglog(*zip(*pts), style, marker="o", ms=3, lw=lw, label=kind)
    ax.set_title(f"{mode}: time per call")
    ax.set_xlabel("context length L")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
  ax = axes[-1]
  for kind in kinds:
    pts = sorted(
      (r["L"], r["peak_bytes"] / 2**20)
      for r in rows
      if r["mode"] == "fwd" and r["kind"] == kind and r.get("peak_bytes")
    )
    if pts:
      ax.loglog(*zip(*pts), marker="o", ms=3, label=kind)
  ax.set_title("fwd: compiled temp+output memory")
  ax.set_xlabel("context length L")
  ax.set_ylabel("MiB")
  ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None):
  a = parse_args(argv)
  if a.rss_child:
    rss_child(a, a.rss_child)
    return None
  os.makedirs(a.out_dir, exist_ok=True)
  log = lambda s: print(s, flush=True)
  lengths = [int(x) for x in a.lengths.split(",") if x]
  modes = [m for m in a.modes.split(",") if m]
  kinds = [k for k in a.kinds.split(",") if k]
  for m in modes:
    if m not in MODES:
      raise ValueError(f"unknown mode {m!r}; known: {MODES}")
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"unknown kind {k!r}; known: {KINDS}")
  log(
    f"bench_attention: B={a.batch} H={a.heads} G={a.kv_heads} "
    f"D={a.head_dim} HI={a.indexer_heads} DI={a.indexer_dim} K={a.top_k} "
    f"{a.dtype}; {C.env_line()}"
  )
  t_start = time.perf_counter()
  rows = []
  csv_path = os.path.join(a.out_dir, "bench_attention.csv")
  groups = [(length, mode) for length in lengths for mode in modes]
  # The dense references dominate: quadratic in L, linear in decode.
  eta = C.Eta(
    [
      float(length) ** (1 if mode == "decode" else 2)
      * (3 if mode == "fwdbwd" else 1)
      for length, mode in groups
    ]
  )
  for i, (length, mode) in enumerate(groups):
    log(f"[{i + 1}/{len(groups)}] L={length} {mode}{eta.text()}")
    rows += run_group(a, length, mode, kinds, log)
    C.write_csv(csv_path, rows, COLUMNS)  # partial results survive a kill
    eta.done(i)
  rss = run_rss_check(a, a.rss_check, log) if a.rss_check else None
  md = (
    f"Shape B={a.batch} H={a.heads} G={a.kv_heads} D={a.head_dim} "
    f"HI={a.indexer_heads} DI={a.indexer_dim} K={a.top_k} {a.dtype}, XLA "
    f"path; {C.env_line()}; total {time.perf_counter() - t_start:.0f} s.\n"
    + summary_markdown(rows, a, rss)
  )
  with open(
    os.path.join(a.out_dir, "bench_attention.md"), "w", encoding="utf-8"
  ) as f:
    f.write(md + "\n")
  if rss:
    with open(
      os.path.join(a.out_dir, "rss_check.json"), "w", encoding="utf-8"
    ) as f:
      json.dump(rss, f)
  plot(rows, os.path.join(a.out_dir, "bench_attention.png"))
  log(md)
  log(f"wrote {csv_path} ({time.perf_counter() - t_start:.0f} s)")
  return rows


if __name__ == "__main__":
  main()
