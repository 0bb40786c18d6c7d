"""Shared test inputs: the odd-size case grid and random input builders."""

import numpy as np
import pytest


def rand(rng, shape, dtype=np.float32):
  return rng.standard_normal(shape).astype(dtype)


# (B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths): odd sizes, T != S,
# per-sequence offsets, padding, and K above the number of visible keys.
CASES = [
    pytest.param(2, 37, 101, 6, 3, 40, 4, 16, 17, None, None, id="odd"),
    pytest.param(2, 37, 101, 6, 3, 40, 4, 16, 17, 20, [101, 45], id="offset_kvlen"),
    pytest.param(1, 29, 29, 4, 1, 8, 2, 8, 17, None, None, id="causal_k_gt_visible"),
    pytest.param(2, 5, 33, 4, 2, 16, 3, 8, 40, [3, 28], [30, 33], id="per_seq_offset_k_gt_s"),
    pytest.param(3, 1, 50, 8, 8, 16, 2, 8, 7, None, [50, 10, 1], id="decode_step"),
]


def make_inputs(rng, B, T, S, H, G, D, HI, DI, dtype=np.float32, Dv=None):
  Dv = D if Dv is None else Dv
  return dict(
      q=rand(rng, (B, T, H, D), dtype), k=rand(rng, (B, S, G, D), dtype),
      v=rand(rng, (B, S, G, Dv), dtype), q_idx=rand(rng, (B, T, HI, DI), dtype),
      k_idx=rand(rng, (B, S, DI), dtype), weights=rand(rng, (B, T, HI), dtype))


def as_jnp_opt(x):
  import jax.numpy as jnp
  return None if x is None else jnp.asarray(x, jnp.int32)
