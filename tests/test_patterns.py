"""Sparse Transformer (strided / fixed) and sliding-window patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _testutil import assert_same_grads
from sparse_attn.kinds import patterns as P


def rows(mask, i):
  """Set of key indices allowed for query row i of a bool[T, S] mask."""
  return set(np.nonzero(np.asarray(mask)[i])[0].tolist())


def np_masked_attention(q, k, v, allowed, scale=None):
  """q [B,T,H,D], k/v [B,S,G,*], allowed bool[B,H,T,S] -> [B,T,H,Dv] (numpy)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, H, D = q.shape
  G = k.shape[2]
  scale = D**-0.5 if scale is None else scale
  kh = np.repeat(k, H // G, axis=2)
  vh = np.repeat(v, H // G, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kh) * scale
  logits = np.where(allowed, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.where(allowed, np.exp(logits - m), 0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhts,bshv->bthv", p, vh)


def formula_masks(pattern, T, S, l, c, offset):
  """(A, B) bool[T, S] from the written-out definitions (python loops)."""
  A = np.zeros((T, S), bool)
  Bm = np.zeros((T, S), bool)
  for t in range(T):
    i = offset + t
    for j in range(S):
      if j > i:
        continue
      if pattern == "strided":
        A[t, j] = max(0, i - l) <= j <= i  # Child et al.: t = max(0, i - l)
        Bm[t, j] = (i - j) % l == 0
      else:
        A[t, j] = j // l == i // l
        Bm[t, j] = j % l >= l - c
  return A, Bm


def test_explicit_index_sets():
  pos = jnp.arange(10)
  keys = jnp.arange(10)
  a, b = P.pattern_masks("strided", pos, keys, stride=3)
  assert rows(a, 7) == {4, 5, 6, 7}  # l + 1 keys: max(0, i - l) .. i
  assert rows(b, 7) == {1, 4, 7}
  assert rows(a, 0) == {0} and rows(b, 0) == {0}
  assert rows(a, 2) == {0, 1, 2} and rows(b, 2) == {2}
  a, b = P.pattern_masks("fixed", pos, keys, stride=4, summary=1)
  assert rows(a, 6) == {4, 5, 6}
  assert rows(b, 6) == {3}
  assert rows(a, 9) == {8, 9}
  assert rows(b, 9) == {3, 7}
  a, b = P.pattern_masks("fixed", pos, keys, stride=4, summary=2)
  assert rows(b, 9) == {2, 3, 6, 7}
  assert rows(b, 6) == {2, 3, 6}
  w = P.sliding_window_mask(pos, keys, 4)
  assert rows(w, 9) == {6, 7, 8, 9} and rows(w, 1) == {0, 1}
  # Decode-style offset: one query at absolute position 8 against 10 keys.
  a, b = P.pattern_masks("strided", jnp.array([8]), keys, stride=3)
  assert rows(a, 0) == {5, 6, 7, 8} and rows(b, 0) == {2, 5, 8}


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_masks_equal_formula_and_combines(pattern):
  T, S, l, c, H = 11, 14, 4, 2, 5
  offset = S - T
  q_pos = jnp.arange(T) + offset
  A, Bm = formula_masks(pattern, T, S, l, c, offset)
  a, b = P.pattern_masks(pattern, q_pos, jnp.arange(S), stride=l, summary=c)
  np.testing.assert_array_equal(a, A)
  np.testing.assert_array_equal(b, Bm)
  causal = np.arange(S)[None] <= np.asarray(q_pos)[:, None]
  for m in (a, b):
    assert not np.any(np.asarray(m) & ~causal)
  kw = dict(num_heads=H, stride=l, summary=c)
  merged = P.sparse_transformer_mask(pattern, q_pos, jnp.arange(S), **kw)
  assert merged.shape == (H, T, S)
  np.testing.assert_array_equal(merged, np.broadcast_to(A | Bm, (H, T, S)))
  for li, want in ((0, A), (1, Bm), (2, A), (3, Bm)):
    alt = P.sparse_transformer_mask(
      pattern, q_pos, jnp.arange(S), combine="alternate", layer_index=li, **kw
    )
    np.testing.assert_array_equal(alt, np.broadcast_to(want, (H, T, S)))
  split = np.asarray(
    P.sparse_transformer_mask(
      pattern, q_pos, jnp.arange(S), combine="split", **kw
    )
  )
  for h in range(H):  # first ceil(5/2) = 3 heads pattern A, the rest B
    np.testing.assert_array_equal(split[h], A if h < 3 else Bm)


def test_block_layout():
  m = P.fixed_block_mask(jnp.arange(8), jnp.arange(8), 4)
  lay = np.asarray(P.block_layout(m, 4, 4))
  np.testing.assert_array_equal(lay, [[True, False], [False, True]])


@pytest.mark.parametrize(
  "pattern,combine",
  [
    ("strided", "merged"),
    ("strided", "alternate"),
    ("strided", "split"),
    ("fixed", "merged"),
    ("fixed", "alternate"),
    ("fixed", "split"),
  ],
)
def test_attention_matches_masked_reference(pattern, combine):
  rng = np.random.default_rng(0)
  B, T, S, H, G, D = 2, 13, 17, 6, 3, 8
  q = rng.standard_normal((B, T, H, D)).astype(np.float32)
  k = rng.standard_normal((B, S, G, D)).astype(np.float32)
  v = rng.standard_normal((B, S, G, 5)).astype(np.float32)
  kv = np.array([17, 9], np.int32)
  li = 1
  out, counts = P.sparse_transformer_attention(
    q,
    k,
    v,
    pattern=pattern,
    stride=3,
    summary=2,
    combine=combine,
    layer_index=li,
    kv_lengths=jnp.asarray(kv),
    query_chunk=4,
    return_counts=True,
  )
  A, Bm = formula_masks(pattern, T, S, 3, 2, S - T)
  if combine == "merged":
    per_head = [A | Bm] * H
  elif combine == "alternate":
    per_head = [Bm] * H
  else:
    per_head = [A] * 3 + [Bm] * 3
  allowed = (
    np.stack(per_head)[None] & (np.arange(S) < kv[:, None])[:, None, None, :]
  )
  want = np_masked_attention(q, k, v, allowed)
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(counts, allowed.sum(-1).mean(1), rtol=1e-6)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_attention_causal_segments(pattern):
  """At T = S = 200 with the default chunk the masked-pattern path goes over
  causal segments (a static offset): equal to the masked numpy reference
  and to the traced-offset path (every block over all S keys), values and
  gradients."""
  from sparse_attn.ops import chunking

  rng = np.random.default_rng(2)
  B, T, S, H, G, D = 2, 200, 200, 4, 2, 8
  assert len(chunking.causal_segments(T)) > 1
  q, k, v = (
    jnp.asarray(rng.standard_normal(s).astype(np.float32))
    for s in ((B, T, H, D), (B, S, G, D), (B, S, G, 5))
  )
  kv = np.array([200, 77], np.int32)
  run = lambda off: (
    lambda q, k, v: P.sparse_transformer_attention(
      q,
      k,
      v,
      pattern=pattern,
      stride=7,
      summary=2,
      combine="split",
      q_offset=off,
      kv_lengths=jnp.asarray(kv),
      return_counts=True,
    )
  )
  static, traced = run(None), run(jnp.zeros((B,), jnp.int32))
  A, Bm = formula_masks(pattern, T, S, 7, 2, 0)
  allowed = (
    np.stack([A] * 2 + [Bm] * 2)[None]
    & (np.arange(S) < kv[:, None])[:, None, None, :]
  )
  out, counts = jax.jit(static)(q, k, v)
  want = np_masked_attention(
    np.asarray(q), np.asarray(k), np.asarray(v), allowed
  )
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(counts, allowed.sum(-1).mean(1), rtol=1e-6)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v)[0] ** 2)
  assert_same_grads(loss(static), loss(traced), (q, k, v))


def test_attention_causal_segments_cost():
  """XLA's flop count of the strided pattern's gradient at T = S = 1024:
  a static offset (8 causal segments) computes (n+1)/(2n) = 0.56 of the
  pairs a traced offset computes."""
  B, T, H, G, D = 1, 1024, 4, 2, 32
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

  def flops(offset):
    loss = lambda q, k, v: jnp.sum(
      P.sparse_transformer_attention(
        q, k, v, pattern="strided", stride=32, combine="split", q_offset=offset
      )
      ** 2
    )
    f = jax.grad(loss, argnums=(0, 1, 2))
    lowered = jax.jit(f).lower(
      f32(B, T, H, D), f32(B, T, G, D), f32(B, T, G, D)
    )
    ca = lowered.compile().cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]

  ratio = flops(None) / flops(jnp.zeros((B,), jnp.int32))
  assert 0.5 < ratio < 0.65, ratio


def test_sliding_window_matches_reference_and_offsets():
  rng = np.random.default_rng(1)
  B, T, S, H, G, D, w = 2, 5, 12, 4, 2, 8, 4
  q = rng.standard_normal((B, T, H, D)).astype(np.float32)
  k = rng.standard_normal((B, S, G, D)).astype(np.float32)
  v = rng.standard_normal((B, S, G, D)).astype(np.float32)
  off = np.array([2, 7], np.int32)
  kv = np.array([12, 8], np.int32)
  out, counts = P.sliding_window_attention(
    q,
    k,
    v,
    window=w,
    q_offset=jnp.asarray(off),
    kv_lengths=jnp.asarray(kv),
    return_counts=True,
  )
  i = off[:, None] + np.arange(T)[None]  # [B, T]
  j = np.arange(S)
  allowed = (
    (j <= i[..., None]) & (j > i[..., None] - w) & (j < kv[:, None, None])
  )
  allowed = np.broadcast_to(allowed[:, None], (B, H, T, S))
  np.testing.assert_allclose(
    out, np_masked_attention(q, k, v, allowed), rtol=2e-5, atol=2e-5
  )
  np.testing.assert_array_equal(counts, allowed[:, 0].sum(-1))


def test_no_future_leakage():
  """Perturbing key/value t never changes the output of queries before t."""
  rng = np.random.default_rng(2)
  B, T, H, G, D = 1, 16, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, T, G, D)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, T, G, D)), jnp.float32)
  fns = [lambda q, k, v: P.sliding_window_attention(q, k, v, window=5)] + [
    (
      lambda q, k, v, p=p, c=c: P.sparse_transformer_attention(
        q, k, v, pattern=p, stride=4, summary=2, combine=c
      )
    )
    for p in P.PATTERNS
    for c in P.COMBINES
  ]
  t = 9
  k2 = k.at[:, t:].add(3.0)
  v2 = v.at[:, t:].add(-2.0)
  for fn in fns:
    a, b = fn(q, k, v), fn(q, k2, v2)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


