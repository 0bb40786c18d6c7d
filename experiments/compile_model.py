"""Compile a run's training steps for a TPU slice that is not here (AOT, on CPU).

Answers "does this config compile on that slice, with the Pallas kernels and
the sharding, and how much HBM does each chip need?" before any TPU time is
spent. Takes every config flag of experiments/train.py.

  pip install -e ".[test]"     # brings libtpu
  python experiments/compile_model.py --target v5e:2x2 --preset tiny --mesh 2,1,2
  python experiments/compile_model.py --target v5e:4x4 --preset small --mesh 16,1,1
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train as train_cli  # noqa: E402  experiments/train.py: the config flags


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__,
    add_help=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--target", default="v5e:2x2", help="TPU topology, e.g. v5e:2x2, v4:2x2x1"
  )
  ours, rest = p.parse_known_args(argv)
  from sparse_attn import aot  # pylint: disable=g-import-not-at-top

  cfg = train_cli.build_config(train_cli.parse_args(rest))
  devices = aot.topology_devices(ours.target)
  print(
    f"target {ours.target}: {len(devices)} devices; model {cfg.model.attention}, "
    f"seq_len {cfg.train.seq_len}, batch {cfg.train.batch_size}, "
    f"mesh {cfg.train.mesh_shape or (len(devices), 1, 1)}"
  )
  reports = aot.compile_train_steps(cfg, devices)
  for r in reports:
    print(
      f"  {r.name:13s} compiled in {r.seconds:6.1f} s  Pallas kernels: "
      f"{'yes' if r.uses_kernels else 'no ':3s}  per device: arguments "
      f"{r.argument_bytes / 2**20:8.1f} MiB  temporaries {r.temp_bytes / 2**20:8.1f} MiB  "
      f"total {r.peak_bytes / 2**30:6.2f} GiB"
    )
  return reports


if __name__ == "__main__":
  main()
