"""NSA (native sparse attention) and MoBA (mixture of block attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_attn.kinds import moba, nsa
from sparse_attn.ops.attention import dense_attention
from test_patterns import np_masked_attention

nsa_attention = jax.jit(
  nsa.nsa_attention,
  static_argnames=(
    "cmp_block",
    "cmp_stride",
    "select_block",
    "num_selected",
    "window",
    "num_initial",
    "num_local",
    "return_branches",
    "return_counts",
  ),
)
moba_attention = jax.jit(
  moba.moba_attention,
  static_argnames=("block_size", "top_k", "return_counts", "return_blocks"),
)


def inputs(seed, B=2, T=37, S=37, H=6, G=3, D=8, Dv=8):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return f(B, T, H, D), f(B, S, G, D), f(B, S, G, Dv)


CASES = [
  pytest.param(37, None, None, id="causal_odd"),
  pytest.param(11, None, [37, 20], id="short_block_kvlen"),
  pytest.param(11, [3, 26], [37, 20], id="per_seq_offset_kvlen"),
]


@pytest.mark.parametrize("T,q_offset,kv", CASES)
def test_nsa_full_budget_selected_branch_is_dense(T, q_offset, kv):
  q, k, v = inputs(0, T=T)
  kv = None if kv is None else jnp.asarray(kv, jnp.int32)
  q_offset = None if q_offset is None else jnp.asarray(q_offset, jnp.int32)
  gates = jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0]), q.shape[:3] + (3,))
  # ceil(37 / 8) = 5 selection blocks: num_selected=5 covers everything.
  out, br = nsa_attention(
    q,
    k,
    v,
    gates,
    cmp_block=8,
    cmp_stride=4,
    select_block=8,
    num_selected=5,
    window=3,
    q_offset=q_offset,
    kv_lengths=kv,
    return_branches=True,
  )
  want = dense_attention(q, k, v, q_offset=q_offset, kv_lengths=kv)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(br["selected"], want, rtol=1e-5, atol=1e-5)


def eq9_weights(N, M, l, d, ls):
  """NSA eq. 9 written out: p_slc[j] = sum_{m < l'/d} sum_{n < l/d}
  p_cmp[.. + m + n] over the compressed blocks that overlap selection block
  j; the weight of compressed block i is the number of (m, n) pairs naming
  it (integer block sizes: d divides l and l')."""
  W = np.zeros((N, M))
  for j in range(M):
    first = j * ls // d - l // d + 1  # first compressed block overlapping j
    for m in range(ls // d):
      for n in range(l // d):
        i = first + m + n
        if 0 <= i < N:
          W[i, j] += 1
  return W


@pytest.mark.parametrize(
  "l,d,ls,n,n_init,n_local",
  [
    (4, 2, 4, 2, 0, 1),  # the old setup: the current block only
    (4, 2, 8, 3, 1, 2),  # l' = 2l: eq. 9's 1, 2, 2, 1 weights
    (8, 4, 4, 4, 1, 2),  # l' < l
  ],
)
def test_nsa_branches_against_reference(l, d, ls, n, n_init, n_local):
  B, T, H, G, D = 1, 29, 4, 2, 8
  q, k, v = inputs(1, B=B, T=T, S=T, H=H, G=G, D=D)
  # Independent K/V per branch: the compressed and window branches' own.
  _, kc_in, vc_in = inputs(2, B=B, T=T, S=T, H=H, G=G, D=D)
  _, kw_in, vw_in = inputs(3, B=B, T=T, S=T, H=H, G=G, D=D)
  g = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (B, T, H, 3)))
  w = 3
  out, br, counts = nsa_attention(
    q,
    k,
    v,
    g,
    cmp_block=l,
    cmp_stride=d,
    select_block=ls,
    num_selected=n,
    window=w,
    num_initial=n_init,
    num_local=n_local,
    kv_compressed=(kc_in, vc_in),
    kv_window=(kw_in, vw_in),
    return_branches=True,
    return_counts=True,
  )
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  kcn, vcn, kwn, vwn = (
    np.asarray(a, np.float64) for a in (kc_in, vc_in, kw_in, vw_in)
  )
  i = np.arange(T)
  # Compressed: mean-pooled blocks m*d .. m*d+l-1, visible when fully past.
  N = (T - l) // d + 1
  kc = np.stack([kcn[:, m * d : m * d + l].mean(1) for m in range(N)], 1)
  vc = np.stack([vcn[:, m * d : m * d + l].mean(1) for m in range(N)], 1)
  vis_c = (np.arange(N) * d + l - 1)[None, :] <= i[:, None]  # [T, N]
  want_c = np_masked_attention(qn, kc, vc, np.broadcast_to(vis_c, (B, H, T, N)))
  np.testing.assert_allclose(br["compressed"], want_c, rtol=1e-5, atol=1e-5)
  # Window.
  j = np.arange(T)
  win = (j[None] <= i[:, None]) & (j[None] > i[:, None] - w)
  want_w = np_masked_attention(qn, kwn, vwn, np.broadcast_to(win, (B, H, T, T)))
  np.testing.assert_allclose(br["window"], want_w, rtol=1e-5, atol=1e-5)
  # Selection: block importance = compressed probs summed over the group's
  # heads (eq. 10), spread over the selection blocks by eq. 9.
  logits = np.einsum("bthd,bnhd->bhtn", qn, np.repeat(kc, H // G, 2)) * D**-0.5
  logits = np.where(vis_c, logits, -np.inf)
  mx = np.max(logits, -1, keepdims=True)
  p = np.where(vis_c, np.exp(logits - np.where(np.isfinite(mx), mx, 0)), 0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)  # [B,H,T,N]
  M = -(-T // ls)
  W = eq9_weights(N, M, l, d, ls)
  np.testing.assert_array_equal(
    nsa.selection_weights(N, M, l, d, ls), W
  )  # the token-overlap form equals the double sum
  imp = np.einsum("bhtn,nm->bhtm", p, W)
  imp = imp.reshape(B, G, H // G, T, M).sum(2)  # [B,G,T,M]
  sel = np.asarray(br["selection"])  # [B,T,G,n]
  allowed = np.zeros((B, H, T, T), bool)
  for b in range(B):
    for t in range(T):
      for gg in range(G):
        cur = t // ls
        cands = [m for m in range(M) if m * ls <= t]
        forced = {m for m in cands if m < n_init or cur - n_local < m <= cur}
        rest = sorted(set(cands) - forced, key=lambda m: -imp[b, gg, t, m])
        want = forced | set(rest[: n - len(forced)])
        got = set(sel[b, t, gg].tolist()) - {-1}
        assert got == want, (t, gg, got, want)
        for m in want:
          for h in range(gg * (H // G), (gg + 1) * (H // G)):
            allowed[b, h, t, m * ls : min((m + 1) * ls, t + 1)] = True
  want_s = np_masked_attention(qn, kn, vn, allowed)
  np.testing.assert_allclose(br["selected"], want_s, rtol=1e-5, atol=1e-5)
  gn = np.asarray(g, np.float64)
  mix = gn[..., 0:1] * want_c + gn[..., 1:2] * want_s + gn[..., 2:3] * want_w
  np.testing.assert_allclose(out, mix, rtol=1e-5, atol=1e-5)
  want_counts = vis_c.sum(-1) + allowed[0].sum(-1).mean(0) + win.sum(-1)
  np.testing.assert_allclose(counts[0], want_counts)
  np.testing.assert_allclose(
    counts[0],
    nsa.nsa_keys_per_query(
      T, cmp_block=l, cmp_stride=d, select_block=ls, num_selected=n, window=w
    ),
  )


@pytest.mark.parametrize("T,q_offset,kv", CASES)
def test_moba_full_budget_is_dense(T, q_offset, kv):
  q, k, v = inputs(2, T=T)
  kv = None if kv is None else jnp.asarray(kv, jnp.int32)
  q_offset = None if q_offset is None else jnp.asarray(q_offset, jnp.int32)
  out = moba_attention(
    q, k, v, block_size=8, top_k=5, q_offset=q_offset, kv_lengths=kv
  )
  want = dense_attention(q, k, v, q_offset=q_offset, kv_lengths=kv)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_moba_against_reference():
  B, T, H, G, D, bs, top = 2, 29, 4, 2, 8, 4, 3
  q, k, v = inputs(3, B=B, T=T, S=T, H=H, G=G, D=D)
  out, counts, blocks = moba_attention(
    q, k, v, block_size=bs, top_k=top, return_counts=True, return_blocks=True
  )
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  M = -(-T // bs)
  pooled = np.stack([kn[:, m * bs : (m + 1) * bs].mean(1) for m in range(M)], 1)
  aff = np.einsum("bthd,bmhd->bhtm", qn, np.repeat(pooled, H // G, 2))
  blocks = np.asarray(blocks).reshape(B, T, H, top)
  allowed = np.zeros((B, H, T, T), bool)
  for b in range(B):
    for h in range(H):
      for t in range(T):
        cur = t // bs
        past = sorted(range(cur), key=lambda m: -aff[b, h, t, m])
        want = {cur} | set(past[: top - 1])
        assert set(blocks[b, t, h].tolist()) - {-1} == want
        for m in want:
          allowed[b, h, t, m * bs : min((m + 1) * bs, t + 1)] = True
  np.testing.assert_allclose(
    out, np_masked_attention(qn, kn, vn, allowed), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(counts, allowed.sum(-1).mean(1))
  np.testing.assert_allclose(
    counts[0], moba.moba_keys_per_query(T, block_size=bs, top_k=top)
  )


def test_no_future_leakage():
  q, k, v = inputs(4, B=1, T=24, S=24, H=4, G=2)
  t = 13
  k2, v2 = k.at[:, t:].add(2.0), v.at[:, t:].add(-3.0)
  g = jnp.full(q.shape[:3] + (3,), 0.5)
  fns = [
    lambda k, v: nsa_attention(
      q,
      k,
      v,
      g,
      cmp_block=4,
      cmp_stride=2,
      select_block=4,
      num_selected=4,
      window=3,
    ),
    lambda k, v: moba_attention(q, k, v, block_size=4, top_k=2),
  ]
  for fn in fns:
    a, b = np.asarray(fn(k, v)), np.asarray(fn(k2, v2))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, t:], b[:, t:])


def test_validation():
  q, k, v = inputs(5, B=1, T=8, S=8, H=2, G=1)
  g = jnp.ones((1, 8, 2, 3))
  with pytest.raises(ValueError, match="gates shape"):
    nsa.nsa_attention(q, k, v, g[..., :2])
  with pytest.raises(ValueError, match="cmp_stride"):
    nsa.nsa_attention(q, k, v, g, cmp_block=2, cmp_stride=4)
  with pytest.raises(ValueError, match="do not fit in num_selected=2"):
    nsa.nsa_attention(q, k, v, g, num_selected=2)  # 1 initial + 2 local
  with pytest.raises(ValueError, match="kv_window shapes"):
    nsa.nsa_attention(q, k, v, g, kv_window=(k[:, :4], v[:, :4]))
  with pytest.raises(ValueError, match="top_k"):
    moba.moba_attention(q, k, v, block_size=4, top_k=0)
  # Shorter than one compression block: the compressed branch is empty (zeros).
  out, br = nsa_attention(
    q,
    k,
    v,
    g,
    cmp_block=16,
    cmp_stride=8,
    select_block=4,
    num_selected=3,
    window=2,
    return_branches=True,
  )
  assert np.all(np.asarray(br["compressed"]) == 0)
  assert np.all(np.isfinite(np.asarray(out)))


def test_nsa_branches_read_only_their_own_kv():
  """Independent K/V (sec. 3.3.3): changing one branch's keys/values
  changes that branch's output only (the selection reads the compressed
  branch's keys, so it moves the selected branch through its choice only)."""
  q, k, v = inputs(6, T=33, S=33)
  g = jnp.full(q.shape[:3] + (3,), 0.5)
  kw = dict(
    cmp_block=8, cmp_stride=4, select_block=8, num_selected=3, window=5,
    return_branches=True,
  )  # fmt: skip
  _, base = nsa_attention(q, k, v, g, kv_window=(k, v), **kw)
  _, win = nsa_attention(q, k, v, g, kv_window=(k + 1.0, v * 2.0), **kw)
  np.testing.assert_array_equal(base["compressed"], win["compressed"])
  np.testing.assert_array_equal(base["selected"], win["selected"])
  assert not np.allclose(base["window"], win["window"])
  _, cmp = nsa_attention(q, k, v, g, kv_compressed=(k, v * 3.0), **kw)
  np.testing.assert_array_equal(base["window"], cmp["window"])
  np.testing.assert_array_equal(base["selection"], cmp["selection"])
  assert not np.allclose(base["compressed"], cmp["compressed"])


def test_nsa_always_keeps_initial_and_local_blocks():
  """Whatever the importance, the first block and the two most recent
  blocks are selected (the paper's 1 initial + 2 local)."""
  q, k, v = inputs(7, B=1, T=64, S=64, H=2, G=1)
  g = jnp.ones(q.shape[:3] + (3,))
  _, br = nsa_attention(
    q, k, v, g, cmp_block=8, cmp_stride=8, select_block=8, num_selected=4,
    window=4, return_branches=True,
  )  # fmt: skip
  sel = np.asarray(br["selection"])[0, :, 0]  # [T, n]
  for t in range(64):
    cur = t // 8
    must = {0, cur, max(cur - 1, 0)}
    assert must <= set(sel[t].tolist()), (t, sel[t])
    assert len(set(sel[t].tolist()) - {-1}) == min(4, cur + 1)
