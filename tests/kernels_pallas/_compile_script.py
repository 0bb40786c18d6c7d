"""Runs experiments/compile_kernels.py in a fresh process, returns its JSON rows.

A fresh process because the CUDA compiler plugin must be configured before
JAX starts its backends (the script sets JAX_PLATFORMS=cpu first thing).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
SCRIPT = os.path.join(ROOT, "experiments", "compile_kernels.py")


def run_compile_kernels(tmp_path, target, cases, timeout=600):
  out = tmp_path / f"{target.replace(':', '_')}.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  res = subprocess.run(
    [
      sys.executable,
      SCRIPT,
      "--target",
      target,
      "--cases",
      *cases,
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )
  assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert res.returncode == (0 if all(r["ok"] for r in rows) else 1), res.stderr[
    -3000:
  ]
  return rows