def test_key_budget_formulas_match_masks():
  n, l, c, H = 23, 4, 2, 5
  pos = jnp.arange(n)
  for pattern in P.PATTERNS:
    for combine in P.COMBINES:
      for li in (0, 1):
        m = np.asarray(
          P.sparse_transformer_mask(
            pattern,
            pos,
            pos,
            num_heads=H,
            stride=l,
            summary=c,
            combine=combine,
            layer_index=li,
          )
        )
        want = m.sum(-1).mean(0)
        got = P.sparse_transformer_keys_per_query(
          n,
          pattern=pattern,
          stride=l,
          summary=c,
          combine=combine,
          layer_index=li,
          num_heads=H,
        )
        np.testing.assert_allclose(got, want)
  for w in (1, 3, 30):
    np.testing.assert_array_equal(
      P.sliding_window_keys_per_query(n, w),
      np.asarray(P.sliding_window_mask(pos, pos, w)).sum(-1),
    )


def test_validation():
  q = jnp.zeros((1, 4, 2, 8))
  k = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="pattern"):
    P.sparse_transformer_attention(q, k, k, pattern="dilated", stride=2)
  with pytest.raises(ValueError, match="combine"):
    P.sparse_transformer_attention(
      q, k, k, pattern="fixed", stride=2, combine="both"
    )
  with pytest.raises(ValueError, match="summary"):
    P.sparse_transformer_attention(
      q, k, k, pattern="fixed", stride=2, summary=3
    )
  with pytest.raises(ValueError, match="window"):
    P.sliding_window_attention(q, k, k, window=0)
  with pytest.raises(ValueError, match="q must have rank 4"):
    P.sparse_transformer_attention(q[0], k, k, pattern="fixed", stride=2)
