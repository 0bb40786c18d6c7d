"""IndexCache on a trained DSA model: which layers keep an indexer, and what
sharing the rest costs and saves.

1. Trains a DSA model (the `tiny` preset with --num-layers layers, on the
   default text, both DSA stages).
2. Evaluates, on held-out batches (sparse mode), the model with every
   indexer, the fixed pattern (one indexer every --every layers) and each
   step of the training-free greedy search (`training.index_share
   .greedy_index_share`, on calibration batches drawn from the training
   data), all from the same weights.
3. The training-aware variant: the fixed pattern trained --extra-warmup
   warm-up + --extra-sparse sparse steps more with the multi-layer
   distillation loss, against the same extra steps without it and the
   all-indexer model trained the same extra steps.
4. Cost: indexer parameters, and the sparse forward of one batch at
   --time-len tokens for the all-indexer model and the fixed pattern
   (compiled, median of --reps, run alternately).

  python experiments/index_share.py                   # ~10 min on 2 CPUs
  python experiments/index_share.py --smoke --out-dir /tmp/is   # CI

Writes <out-dir>/index_share.{md,csv}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_attn import training as T  # noqa: E402
from sparse_attn.config import override, tiny  # noqa: E402
from sparse_attn.models import INDEXER, MAIN, count_params  # noqa: E402
from sparse_attn.training import index_share as IS  # noqa: E402

COLUMNS = (
  "variant",
  "indexer_layers",
  "calib_loss",
  "eval_loss",
  "indexer_params",
  "extra_steps",
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--num-layers", type=int, default=4)
  p.add_argument("--every", type=int, default=2)
  p.add_argument("--warmup-steps", type=int, default=30)
  p.add_argument("--sparse-steps", type=int, default=150)
  p.add_argument("--extra-warmup", type=int, default=20)
  p.add_argument("--extra-sparse", type=int, default=20)
  p.add_argument("--calib-batches", type=int, default=4)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--time-len", type=int, default=4096)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--set", action="append", default=[], help="field=value")
  p.add_argument("--out-dir", default="results/index_share")
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args(argv)
  if a.smoke:
    a.num_layers, a.warmup_steps, a.sparse_steps = 2, 2, 2
    a.extra_warmup, a.extra_sparse, a.calib_batches = 1, 1, 1
    a.eval_batches, a.time_len, a.reps = 1, 256, 1
    a.set = ["train.seq_len=64", "train.batch_size=4", *a.set]
  return a


def base_config(a):
  return override(
    tiny(),
    "name=index_share",
    f"model.num_layers={a.num_layers}",
    f"train.warmup_stage_steps={a.warmup_steps}",
    f"train.sparse_stage_steps={a.sparse_steps}",
    "train.eval_every=0",
    "train.log_every=50",
    f"train.eval_batches={a.eval_batches}",
    *a.set,
  )


def batches(s, ds, n, start):
  loader = T.BatchLoader(ds, s)
  return [loader.train(start + i) for i in range(n)]


def eval_loss(model, s, eval_ds, a):
  loader = T.BatchLoader(eval_ds, s)
  return IS.calibration_loss(
    model, [loader.eval(i) for i in range(a.eval_batches)]
  )


def continue_training(cfg, model, a, distill, log):
  """`model` trained a.extra_warmup + a.extra_sparse more steps (with the
  multi-layer distillation loss when `distill` and it shares top-k)."""
  params = dict(model.cfg.attention_kwargs)
  if params.get("indexer_layers") is not None:
    params["index_share_distill"] = distill
  cfg = dataclasses.replace(
    cfg,
    model=dataclasses.replace(model.cfg, attention_params=params),
    train=dataclasses.replace(
      cfg.train,
      warmup_stage_steps=a.extra_warmup,
      sparse_stage_steps=a.extra_sparse,
      lr_warmup_steps=1,
    ),
  )
  _, idx, main = nnx.split(model, INDEXER, MAIN)
  res = T.train(
    cfg, init_params={"indexer": idx, "main": main}, echo=None, final_eval=False
  )
  log(f"  + {a.extra_warmup}+{a.extra_sparse} steps (distillation {distill})")
  return T.merge_model(res.setup, res.state)


def full_layers(model) -> list[int]:
  return [
    i
    for i, b in enumerate(model.blocks)
    if getattr(b.attn, "index_role", None) == "full"
  ]


def forward_times(models, a) -> list[float]:
  tokens = jax.random.randint(jax.random.key(0), (1, a.time_len), 0, 256)
  fns = []
  for m in models:
    gd, st = nnx.split(m)
    f = jax.jit(lambda st, t, gd=gd: nnx.merge(gd, st)(t, mode="sparse")[0])
    jax.block_until_ready(f(st, tokens))  # compile
    fns.append((f, st))
  times = [[] for _ in fns]
  for _ in range(a.reps):
    for i, (f, st) in enumerate(fns):
      t0 = time.perf_counter()
      jax.block_until_ready(f(st, tokens))
      times[i].append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]


def run(a, log):
  t0 = time.perf_counter()
  cfg = base_config(a)
  log(
    f"== DSA, {a.num_layers} layers: {a.warmup_steps} warm-up + {a.sparse_steps} sparse"
  )
  res = T.train(cfg, echo=None, final_eval=False)
  s = res.setup
  dsa = T.merge_model(s, res.state)
  train_ds, eval_ds = T.make_datasets(s.cfg)
  calib = batches(s, train_ds, a.calib_batches, 10_000)
  rows = []

  def add(variant, model, extra=0, calib_loss=None):
    rows.append(
      dict(
        variant=variant,
        indexer_layers=" ".join(map(str, full_layers(model))),
        calib_loss=calib_loss
        if calib_loss is not None
        else IS.calibration_loss(model, calib),
        eval_loss=eval_loss(model, s, eval_ds, a),
        indexer_params=count_params(model)["indexer"],
        extra_steps=extra,
      )
    )
    r = rows[-1]
    log(
      f"  {variant}: full {r['indexer_layers']}, eval loss {r['eval_loss']:.4f}"
    )

  add("DSA, every layer", dsa)
  fixed = IS.with_index_pattern(dsa, IS.every_n_pattern(a.num_layers, a.every))
  add(f"fixed: one every {a.every} (training-free)", fixed)
  steps = IS.greedy_index_share(dsa, calib, log=log)
  for st in steps[1:]:
    add(
      f"greedy, {len(steps[0].indexer_layers) - len(st.indexer_layers)} shared",
      IS.with_index_pattern(dsa, st.indexer_layers),
      calib_loss=st.loss,
    )
  extra = a.extra_warmup + a.extra_sparse
  cfg_fixed = s.cfg
  for name, model, distill in (
    ("DSA, every layer, + extra steps", dsa, False),
    (f"fixed every {a.every}, + extra steps, no distillation", fixed, False),
    (f"fixed every {a.every}, + extra steps, distillation", fixed, True),
  ):
    add(name, continue_training(cfg_fixed, model, a, distill, log), extra)
  times = forward_times([dsa, fixed], a)
  log(f"done in {time.perf_counter() - t0:.0f} s")
  return rows, times


def report(a, rows, times, argv) -> str:
  cmd = "python experiments/index_share.py" + (
    " " + " ".join(argv) if argv else ""
  )
  out = [
    f"IndexCache on a trained DSA model; {C.env_line()}.\n",
    f"`{cmd}`\n",
    C.markdown_table(
      (
        (
          r["variant"],
          r["indexer_layers"],
          f"{r['calib_loss']:.4f}",
          f"{r['eval_loss']:.4f}",
          r["indexer_params"],
          r["extra_steps"],
        )
        for r in rows
      ),
      (
        "variant",
        "full layers",
        "calibration loss",
        "held-out loss",
        "indexer params",
        "extra steps",
      ),
    ),
    "",
    f"Sparse forward of one batch of {a.time_len} tokens (median of "
    f"{a.reps}, run alternately): every layer {1e3 * times[0]:.1f} ms, one "
    f"indexer every {a.every} {1e3 * times[1]:.1f} ms ({times[0] / times[1]:.2f}x).",
    "",
  ]
  return "\n".join(out)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  log = lambda m: print(m, flush=True)
  rows, times = run(a, log)
  os.makedirs(a.out_dir, exist_ok=True)
  C.write_csv(os.path.join(a.out_dir, "index_share.csv"), rows, COLUMNS)
  text = report(a, rows, times, argv)
  with open(os.path.join(a.out_dir, "index_share.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
