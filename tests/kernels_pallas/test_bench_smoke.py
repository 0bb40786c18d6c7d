import os
import subprocess
import sys

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def test_bench_smoke(tmp_path):
  out = tmp_path / "b.csv"
  res = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "bench_kernels.py"),
      "--smoke",
      "--csv",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert out.read_text().startswith("kernel,")
