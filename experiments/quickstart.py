"""Quickstart: a tiny DSA model vs its dense twin on Python-stdlib bytes.

  python experiments/quickstart.py            # about a minute on a 2-core CPU
  python experiments/quickstart.py --smoke    # ~20 s, for CI

1. Trains the `tiny` preset with DSA: dense warm-up (main model frozen, only
   the lightning indexer learns to imitate the dense attention), then the
   sparse stage (each query attends only its top-k keys; everything trains).
2. Trains the dense twin (same config, attention="dense") for the same total
   number of steps.
3. Prints the validation loss of both and the fraction of (query, key) pairs
   the DSA model attends, relative to dense causal attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_attn import training as train_lib  # pylint: disable=g-import-not-at-top
from sparse_attn.config import override, tiny  # pylint: disable=g-import-not-at-top

SMOKE = (
  "model.num_layers=1",
  "train.seq_len=64",
  "model.top_k=16",
  "train.batch_size=8",
  "train.warmup_stage_steps=3",
  "train.sparse_stage_steps=6",
  "train.lr_warmup_steps=2",
  "train.eval_batches=1",
  "train.eval_every=0",
  "train.log_every=3",
  "train.max_bytes=300000",
  "train.eval_max_bytes=50000",
)


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--smoke", action="store_true", help="a ~20 s run for CI")
  p.add_argument(
    "--run-dir",
    help="keep checkpoints/metrics under this "
    "directory (<run-dir>/dsa, <run-dir>/dense); default: none",
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config field, e.g. model.top_k=16",
  )
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  cfg = override(
    tiny(),
    "name=quickstart",
    "train.eval_every=0",
    *(SMOKE if args.smoke else ()),
    *args.set,
  )
  dense_cfg = override(cfg, **{"model.attention": "dense"})
  run = lambda sub: os.path.join(args.run_dir, sub) if args.run_dir else None

  print(
    "== DSA: dense warm-up (indexer only), then sparse top-k training ==",
    flush=True,
  )
  dsa = train_lib.train(cfg, run("dsa"), resume=False)
  print(
    "== dense twin: same config with attention='dense', same step count ==",
    flush=True,
  )
  dense = train_lib.train(dense_cfg, run("dense"), resume=False)

  a, b = dsa.final_eval, dense.final_eval
  t = dsa.setup.cfg.train
  print()
  print(
    f"data: {t.dataset} (Python stdlib bytes), seq_len {t.seq_len}, "
    f"batch {t.batch_size}; steps: DSA {t.warmup_stage_steps} warm-up + "
    f"{t.sparse_stage_steps} sparse, dense {dense.setup.cfg.train.total_steps}"
  )
  print(
    f"validation loss  DSA (top_k={cfg.model.top_k}): {a['loss']:.4f} nats/byte"
  )
  print(f"validation loss  dense twin:        {b['loss']:.4f} nats/byte")
  print(
    f"keys attended by DSA: {a['attended_fraction']:.3f} of dense causal "
    f"(indexer KL, summed over layers: {a['indexer_kl']:.4f})"
  )
  print(f"total time: {time.perf_counter() - t0:.1f} s")
  return dsa, dense


if __name__ == "__main__":
  main()
