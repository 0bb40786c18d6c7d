"""Per-device memory of a training step vs the context-parallel size.

Compiles (no run) the warm-up and sparse train steps of one config at a
fixed long sequence, on mesh (1, 1, 1, C) of C of the N virtual devices for
each context size C and each sparse-attention strategy, and reports what
XLA's memory analysis gives per device: arguments (parameters, optimiser
state, batch) and temporaries (activations, gradients, collectives'
buffers). Parameters are replicated in every row, so what changes is only
the sequence split.

  python experiments/context_memory.py                 # 32K tokens, 8 CPU devices
  python experiments/context_memory.py --seq-len 8192 --contexts 1,2,4
  python experiments/context_memory.py --smoke      # tiny, seconds

Writes <out-dir>/context_memory.{md,csv}. Figures are the CPU compiler's
(an accelerator's allocator and fusion differ; the scaling is the point).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = (
  "context",
  "mesh",
  "strategy",
  "stage",
  "argument_mib",
  "temp_mib",
  "total_mib",
  "compile_s",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--devices", type=int, default=8, help="virtual CPU devices")
  p.add_argument("--seq-len", type=int, default=32768)
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--contexts", default="1,2,4,8", help="context sizes C")
  p.add_argument("--strategies", default="fetch,all_gather")
  p.add_argument("--preset", default="small", help="a config preset")
  p.add_argument("--set", action="append", default=[], help="field=value")
  p.add_argument("--out-dir", default="results/context_memory")
  p.add_argument(
    "--smoke", action="store_true", help="tiny preset, 1K tokens, C in 1,2"
  )
  a = p.parse_args(argv)
  if a.smoke:
    a.preset, a.seq_len, a.contexts, a.devices = "tiny", 1024, "1,2", 2
  return a


def main(argv=None):
  a = parse_args(argv)
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count={a.devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import _common as C  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from sparse_attn import aot, config  # pylint: disable=g-import-not-at-top

  contexts = [int(x) for x in a.contexts.split(",")]
  if max(contexts) > len(jax.devices()):
    raise ValueError(
      f"--contexts {a.contexts} needs {max(contexts)} devices, "
      f"{len(jax.devices())} available (--devices)."
    )
  base = config.override(
    config.preset(a.preset),
    f"train.seq_len={a.seq_len}",
    f"train.batch_size={a.batch_size}",
    *a.set,
  )
  rows = []
  for c in contexts:
    mesh = (1, 1, 1, c)
    strategies = a.strategies.split(",") if c > 1 else ["-"]
    for strategy in strategies:
      sets = [f"train.mesh_shape={list(mesh)}"]
      if c > 1:
        sets.append(f'train.context_strategy="{strategy}"')
      cfg = config.override(base, *sets)
      t0 = time.perf_counter()
      reports = aot.compile_train_steps(cfg, jax.devices()[:c], eval_step=False)
      for r in reports:
        mib = lambda b: round(b / 2**20, 1)
        row = {
          "context": c,
          "mesh": "x".join(map(str, mesh)),
          "strategy": strategy,
          "stage": r.name.removeprefix("train_"),
          "argument_mib": mib(r.argument_bytes),
          "temp_mib": mib(r.temp_bytes),
          "total_mib": mib(r.argument_bytes + r.temp_bytes),
          "compile_s": round(r.seconds, 1),
        }
        rows.append(row)
        print(row, flush=True)
      print(f"  C={c} {strategy}: {time.perf_counter() - t0:.0f} s", flush=True)
  os.makedirs(a.out_dir, exist_ok=True)
  C.write_csv(os.path.join(a.out_dir, "context_memory.csv"), rows, COLUMNS)
  cmd = "python experiments/context_memory.py " + " ".join(
    sys.argv[1:] if argv is None else argv
  )
  lines = [
    f"Per-device memory of one train step, {a.preset} preset, "
    f"{a.batch_size} x {a.seq_len} tokens on {a.devices} CPU devices "
    f"(`{cmd.strip()}`).",
    "",
    "| C | mesh | strategy | stage | arguments MiB | temporaries MiB | "
    "total MiB |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['context']} | {r['mesh']} | {r['strategy']} | {r['stage']} | "
      f"{r['argument_mib']} | {r['temp_mib']} | {r['total_mib']} |"
    )
  md = "\n".join(lines) + "\n"
  with open(os.path.join(a.out_dir, "context_memory.md"), "w") as f:
    f.write(md)
  print(md)
  return rows


if __name__ == "__main__":
  main()
