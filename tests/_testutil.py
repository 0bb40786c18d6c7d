"""Shared test inputs (the odd-size case grid, random inputs) and a script runner."""

import os
import subprocess
import sys

import numpy as np
import pytest


def rand(rng, shape, dtype=np.float32):
  return rng.standard_normal(shape).astype(dtype)


# (B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths): odd sizes, T != S,
# per-sequence offsets, padding, and K above the number of visible keys.
CASES = [
  pytest.param(2, 37, 101, 6, 3, 40, 4, 16, 17, None, None, id="odd"),
  pytest.param(
    2, 37, 101, 6, 3, 40, 4, 16, 17, 20, [101, 45], id="offset_kvlen"
  ),
  pytest.param(
    1, 29, 29, 4, 1, 8, 2, 8, 17, None, None, id="causal_k_gt_visible"
  ),
  pytest.param(
    2, 5, 33, 4, 2, 16, 3, 8, 40, [3, 28], [30, 33], id="per_seq_offset_k_gt_s"
  ),
  pytest.param(
    3, 1, 50, 8, 8, 16, 2, 8, 7, None, [50, 10, 1], id="decode_step"
  ),
]


def make_inputs(rng, B, T, S, H, G, D, HI, DI, dtype=np.float32, Dv=None):
  Dv = D if Dv is None else Dv
  return dict(
    q=rand(rng, (B, T, H, D), dtype),
    k=rand(rng, (B, S, G, D), dtype),
    v=rand(rng, (B, S, G, Dv), dtype),
    q_idx=rand(rng, (B, T, HI, DI), dtype),
    k_idx=rand(rng, (B, S, DI), dtype),
    weights=rand(rng, (B, T, HI), dtype),
  )


def as_jnp_opt(x):
  import jax.numpy as jnp

  return None if x is None else jnp.asarray(x, jnp.int32)


def assert_same_grads(f, g, args, rtol=1e-4, atol=1e-5, nonzero=False):
  """The gradients of scalar functions f and g w.r.t. every one of args
  agree, and are finite (with nonzero: not all zero, so that a path that
  cut the gradient cannot pass)."""
  import jax

  argnums = tuple(range(len(args)))
  for a, b in zip(jax.grad(f, argnums)(*args), jax.grad(g, argnums)(*args)):
    assert np.all(np.isfinite(a))
    assert not nonzero or np.any(np.asarray(a) != 0)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=600):
  """Runs experiments/<name>.py with args as a user does; returns stdout.

  A fresh process on the CPU backend (one device, whatever XLA_FLAGS the
  test process has), the repository importable without an install.
  """
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", f"{name}.py"),
      *map(str, args),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
    check=False,
  )
  assert proc.returncode == 0, (
    f"experiments/{name}.py {' '.join(map(str, args))} failed:\n"
    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  )
  return proc.stdout
