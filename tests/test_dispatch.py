"""implementation= dispatch: the public API routes to the Pallas kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa
from _testutil import make_inputs
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
  sel = {
    impl: sa.lightning_topk(*args[3:], K, kv_lengths=kv, implementation=impl)
    for impl in ("xla", "pallas")
  }
  scores = np.asarray(sa.indexer_scores(*args[3:], kv_lengths=kv))
  for impl, s in sel.items():
    s = np.asarray(s)
    picked = np.where(
      s >= 0, np.take_along_axis(scores, np.maximum(s, 0), -1), -np.inf
    )
    np.testing.assert_allclose(
      np.sort(picked, -1),
      np.sort(
        np.where(
          sel["xla"] >= 0,
          np.take_along_axis(scores, np.maximum(sel["xla"], 0), -1),
          -np.inf,
        ),
        -1,
      ),
      rtol=1e-5,
      err_msg=impl,
    )
  idx = sel["xla"]
  out = {
    impl: sa.gathered_attention(*args[:3], idx, implementation=impl)
    for impl in ("xla", "pallas")
  }
  np.testing.assert_allclose(out["pallas"], out["xla"], rtol=1e-5, atol=1e-5)
  f = lambda impl: jax.grad(
    lambda q: jnp.sum(
      sa.dsa_attention(
        q, *args[1:], top_k=K, kv_lengths=kv, implementation=impl
      )
      ** 2
    )
  )(args[0])
  np.testing.assert_allclose(f("pallas"), f("xla"), rtol=1e-4, atol=1e-5)


def test_kernel_interprets_follows_the_compile_target():
  assert dispatch.kernel_interprets()  # CPU host: Pallas interpreter
  with dispatch.compile_target("tpu"):
    assert not dispatch.kernel_interprets()


def test_block_sizes_reach_the_kernels(rng):
  from kernels_pallas.gathered_attention import BlockSizes

  B, T, S, H, G, D, HI, DI, K = 1, 8, 16, 4, 2, 8, 2, 8, 4
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  q, k, v = (x[n] for n in "qkv")
  idx = jnp.asarray(rng.integers(-1, S, (B, T, K)), jnp.int32)
  want = sa.gathered_attention(q, k, v, idx, implementation="xla")
  for bs in (BlockSizes(bwd_chunk_t=3), {"bwd_chunk_t": 3}):
    got = sa.gathered_attention(
      q, k, v, idx, implementation="pallas", block_sizes=bs
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Passed through: sizes the (interpreted) TPU formulation cannot take fail there.
  with pytest.raises(ValueError, match="multiple of 8"):
    sa.lightning_topk(
      x["q_idx"],
      x["k_idx"],
      x["weights"],
      K,
      implementation="pallas",
      block_sizes={"block_t": 12},
    )
  with pytest.raises(ValueError, match="multiple of 8"):
    sa.dsa_attention(
      q,
      k,
      v,
      x["q_idx"],
      x["k_idx"],
      x["weights"],
      top_k=K,
      implementation="pallas",
      topk_block_sizes={"block_t": 12},
    )
  with pytest.raises(ValueError, match="multiple of 128"):
    sa.gathered_attention(
      q,
      k,
      v,
      jnp.zeros((B, T, 200), jnp.int32),
      implementation="pallas",
      block_sizes={"block_k": 100},
    )
  # The XLA path ignores them (but still checks them).
  out = sa.dsa_attention(
    q,
    k,
    v,
    x["q_idx"],
    x["k_idx"],
    x["weights"],
    top_k=K,
    implementation="xla",
    topk_block_sizes={"block_t": 16},
    attention_block_sizes={"block_k": 16},
  )
  assert out.shape == (B, T, H, D)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_block_sizes_are_validated(rng, impl):
  from kernels_pallas.topk import BlockSizes as TopkBlockSizes

  B, T, S, H, G, D, HI, DI, K = 1, 4, 8, 2, 1, 8, 2, 8, 2
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  args = [x[n] for n in ("q", "k", "v", "q_idx", "k_idx", "weights")]
  idx = jnp.zeros((B, T, K), jnp.int32)
  with pytest.raises(
    ValueError, match="^block_sizes must be None, a .*BlockSizes or a dict"
  ):
    sa.gathered_attention(
      *args[:3], idx, implementation=impl, block_sizes=(16, 16)
    )
  with pytest.raises(ValueError, match="^block_sizes must be None"):
    # the top-k kernel's sizes are not the attention kernel's
    sa.gathered_attention(
      *args[:3], idx, implementation=impl, block_sizes=TopkBlockSizes()
    )
  with pytest.raises(
    ValueError, match="^block_sizes: unknown .*field.*'block_q'"
  ):
    sa.lightning_topk(
      *args[3:], K, implementation=impl, block_sizes={"block_q": 8}
    )
  with pytest.raises(
    ValueError, match="^topk_block_sizes: BlockSizes.block_t must be a positive"
  ):
    sa.dsa_attention(
      *args, top_k=K, implementation=impl, topk_block_sizes={"block_t": 0}
    )
  with pytest.raises(ValueError, match="^attention_block_sizes must be None"):
    sa.dsa_attention(
      *args, top_k=K, implementation=impl, attention_block_sizes="big"
    )
