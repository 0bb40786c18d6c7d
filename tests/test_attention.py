import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import np_reference as ref
import sparse_attn as sa
from _testutil import CASES, as_jnp_opt, assert_same_grads, make_inputs


def _kw(q_offset, kv_lengths):
  return dict(
    q_offset=as_jnp_opt(q_offset) if isinstance(q_offset, list) else q_offset,
    kv_lengths=as_jnp_opt(kv_lengths),
  )


def random_indices(rng, B, T, S, K, empty_rows=()):
  idx = rng.integers(-1, S, size=(B, T, K)).astype(np.int32)
  for b, t in empty_rows:
    idx[b, t] = -1
  return idx


@pytest.mark.parametrize("B,T,S,H,G,D,HI,DI,K,q_offset,kv_lengths", CASES)
def test_dense_attention_matches_numpy(
  rng, B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths
):
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI, Dv=D + 3)
  want = ref.dense_attention(x["q"], x["k"], x["v"], q_offset, kv_lengths)
  for chunk in (None, 7):
    got = sa.dense_attention(
      x["q"], x["k"], x["v"], query_chunk=chunk, **_kw(q_offset, kv_lengths)
    )
    assert got.shape == (B, T, H, D + 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "T,S,q_offset,kv_lengths",
  [
    (203, 203, None, None),  # training: T == S, odd length
    (150, 217, None, [217, 90]),  # default offset S - T, padded row
    (131, 160, 11, None),  # static offset: the last 18 keys are future
    (140, 140, -3, None),  # the first queries see no key
    (140, 140, -100, None),  # the whole first segment sees no key
    (130, 140, 100, None),  # every segment sees all S keys
  ],
)
def test_dense_attention_causal_segments(rng, T, S, q_offset, kv_lengths):
  """The static-offset path (each query segment over the keys it can see)
  equals the numpy reference and, values and gradients, the path a traced
  offset takes (every block over all S keys)."""
  from sparse_attn.ops import chunking as C

  assert len(C.causal_segments(T)) > 1
  B, H, G, D = 2, 4, 2, 8
  x = make_inputs(rng, B, T, S, H, G, D, 1, 1, Dv=D + 3)
  q, k, v = (jnp.asarray(x[n]) for n in "qkv")
  kvl = as_jnp_opt(kv_lengths)
  off = S - T if q_offset is None else q_offset
  want = ref.dense_attention(x["q"], x["k"], x["v"], q_offset, kv_lengths)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

  static = lambda q, k, v, c=None: sa.dense_attention(
    q, k, v, q_offset=q_offset, kv_lengths=kvl, query_chunk=c
  )
  traced = lambda q, k, v: sa.dense_attention(
    q, k, v, q_offset=jnp.full((B,), off, jnp.int32), kv_lengths=kvl
  )
  for chunk in (None, 7):
    got = jax.jit(lambda q, k, v, c=chunk: static(q, k, v, c))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(traced(q, k, v), want, rtol=1e-4, atol=1e-5)
  assert_same_grads(loss(static), loss(traced), (q, k, v))


def test_dense_attention_causal_segments_cost_and_memory():
  """The static path computes fewer logits (XLA's flop count: (n+1)/(2n) of
  T*S at n segments within the budget; past it, paired query chunks, about
  half) and, where T x S exceeds the budget, needs less memory for the
  gradient than the chunked path of a traced offset."""
  from sparse_attn.ops import attention as A
  from sparse_attn.ops import chunking

  def compiled(T, traced, grad):
    B, H, G, D = 1, 4, 2, 32
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, G, D), jnp.float32)
    off = jnp.zeros((B,), jnp.int32) if traced else None
    f = lambda q, k, v: jnp.sum(sa.dense_attention(q, k, v, q_offset=off) ** 2)
    if grad:
      f = jax.grad(f, argnums=(0, 1, 2))
    return jax.jit(f).lower(q, kv, kv).compile()

  def flops(c):
    ca = c.cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]

  assert len(chunking.causal_segments(1024)) == chunking.CAUSAL_SEGMENTS
  ratio = flops(compiled(1024, False, False)) / flops(
    compiled(1024, True, False)
  )
  assert 0.5 < ratio < 0.65, ratio
  T = 8192  # 4 x 8192 logits per query: past ATTN_BUDGET, so chunked
  assert A.ATTN_BUDGET < T * T * 4
  static, traced = compiled(T, False, True), compiled(T, True, True)
  # Measured: 0.59 of the flops, 0.53 of the memory (143 vs 269 MB).
  assert flops(static) < 0.65 * flops(traced)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(static) <= 0.75 * temp(traced), (temp(static), temp(traced))


