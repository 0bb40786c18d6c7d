"""Bad input raises ValueError naming the argument and the shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

import sparse_attn as sa

B, T, S, H, G, D, HI, DI = 2, 5, 7, 4, 2, 8, 2, 4
f32 = jnp.float32


def inputs():
  z = lambda *s: jnp.zeros(s, f32)
  return dict(
    q=z(B, T, H, D),
    k=z(B, S, G, D),
    v=z(B, S, G, D),
    q_idx=z(B, T, HI, DI),
    k_idx=z(B, S, DI),
    weights=z(B, T, HI),
  )


def idx():
  return jnp.zeros((B, T, 3), jnp.int32)


BAD = [
  # (function, kwargs override, message regex)
  (
    "dense",
    dict(q=jnp.zeros((B, T, H), f32)),
    r"q must have rank 4.*\(2, 5, 4\)",
  ),
  (
    "dense",
    dict(k=jnp.zeros((B, S, G, D + 1), f32)),
    r"k shape \(2, 7, 2, 9\)",
  ),
  (
    "dense",
    dict(v=jnp.zeros((B, S + 1, G, D), f32)),
    r"v shape \(2, 8, 2, 8\)",
  ),
  (
    "dense",
    dict(k=jnp.zeros((B, S, 3, D), f32), v=jnp.zeros((B, S, 3, D), f32)),
    r"H=4 must be a multiple of kv heads G=3",
  ),
  (
    "dense",
    dict(q=jnp.zeros((B, T, H, D), jnp.bfloat16)),
    r"dtype mismatch.*q: bfloat16",
  ),
  (
    "dense",
    dict(q=jnp.zeros((B, T, H, D), jnp.int32)),
    r"q must be a floating array",
  ),
  (
    "dense",
    dict(kv_lengths=jnp.zeros((B + 1,), jnp.int32)),
    r"kv_lengths must have shape",
  ),
  ("dense", dict(q_offset=jnp.zeros((3,), jnp.int32)), r"q_offset must be"),
  ("dense", dict(q_offset=True), r"q_offset must be an integer array"),
  ("dense", dict(query_chunk=0), r"query_chunk must be >= 1, got 0"),
  ("dense", dict(query_chunk=2.0), r"query_chunk must be a positive int"),
  ("dense_kl", dict(query_chunk=0), r"query_chunk must be >= 1, got 0"),
  ("dense_kl", dict(query_chunk=True), r"query_chunk must be a positive int"),
  ("topk", dict(query_chunk=0), r"query_chunk must be >= 1, got 0"),
  (
    "gathered",
    dict(indices=jnp.zeros((B, T + 1, 3), jnp.int32)),
    r"indices shape \(2, 6, 3\)",
  ),
  (
    "gathered",
    dict(indices=jnp.zeros((B, T, 3), f32)),
    r"indices must be an integer",
  ),
  (
    "gathered",
    dict(indices=jnp.zeros((B, T), jnp.int32)),
    r"indices must have rank 3",
  ),
  (
    "scores",
    dict(k_idx=jnp.zeros((B, S, DI + 1), f32)),
    r"k_idx shape \(2, 7, 5\)",
  ),
  (
    "scores",
    dict(weights=jnp.zeros((B, T, HI + 1), f32)),
    r"weights shape \(2, 5, 3\)",
  ),
  ("scores", dict(q_idx=jnp.zeros((B, T, HI), f32)), r"q_idx must have rank 4"),
  ("topk", dict(k=0), r"k \(top_k\) must be >= 1"),
  ("topk", dict(k=2.5), r"k \(top_k\) must be a Python int"),
  ("select", dict(k=0), r"k \(top_k\) must be >= 1"),
  ("select", dict(scores=jnp.zeros((B, T), f32)), r"scores must have rank 3"),
  ("dsa", dict(top_k=0), r"k \(top_k\) must be >= 1"),
  (
    "dsa",
    dict(q_idx=jnp.zeros((B, T + 1, HI, DI), f32)),
    r"q_idx \(2, 6, 2, 4\) vs q",
  ),
  (
    "dsa",
    dict(k=jnp.zeros((B, S, 3, D), f32), v=jnp.zeros((B, S, 3, D), f32)),
    r"multiple of kv heads",
  ),
  (
    "dense_kl",
    dict(k_idx=jnp.zeros((B, S + 1, DI), f32)),
    r"k_idx \(2, 8, 4\) vs k",
  ),
  ("sparse_kl", dict(indices=jnp.zeros((B, T, 0), jnp.int32)), r"K >= 1"),
  ("sparse_kl", dict(weights=jnp.zeros((B, T + 2, HI), f32)), r"weights shape"),
  ("gathered", dict(implementation="cuda"), r"implementation must be one of"),
  ("dsa", dict(implementation="fast"), r"implementation must be one of"),
]


def call(name, over):
  a = inputs()
  a.update(indices=idx(), top_k=3)
  base = {**a, **over}
  kw = {n: base[n] for n in ("q_offset", "kv_lengths") if n in base}
  chunk = {n: base[n] for n in ("query_chunk",) if n in base}
  if name == "dense":
    return sa.dense_attention(base["q"], base["k"], base["v"], **kw, **chunk)
  if name == "gathered":
    return sa.gathered_attention(
      base["q"],
      base["k"],
      base["v"],
      base["indices"],
      implementation=base.get("implementation"),
    )
  if name == "scores":
    return sa.indexer_scores(base["q_idx"], base["k_idx"], base["weights"])
  if name == "topk":
    return sa.lightning_topk(
      base["q_idx"], base["k_idx"], base["weights"], over.get("k", 3), **chunk
    )
  if name == "select":
    return sa.select_topk(
      base.get("scores", jnp.zeros((B, T, S), f32)), over.get("k", 3)
    )
  if name == "dsa":
    return sa.dsa_attention(
      base["q"],
      base["k"],
      base["v"],
      base["q_idx"],
      base["k_idx"],
      base["weights"],
      top_k=base["top_k"],
      implementation=base.get("implementation"),
    )
  if name == "dense_kl":
    return sa.dense_indexer_kl(
      base["q"],
      base["k"],
      base["q_idx"],
      base["k_idx"],
      base["weights"],
      **chunk,
    )
  if name == "sparse_kl":
    return sa.sparse_indexer_kl(
      base["q"],
      base["k"],
      base["q_idx"],
      base["k_idx"],
      base["weights"],
      base["indices"],
    )
  raise AssertionError(name)


@pytest.mark.parametrize(
  "name,over,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_raises_value_error(name, over, msg):
  with pytest.raises(ValueError, match=msg):
    call(name, over)


@pytest.mark.parametrize(
  "name",
  [
    "dense",
    "gathered",
    "scores",
    "topk",
    "select",
    "dsa",
    "dense_kl",
    "sparse_kl",
  ],
)
def test_good_input_runs(name):
  out = call(name, {})
  assert np.all(np.isfinite(np.asarray(out))) or name in ("scores",)
