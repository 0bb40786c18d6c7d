"""Train a DSA (or dense / other kind) model: both DeepSeek-V3.2-Exp stages.

  python experiments/train.py --preset tiny --run-dir runs/tiny_dsa
  python experiments/train.py --preset tiny --attention dense --run-dir runs/tiny_dense
  # DeepSeek-V3.2's architecture (MLA + DSA on the q latent, MoE), same recipe:
  python experiments/train.py --model deepseek_v32 --preset tiny --run-dir runs/ds_tiny
  # 8 virtual CPU devices, mesh data=2 x fsdp=2 x tensor=2:
  python experiments/train.py --preset tiny --host-devices 8 --mesh 2,2,2 --run-dir runs/mesh
  # context parallelism: the sequence split over 4 devices (zigzag layout):
  python experiments/train.py --preset tiny --host-devices 8 --mesh 2,1,1,4 --run-dir runs/cp
  # any field: --set model.num_layers=4 --set train.indexer_loss_scale=0.5
  # multi-host (run once per process):
  python experiments/train.py --coordinator HOST:PORT --num-processes 2 --process-id 0 ...

Re-running the same command resumes from the latest checkpoint in --run-dir
(data position and RNG included); --no-resume starts over (old checkpoints in
the directory are then overwritten as new ones are saved).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--model",
    default="transformer",
    help="model family: transformer (tiny | small | base) | deepseek_v32 "
    "(tiny | small)",
  )
  p.add_argument("--preset", default="tiny", help="a preset of --model")
  p.add_argument(
    "--config",
    help="JSON config file (e.g. a run's config.json); replaces --preset",
  )
  p.add_argument(
    "--run-dir",
    help="checkpoints, config.json, metrics.jsonl "
    "(default runs/<name>_<attention>)",
  )
  p.add_argument("--name", help="run name (config.name)")
  p.add_argument("--attention", help="attention kind: dsa | dense | ...")
  p.add_argument("--top-k", type=int)
  p.add_argument("--warmup-steps", type=int, help="dense warm-up stage steps")
  p.add_argument("--sparse-steps", type=int, help="sparse stage steps")
  p.add_argument("--lr", type=float, help="main model peak LR")
  p.add_argument("--indexer-lr", type=float, help="indexer peak LR")
  p.add_argument("--batch-size", type=int, help="global batch size")
  p.add_argument("--seq-len", type=int)
  p.add_argument("--dataset", help="text | mqar | passkey | niah | vartrack")
  p.add_argument("--data-path", help="text corpus file/directory")
  p.add_argument(
    "--mesh",
    help="data,fsdp,tensor[,context] (product = device count; context > 1 "
    "shards the sequence)",
  )
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override any field, e.g. model.num_layers=4",
  )
  p.add_argument("--no-resume", action="store_true")
  p.add_argument(
    "--host-devices",
    type=int,
    help="CPU only: expose N virtual devices (sets XLA_FLAGS)",
  )
  p.add_argument("--coordinator", help="host:port of process 0 (multi-host)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument(
    "--print-config",
    action="store_true",
    help="print the resolved config and exit",
  )
  return p.parse_args(argv)


def build_config(args):
  from sparse_attn.config import Config, override, preset  # pylint: disable=g-import-not-at-top

  if args.config:
    with open(args.config, encoding="utf-8") as f:
      cfg = Config.from_json(f.read())
  else:
    cfg = preset(args.preset, model=args.model)
  sets = []
  flag_fields = {
    "attention": "model.attention",
    "top_k": "model.top_k",
    "warmup_steps": "train.warmup_stage_steps",
    "sparse_steps": "train.sparse_stage_steps",
    "lr": "train.lr",
    "indexer_lr": "train.indexer_lr",
    "batch_size": "train.batch_size",
    "seq_len": "train.seq_len",
    "dataset": "train.dataset",
    "name": "name",
  }
  changes = {
    field: getattr(args, flag)
    for flag, field in flag_fields.items()
    if getattr(args, flag) is not None
  }
  if args.data_path is not None:
    changes["train.data_path"] = args.data_path
  if args.mesh:
    try:
      mesh = tuple(int(x) for x in args.mesh.split(","))
    except ValueError:
      raise ValueError(
        f"--mesh must be 3 or 4 ints like 2,2,2 or 2,1,1,4 (data, fsdp, "
        f"tensor[, context]), got {args.mesh!r}"
      ) from None
    changes["train.mesh_shape"] = mesh
  sets.extend(args.set)
  return override(cfg, *sets, **changes)


def main(argv=None):
  args = parse_args(argv)
  if args.host_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={args.host_devices}"
    )
  from sparse_attn import training as train_lib  # pylint: disable=g-import-not-at-top

  train_lib.init_distributed(
    args.coordinator, args.num_processes, args.process_id
  )
  cfg = build_config(args)
  if args.print_config:
    print(cfg.to_json())
    return None
  run_dir = args.run_dir or os.path.join(
    "runs", f"{cfg.name}_{cfg.model.attention}"
  )
  result = train_lib.train(cfg, run_dir, resume=not args.no_resume)
  if result.final_eval:
    ev = result.final_eval
    print(
      f"final: validation loss {ev['loss']:.4f} "
      f"attended {ev['attended_fraction']:.3f} -> {run_dir}",
      flush=True,
    )
  return result


if __name__ == "__main__":
  main()