def test_dense_attention_wide_heads_do_not_pair():
  """Each paired step copies the query side once per slot (~S rows of
  (H + G) * (D + Dv) elements); past the budget, as at MLA's absorbed
  width, the static path scans all S keys like a traced offset and needs
  no more memory for the gradient."""
  from sparse_attn.ops import attention as A
  from sparse_attn.ops import chunking

  B, T, H, G, D = 1, 2048, 32, 1, 256
  assert not chunking.use_causal_pairs(
    None, T, T, 256, (H + G) * 2 * D, A.ATTN_BUDGET
  )

  def temp(off):
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, G, D), jnp.float32)
    f = lambda q, k, v: jnp.sum(sa.dense_attention(q, k, v, q_offset=off) ** 2)
    c = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return c.memory_analysis().temp_size_in_bytes

  static, traced = temp(None), temp(jnp.zeros((B,), jnp.int32))
  assert static <= 1.05 * traced, (static, traced)


@pytest.mark.parametrize(
  "T,chunk,kv_lengths",
  [
    (64, 16, None),  # 8 chunks of 8: 4 pairs
    (61, 7, [61, 0]),  # odd chunks, padded; a row with no key at all
    (45, 1, [3, 45]),  # one query per chunk; most keys padding
    (40, 39, None),  # 4 chunks of 19 (the last two padding): 2 steps
  ],
)
def test_dense_attention_causal_pairs(rng, T, chunk, kv_lengths):
  """Causal self-attention past one chunk pairs query chunks c and n-1-c
  (chunking.map_causal_pairs): equal to the numpy reference and, values
  and gradients, to the path a traced offset takes (all S keys)."""
  from sparse_attn.ops import chunking

  B, H, G, D = 2, 4, 2, 8
  assert chunking.use_causal_pairs(None, T, T, chunk, (H + G) * 19, 1 << 24)
  x = make_inputs(rng, B, T, T, H, G, D, 1, 1, Dv=D + 3)
  q, k, v = (jnp.asarray(x[n]) for n in "qkv")
  kvl = as_jnp_opt(kv_lengths)
  want = ref.dense_attention(x["q"], x["k"], x["v"], None, kv_lengths)
  paired = lambda q, k, v: sa.dense_attention(
    q, k, v, kv_lengths=kvl, query_chunk=chunk
  )
  traced = lambda q, k, v: sa.dense_attention(
    q, k, v, q_offset=jnp.zeros((B,), jnp.int32), kv_lengths=kvl
  )
  got = jax.jit(paired)(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
  assert_same_grads(loss(paired), loss(traced), (q, k, v), nonzero=True)
  # bf16: the slots' partials merge in f32; the result stays finite.
  bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
  got_bf = paired(*bf)
  assert got_bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(got_bf.astype(jnp.float32), want, atol=0.05)
  # and the traced path's bf16 result to within about one bf16 rounding
  # of the values summed (|v| ~ 1; the paths round probs differently)
  np.testing.assert_allclose(
    got_bf.astype(jnp.float32),
    traced(*bf).astype(jnp.float32),
    rtol=2**-7,
    atol=2**-6,
  )


def test_merge_partials_is_softmax_over_the_union(rng):
  """Partial attention over disjoint key sets, merged per group, equals
  attention over each group's keys; an empty group gives zeros and -inf,
  and the gradients stay finite."""
  from sparse_attn.ops import attention as A

  B, C, H, D, S = 2, 3, 2, 4, 12
  q = jnp.asarray(rng.standard_normal((B, C, H, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, S, 1, D)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, S, 1, D)), jnp.float32)
  # 4 partials of 3 keys; groups {0, 2}, {1}, {3: every key masked}.
  owners = jnp.asarray(
    [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], jnp.float32
  )
  valid = np.ones((4, 3), bool)
  valid[3] = False
  valid[1, 2] = False

  def merged(q, k, v):
    parts = [
      A.dense_block(
        q, k[:, 3 * j : 3 * j + 3], v[:, 3 * j : 3 * j + 3], valid[j], 0.5
      )
      for j in range(4)
    ]
    out = jnp.stack([p[0] for p in parts], axis=1)
    lse = jnp.stack([p[1] for p in parts], axis=1)
    return A.merge_partials(out, lse, owners)

  out, lse = merged(q, k, v)
  for o, keys in enumerate(([0, 1, 2, 6, 7, 8], [3, 4])):
    want, want_lse = A.dense_block(q, k[:, keys], v[:, keys], True, 0.5)
    np.testing.assert_allclose(out[:, o], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse[:, o], want_lse, rtol=1e-5)
  assert np.all(out[:, 2] == 0) and np.all(np.isneginf(lse[:, 2]))
  grads = jax.grad(lambda *a: jnp.sum(merged(*a)[0]), (0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_causal_segments_cover_the_queries():
  from sparse_attn.ops import attention as A
  from sparse_attn.ops import chunking as C

  # The names first defined in ops.attention keep working there.
  assert A.causal_segments is C.causal_segments
  assert A.static_q_offset is C.static_q_offset
  # The offset's rules live in ops.masking; chunking re-exports them.
  from sparse_attn.ops import masking as M

  assert C.static_q_offset is M.static_q_offset
  assert M.static_q_offset(None, 3, 10) == 7
  assert M.static_q_offset(np.int64(2), 3, 10) == 2
  assert M.static_q_offset(jnp.int32(2), 3, 10) is None
  assert M.resolve_q_offset(None, 2, 3, 10).tolist() == [7, 7]
  assert (A.CAUSAL_SEGMENTS, A.MIN_CAUSAL_SEGMENT) == (
    C.CAUSAL_SEGMENTS,
    C.MIN_CAUSAL_SEGMENT,
  )
  assert C.causal_segments(0) == [(0, 0)]
  q, k = jnp.zeros((1, 0, 2, 4)), jnp.zeros((1, 5, 1, 4))
  assert sa.dense_attention(q, k, k).shape == (1, 0, 2, 4)
  for T in (1, 63, 64, 129, 512, 1000, 4097):
    seg = C.causal_segments(T)
    assert seg[0][0] == 0 and seg[-1][1] == T
    assert all(a < b == c for (a, b), (c, _) in zip(seg, seg[1:] + [(T, T)]))
    assert len(seg) <= C.CAUSAL_SEGMENTS
    assert (
      len(seg) == 1 or min(b - a for a, b in seg) >= C.MIN_CAUSAL_SEGMENT // 2
    )


@pytest.mark.parametrize(
  "T,S,q_offset,chunk,segmented",
  [
    (300, 300, None, 512, True),
    (150, 217, None, 150, True),  # default offset S - T = 67
    (140, 140, -100, 1024, True),  # the first segment sees no key
    (130, 140, 100, 1024, True),  # every segment sees all S keys
    (300, 300, None, 299, False),  # T past one chunk: chunked over all S
    (300, 300, "traced", 512, False),  # offset unknown when tracing
    (40, 40, None, 64, True),  # one segment
  ],
)
def test_map_causal_segments(T, S, q_offset, chunk, segmented):
  """fn gets each block's queries and a key count `seen` past which none
  of them sees a key; segments only where the mask is static and T fits
  one chunk; None passes through; pytree results stitched on axis 1."""
  from sparse_attn.ops import chunking as C

  B = 2
  off = S - T if q_offset in (None, "traced") else q_offset
  offset = jnp.full((B,), off, jnp.int32) if q_offset == "traced" else q_offset
  x = jnp.arange(B * T, dtype=jnp.float32).reshape(B, T)
  calls = []

  def fn(start, seen, xb, none):
    assert none is None
    calls.append(seen)
    pos = off + start + jnp.arange(xb.shape[1], dtype=jnp.int32)
    return {"x": xb, "pos": pos[None] + 0 * xb.astype(jnp.int32)}, jnp.full(
      xb.shape, seen, jnp.int32
    )

  out, seen = C.map_causal_segments(fn, chunk, offset, S, x, None)
  np.testing.assert_array_equal(out["x"], x)
  pos = np.asarray(out["pos"][0])
  np.testing.assert_array_equal(pos, off + np.arange(T))
  seen = np.asarray(seen[0])
  # Sound: no query sees a key at or past its block's `seen`.
  assert np.all(np.minimum(pos + 1, S) <= seen)
  if segmented:
    assert len(calls) == len(C.causal_segments(T))
    tight = [min(S, max(1, off + b)) for _, b in C.causal_segments(T)]
    assert calls == tight
  else:
    assert set(calls) == {S}


@pytest.mark.parametrize("B,T,S,H,G,D,HI,DI,K,q_offset,kv_lengths", CASES)
def test_gathered_attention_matches_numpy_and_masked_dense(
  rng, B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths
):
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  idx = sa.lightning_topk(
    x["q_idx"], x["k_idx"], x["weights"], K, **_kw(q_offset, kv_lengths)
  )
  want = ref.gathered_attention(x["q"], x["k"], x["v"], np.asarray(idx))
  got = sa.gathered_attention(x["q"], x["k"], x["v"], idx, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for method in ("gather", "counted"):
    alt = sa.gathered_attention_reference(
      x["q"], x["k"], x["v"], idx, method=method
    )
    np.testing.assert_allclose(alt, want, rtol=1e-4, atol=1e-5, err_msg=method)
  # dense attention restricted by a mask built from the same indices
  q, k, v = (jnp.asarray(x[n]) for n in "qkv")
  mask = np.zeros((B, T, S), bool)
  for b in range(B):
    for t in range(T):
      mask[b, t, [i for i in np.asarray(idx[b, t]) if i >= 0]] = True
  logits = (
    jnp.einsum("btgrd,bsgd->btgrs", q.reshape(B, T, G, H // G, D), k) * D**-0.5
  )
  m = jnp.asarray(mask)[:, :, None, None, :]
  p = jax.nn.softmax(jnp.where(m, logits, -jnp.inf), axis=-1)
  p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
  masked_dense = jnp.einsum("btgrs,bsgv->btgrv", p, v).reshape(B, T, H, D)
  np.testing.assert_allclose(got, masked_dense, rtol=1e-4, atol=1e-5)
  # dsa_attention composes the two
  dsa = sa.dsa_attention(
    q,
    k,
    v,
    x["q_idx"],
    x["k_idx"],
    x["weights"],
    top_k=K,
    **_kw(q_offset, kv_lengths),
  )
  np.testing.assert_allclose(dsa, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("B,T,S,H,G,D,HI,DI,K,q_offset,kv_lengths", CASES)
def test_dsa_with_k_at_least_s_equals_dense(
  rng, B, T, S, H, G, D, HI, DI, K, q_offset, kv_lengths
):
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  kw = _kw(q_offset, kv_lengths)
  dsa = sa.dsa_attention(
    x["q"],
    x["k"],
    x["v"],
    x["q_idx"],
    x["k_idx"],
    x["weights"],
    top_k=S + 3,
    **kw,
  )
  dense = sa.dense_attention(x["q"], x["k"], x["v"], **kw)
  np.testing.assert_allclose(dsa, dense, rtol=1e-4, atol=1e-5)


def test_empty_rows_are_zero_with_finite_grads(rng):
  B, T, S, H, G, D, K = 2, 6, 9, 4, 2, 8, 3
  x = make_inputs(rng, B, T, S, H, G, D, 1, 1)
  idx = random_indices(rng, B, T, S, K, empty_rows=[(0, 0), (1, 3)])
  idx[1, 4] = [S, S + 5, -7]  # out of range counts as invalid too
  q, k, v = (jnp.asarray(x[n]) for n in "qkv")
  for method in ("gather", "counted"):
    f = lambda q, k, v, method=method: sa.gathered_attention_reference(
      q, k, v, idx, method=method
    )
    out = f(q, k, v)
    assert (
      np.all(out[0, 0] == 0)
      and np.all(out[1, 3] == 0)
      and np.all(out[1, 4] == 0)
    )
    grads = jax.grad(
      lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)
    )(q, k, v)
    for g in grads:
      assert np.all(np.isfinite(g))
    assert np.all(grads[0][0, 0] == 0)
  # fully padded sequence in dense attention
  dense = sa.dense_attention(q, k, v, kv_lengths=jnp.array([0, S]))
  assert np.all(dense[0] == 0) and np.all(np.isfinite(dense))
  gd = jax.grad(
    lambda q: jnp.sum(sa.dense_attention(q, k, v, kv_lengths=jnp.array([0, S])))
  )(q)
  assert np.all(np.isfinite(gd))


def test_bf16_close_to_f32(rng):
  """bf16 inputs: outputs within 3e-2 abs of the f32 result (bf16 has 8 bits of mantissa)."""
  B, T, S, H, G, D, HI, DI, K = 2, 33, 65, 4, 2, 32, 2, 16, 16
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  xb = {n: jnp.asarray(a, jnp.bfloat16) for n, a in x.items()}
  # Same selection for both precisions, so only the attention arithmetic differs.
  idx = sa.lightning_topk(x["q_idx"], x["k_idx"], x["weights"], K)
  f32 = sa.gathered_attention(x["q"], x["k"], x["v"], idx)
  b16 = sa.gathered_attention(xb["q"], xb["k"], xb["v"], idx)
  assert b16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(b16, np.float32), f32, atol=3e-2, rtol=3e-2
  )
  d32 = sa.dense_attention(x["q"], x["k"], x["v"])
  d16 = sa.dense_attention(xb["q"], xb["k"], xb["v"])
  np.testing.assert_allclose(
    np.asarray(d16, np.float32), d32, atol=3e-2, rtol=3e-2
  )
  dsa16 = sa.dsa_attention(
    *(xb[n] for n in ("q", "k", "v", "q_idx", "k_idx", "weights")), top_k=K
  )
  assert np.all(np.isfinite(np.asarray(dsa16, np.float32)))


def test_check_grads_gathered_attention(rng):
  B, T, S, H, G, D, K = 1, 5, 7, 2, 1, 4, 3
  x = make_inputs(rng, B, T, S, H, G, D, 1, 1)
  x = {n: np.asarray(a, np.float64) for n, a in x.items()}
  idx = jnp.asarray(random_indices(rng, B, T, S, K, empty_rows=[(0, 2)]))
  with jax.enable_x64(True):
    for method in ("gather", "counted"):
      f = lambda q, k, v, method=method: sa.gathered_attention_reference(
        q, k, v, idx, method=method
      )
      check_grads(
        f,
        (x["q"], x["k"], x["v"]),
        order=1,
        modes=("rev",),
        atol=1e-6,
        rtol=1e-6,
      )
    fd = lambda q, k, v: sa.dense_attention(q, k, v, kv_lengths=jnp.array([5]))
    check_grads(
      fd,
      (x["q"], x["k"], x["v"]),
      order=1,
      modes=("rev",),
      atol=1e-6,
      rtol=1e-6,
    )


def test_jit_vmap_grad(rng):
  B, T, S, H, G, D, HI, DI, K = 2, 8, 8, 2, 1, 8, 2, 4, 3
  x = make_inputs(rng, B, T, S, H, G, D, HI, DI)
  names = ("q", "k", "v", "q_idx", "k_idx", "weights")
  f = lambda *a: sa.dsa_attention(*a, top_k=K)
  base = f(*(x[n] for n in names))
  np.testing.assert_allclose(
    jax.jit(f)(*(x[n] for n in names)), base, rtol=1e-6, atol=1e-6
  )
  stacked = [jnp.stack([x[n], 2 * x[n]]) for n in names]
  vm = jax.vmap(f)(*stacked)
  np.testing.assert_allclose(vm[0], base, rtol=1e-5, atol=1e-6)
  g = jax.jit(
    jax.grad(
      lambda q, k, v: jnp.sum(f(q, k, v, *(x[n] for n in names[3:]))),
      argnums=(0, 1, 2),
    )
  )(x["q"], x["k"], x["v"])
  assert all(np.all(np.isfinite(gi)) for gi in g)
  gv = jax.vmap(jax.grad(lambda q, *r: jnp.sum(f(q, *r))))(*stacked)
  assert gv.shape == stacked[0].shape


def test_masked_softmax_lse_gradient_is_the_softmax():
  # d lse / d logits = probs: ring attention's VJP and LSH's round
  # weights differentiate through lse (the shift by the row max must not
  # add a one-hot at the argmax).
  from sparse_attn.ops.attention import masked_softmax

  logits = jax.random.normal(jax.random.key(0), (3, 7))
  valid = jnp.arange(7)[None, :] <= jnp.array([[0], [3], [6]])
  valid = valid.at[0].set(False)  # a fully masked row: lse -inf, zero grad
  probs, lse = masked_softmax(logits, valid)
  # Row 0's lse is -inf; the sum of the other rows must not reach it.
  grad = jax.grad(lambda x: jnp.sum(masked_softmax(x, valid)[1][1:]))(logits)
  np.testing.assert_allclose(grad[1:], probs[1:], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad[0], 0.0)
  assert np.isneginf(lse[0]) and np.all(np.isfinite(lse[1:]))
  check_grads(
    lambda x: masked_softmax(x, valid)[1][1:],
    (logits,),
    order=2,
    modes=["rev"],
    atol=1e-3,
    rtol=1e-3,
  )
