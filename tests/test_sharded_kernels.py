"""Pallas kernels under jit + mesh (shard_map over batch and heads), 8 CPU devices."""

import os
import subprocess
import sys


def test_pallas_under_mesh_matches_xla():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  worker = os.path.join(os.path.dirname(__file__), "_sharded_kernels_worker.py")
  proc = subprocess.run([sys.executable, worker], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "OK sharded pallas == xla" in proc.stdout
