"""implementation= dispatch: the public API routes to the Pallas kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testutil import make_inputs

import sparse_attn as sa
from sparse_attn import dispatch


def test_default_is_xla_on_cpu():
  assert jax.default_backend() == "cpu"
  assert dispatch.resolve(None) == "xla"
  assert dispatch.resolve("pallas") == "pallas"
  with pytest.raises(ValueError, match="implementation must be one of"):
    dispatch.resolve("triton")


def test_public_api_pallas_matches_xla_in_interpret_mode(rng):
  B, T, S, H, G, D, HI, DI, K = 1, 12, 20, 4, 2, 16, 2, 8, 5
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  # Positive indexer inputs: no relu zeros, hence no tied scores, so both
  # implementations select the same set and the gradients are comparable.
  for n in ("q_idx", "k_idx", "weights"):
    x[n] = np.abs(x[n])
  args = [x[n] for n in ("q", "k", "v", "q_idx", "k_idx", "weights")]
  kv = jnp.array([17], jnp.int32)
  sel = {impl: sa.lightning_topk(*args[3:], K, kv_lengths=kv, implementation=impl)
         for impl in ("xla", "pallas")}
  scores = np.asarray(sa.indexer_scores(*args[3:], kv_lengths=kv))
  for impl, s in sel.items():
    s = np.asarray(s)
    picked = np.where(s >= 0, np.take_along_axis(scores, np.maximum(s, 0), -1), -np.inf)
    np.testing.assert_allclose(np.sort(picked, -1), np.sort(
        np.where(sel["xla"] >= 0, np.take_along_axis(scores, np.maximum(sel["xla"], 0), -1),
                 -np.inf), -1), rtol=1e-5, err_msg=impl)
  idx = sel["xla"]
  out = {impl: sa.gathered_attention(*args[:3], idx, implementation=impl)
         for impl in ("xla", "pallas")}
  np.testing.assert_allclose(out["pallas"], out["xla"], rtol=1e-5, atol=1e-5)
  f = lambda impl: jax.grad(lambda q: jnp.sum(
      sa.dsa_attention(q, *args[1:], top_k=K, kv_lengths=kv, implementation=impl) ** 2))(args[0])
  np.testing.assert_allclose(f("pallas"), f("xla"), rtol=1e-4, atol=1e-5)
