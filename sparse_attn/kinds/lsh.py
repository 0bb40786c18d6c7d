"""Reformer LSH attention (Kitaev, Kaiser, Levskaya 2020, "Reformer").

Shared query-key attention: each head has one projection `qk`; the query is
qk[t] and the key is the length-normalised k[t] = qk[t] / |qk[t]|. Values have
G kv heads (GQA): head h reads v of group h // (H / G).

Per hash round r (n_hashes rounds, each with its own random rotation
R_r [D, n_buckets / 2] drawn from a PRNG key):
  1. bucket[t] = argmax([x R_r ; -x R_r])  (angular LSH, n_buckets even;
     sec. 2 of the paper) of the hashed vector x[t]: qk[t], or `hash_qk[t]`
     (the layer passes qk before RoPE: buckets by content, as Reformer's
     inputs carry position in their embeddings, not in a rotation of qk);
  2. sort tokens by (bucket, position), cut the sorted sequence into chunks
     of `chunk_size`;
  3. every query attends the keys of its own chunk and of the previous chunk
     (chunk 0 has no previous chunk: no wrap-around), causally (key position
     <= query position, by original position), not past kv_lengths, and, with
     same_bucket=True (default, the paper's P_i = {j : h(k_j) = h(q_i)}),
     only to keys of its own bucket;
  4. a token attends to itself only when it has no other key in any round
     (with shared QK its own key would dominate the softmax).

Causality caveat of step 3 (lookback="chunk", the paper's scheme): every
attended key is in the past, but chunk boundaries depend on how many tokens
of the *whole* sequence fall in lower buckets, so changing a future token's
bucket can move an earlier query's chunk boundary and change which past keys
it sees. lookback="window" replaces "own + previous chunk" with "the
chunk_size slots before the query in sorted order" (same candidate count as
the chunk scheme's minimum); with same_bucket=True those are the query's
chunk_size most recent same-bucket tokens, which depend only on the past, so
the output of query i is a function of tokens <= i (strictly causal). The
NNX layer defaults to "window"; both are exact attention over their sets.
Rounds are combined with their log-sum-exp weights, o = sum_r softmax_r(lse_r)
o_r, after subtracting log N(i, j) from each logit, where N(i, j) is the number
of rounds in which key j is a candidate of query i (eq. 6-7 of the paper):
the result is exactly softmax attention over the union of the rounds' key
sets, each key counted once.

Memory is O(n_hashes^2 * B * H * T * chunk_size): linear in T. The function
is self-attention over a whole sequence (T == S; no q_offset). Decode-time
use is described in docs/baselines.md.

Rotations: pass `rotations` ([n_hashes, D, n_buckets/2], from
`lsh_rotations`) or a PRNG `key` to draw them. The NNX layer
(`sparse_attn.nn.LSHAttention`) uses a fixed key per layer,
fold_in(key(hash_seed), layer_index), so the hashing is deterministic, the
same in training and evaluation, and needs no mutable RNG state under jit.
"""

from __future__ import annotations

from typing import Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from sparse_attn.ops import checks
from sparse_attn.ops.attention import default_scale, masked_softmax

LOOKBACKS = ("chunk", "window")


def check_lsh_params(n_buckets, n_hashes, chunk_size):
  for name, value in (
    ("n_buckets", n_buckets),
    ("n_hashes", n_hashes),
    ("chunk_size", chunk_size),
  ):
    checks.check_positive_int(name, value)
  if n_buckets % 2:
    raise ValueError(f"n_buckets must be even, got {n_buckets}.")


def lsh_rotations(
  key: jax.Array, head_dim: int, n_buckets: int, n_hashes: int
) -> jax.Array:
  """f32[n_hashes, D, n_buckets / 2] random rotations (i.i.d. normal)."""
  check_lsh_params(n_buckets, n_hashes, 1)
  return jax.random.normal(
    key, (n_hashes, head_dim, n_buckets // 2), jnp.float32
  )


def lsh_buckets(x: jax.Array, rotations: jax.Array) -> jax.Array:
  """int32[n_hashes, B, H, T]: bucket = argmax([x R ; -x R]) of x[B, T, H, D]."""
  checks.check_rank("x", x, 4, "[B, T, H, D]")
  checks.check_rank("rotations", rotations, 3, "[n_hashes, D, n_buckets/2]")
  if rotations.shape[1] != x.shape[3]:
    raise ValueError(
      f"rotations shape {rotations.shape} must have D="
      f"{x.shape[3]} of x shape {x.shape} on axis 1."
    )
  proj = jnp.einsum(
    "bthd,rdn->rbhtn", x.astype(jnp.float32), rotations.astype(jnp.float32)
  )
  proj = jnp.concatenate([proj, -proj], axis=-1)
  return jnp.argmax(proj, axis=-1).astype(jnp.int32)


def normalize_keys(qk: jax.Array) -> jax.Array:
  """Shared-QK keys: qk / |qk| per head vector (f32 statistics)."""
  x = qk.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
  return (x / norm).astype(qk.dtype)


def _take_time(a, idx):
  """a [B, H, Tp, F], idx [NH, B, H, N] -> [NH, B, H, N, F]."""
  return jax.vmap(lambda i: jnp.take_along_axis(a, i[..., None], axis=2))(idx)


def _take_time_int(a, idx):
  """a [..., Tp] ints, idx [NH, ..., N] -> [NH, ..., N] (a shared over rounds)."""
  return jax.vmap(lambda i: jnp.take_along_axis(a, i, axis=-1))(idx)


def _look_back(a, axis):
  """Concatenates the previous chunk before each chunk along `axis` (+1 = c)."""
  prev = jnp.roll(a, 1, axis=axis)
  return jnp.concatenate([prev, a], axis=axis + 1)


@overload
def lsh_attention(
  qk: jax.Array,
  v: jax.Array,
  *,
  n_buckets: int,
  n_hashes: int,
  chunk_size: int,
  key: jax.Array | None = None,
  rotations: jax.Array | None = None,
  same_bucket: bool = True,
  lookback: str = "chunk",
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  hash_qk: jax.Array | None = None,
  return_counts: Literal[False] = False,
) -> jax.Array: ...


@overload
def lsh_attention(
  qk: jax.Array,
  v: jax.Array,
  *,
  n_buckets: int,
  n_hashes: int,
  chunk_size: int,
  key: jax.Array | None = None,
  rotations: jax.Array | None = None,
  same_bucket: bool = True,
  lookback: str = "chunk",
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  hash_qk: jax.Array | None = None,
  return_counts: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def lsh_attention(
  qk: jax.Array,
  v: jax.Array,
  *,
  n_buckets: int,
  n_hashes: int,
  chunk_size: int,
  key: jax.Array | None = None,
  rotations: jax.Array | None = None,
  same_bucket: bool = True,
  lookback: str = "chunk",
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  hash_qk: jax.Array | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def lsh_attention(
  qk: jax.Array,
  v: jax.Array,
  *,
  n_buckets: int,
  n_hashes: int,
  chunk_size: int,
  key: jax.Array | None = None,
  rotations: jax.Array | None = None,
  same_bucket: bool = True,
  lookback: str = "chunk",
  kv_lengths: jax.Array | None = None,
  scale: float | None = None,
  hash_qk: jax.Array | None = None,
  return_counts: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Reformer LSH self-attention [B, T, H, Dv].

  Args:
    qk: [B, T, H, D] shared query/key vectors (keys = qk / |qk|).
    v: [B, T, G, Dv] values, H % G == 0.
    n_buckets: even number of hash buckets; n_hashes: rounds;
    chunk_size: sorted-chunk length (each query sees <= 2 * chunk_size
      candidates per round).
    key / rotations: PRNG key to draw rotations, or the rotations
      [n_hashes, D, n_buckets/2] themselves (exactly one of the two).
    same_bucket: restrict candidates to the query's own bucket.
    lookback: "chunk" (Reformer: own chunk + previous chunk) or "window"
      (the query's slot and the chunk_size slots before it in sorted order;
      strictly causal together with same_bucket, see the module docstring).
    kv_lengths: optional int32[B]; keys >= kv_lengths[b] are padding.
    scale: logit scale, default D**-0.5.
    hash_qk: [B, T, H, D] the vectors hashed into buckets (default: qk).
      Reformer hashes the shared-QK vectors of its inputs, where position
      comes from the input embeddings; a RoPE model passes qk *before*
      RoPE here and qk after RoPE as `qk`, so that a token's bucket depends
      on its content only and position enters the logits inside a bucket,
      as in the paper (the layer does this).
    return_counts: also return f32[B, T]: distinct keys attended per query,
      averaged over heads.
  """
  qs = checks.check_rank("qk", qk, 4, "[B, T, H, D]")
  vs = checks.check_rank("v", v, 4, "[B, T, G, Dv]")
  checks.check_floating("qk", qk)
  checks.check_floating("v", v)
  checks.check_same_dtype(qk=qk, v=v)
  if vs[:2] != qs[:2]:
    raise ValueError(
      f"v shape {vs} must be [B, T, G, Dv] with [B, T] = "
      f"{qs[:2]} of qk shape {qs}."
    )
  checks.check_heads(qs[2], vs[2], qs, vs)
  checks.check_kv_lengths(kv_lengths, qs[0])
  check_lsh_params(n_buckets, n_hashes, chunk_size)
  if lookback not in LOOKBACKS:
    raise ValueError(f"lookback must be one of {LOOKBACKS}, got {lookback!r}.")
  if (key is None) == (rotations is None):
    raise ValueError("pass exactly one of key= or rotations=.")
  batch, seq, heads, dim = qs
  if rotations is None:
    assert key is not None  # exactly one of key / rotations, checked above
    rotations = lsh_rotations(key, dim, n_buckets, n_hashes)
  if hash_qk is not None and tuple(hash_qk.shape) != tuple(qs):
    raise ValueError(
      f"hash_qk shape {hash_qk.shape} must equal qk shape {qs} ([B, T, H, D])."
    )
  if rotations.shape != (n_hashes, dim, n_buckets // 2):
    raise ValueError(
      f"rotations shape {rotations.shape} must be "
      f"{(n_hashes, dim, n_buckets // 2)}."
    )
  scale = default_scale(scale, dim)
  acc = checks.acc_dtype(qk)
  nh, c = n_hashes, chunk_size
  nc = -(-seq // c)
  tp = nc * c

  # Per-head time-major arrays, padded to Tp.
  def pad_t(a):
    return jnp.pad(a, [(0, 0), (0, 0), (0, tp - seq), (0, 0)])

  xq = pad_t(jnp.swapaxes(qk, 1, 2))  # [B, H, Tp, D]
  xk = pad_t(jnp.swapaxes(normalize_keys(qk), 1, 2))
  xv = pad_t(jnp.repeat(jnp.swapaxes(v, 1, 2), heads // vs[2], axis=1))
  pos = jnp.arange(tp, dtype=jnp.int32)
  key_ok = jnp.broadcast_to(pos < seq, (batch, tp))
  if kv_lengths is not None:
    key_ok = key_ok & (pos[None] < jnp.asarray(kv_lengths, jnp.int32)[:, None])
  key_ok = jnp.broadcast_to(key_ok[:, None, :], (batch, heads, tp))

  buckets = lsh_buckets(qk if hash_qk is None else hash_qk, rotations)
  buckets = jnp.pad(
    buckets, [(0, 0), (0, 0), (0, 0), (0, tp - seq)], constant_values=n_buckets
  )
  perm = jnp.argsort(buckets * tp + pos, axis=-1).astype(jnp.int32)
  inv = jnp.argsort(perm, axis=-1).astype(jnp.int32)  # sorted slot of t

  s_b = jnp.take_along_axis(buckets, perm, axis=-1)
  s_ok = _take_time_int(key_ok, perm)
  s_q = _take_time(xq, perm)  # [NH,B,H,Tp,D]
  s_k = _take_time(xk, perm)
  s_v = _take_time(xv, perm)

  def chunks(a):
    return a.reshape(nh, batch, heads, nc, c, *a.shape[4:])

  q_pos, q_b = chunks(perm), chunks(s_b)  # [NH,B,H,nc,c]
  k_pos, k_b = _look_back(q_pos, 3), _look_back(q_b, 3)  # [..., nc, 2c]
  has_prev = jnp.concatenate(
    [
      jnp.broadcast_to((jnp.arange(nc) > 0)[:, None], (nc, c)),
      jnp.ones((nc, c), bool),
    ],
    axis=1,
  )
  k_ok = _look_back(chunks(s_ok), 3) & has_prev
  q_slot = jnp.arange(tp, dtype=jnp.int32).reshape(nc, c)
  slot_lag = q_slot[:, :, None] - _look_back(q_slot, 0)[:, None, :]  # [nc,c,2c]
  k_vec = _look_back(chunks(s_k), 3)  # [...,nc,2c,D]
  v_vec = _look_back(chunks(s_v), 3)

  causal = k_pos[..., None, :] <= q_pos[..., :, None]
  cand = causal & k_ok[..., None, :]
  if lookback == "window":
    cand = cand & (slot_lag >= 0) & (slot_lag <= c)
  if same_bucket:
    cand = cand & (k_b[..., None, :] == q_b[..., :, None])
  is_self = k_pos[..., None, :] == q_pos[..., :, None]
  other = cand & ~is_self
  has_other = jnp.any(other, axis=-1).reshape(nh, batch, heads, tp)
  any_other = jnp.any(jnp.take_along_axis(has_other, inv, axis=-1), axis=0)
  self_ok = chunks(~_take_time_int(any_other, perm))
  valid = other | (cand & is_self & self_ok[..., None])

  # N(i, j): rounds in which j is a candidate of i (chunk window and bucket).
  flat_q = q_pos.reshape(nh, batch, heads, tp)
  flat_k = k_pos.reshape(nh, batch, heads, nc * 2 * c)
  per_round = jax.vmap(_take_time_int, in_axes=(0, None))  # over r'
  sq_ = per_round(inv, flat_q).reshape(nh, *q_pos.shape)  # slot of i in r'
  sk_ = per_round(inv, flat_k).reshape(nh, *k_pos.shape)
  if lookback == "window":
    lag = sq_[..., :, None] - sk_[..., None, :]
    member = (lag >= 0) & (lag <= c)
  else:
    lag = sq_[..., :, None] // c - sk_[..., None, :] // c
    member = (lag == 0) | (lag == 1)
  if same_bucket:
    bq = per_round(buckets, flat_q).reshape(nh, *q_pos.shape)
    bk = per_round(buckets, flat_k).reshape(nh, *k_pos.shape)
    member = member & (bq[..., :, None] == bk[..., None, :])
  count = jnp.maximum(jnp.sum(member, axis=0), 1).astype(acc)

  logits = (
    jnp.einsum(
      "rbhncd,rbhnkd->rbhnck", chunks(s_q), k_vec, preferred_element_type=acc
    )
    * scale
  )
  logits = logits - jnp.log(count)
  probs, lse = masked_softmax(logits, valid)
  out = jnp.einsum(
    "rbhnck,rbhnkv->rbhncv",
    probs.astype(v.dtype),
    v_vec,
    preferred_element_type=acc,
  )

  # Back to original order, then combine rounds by their lse weights.
  out = jax.vmap(lambda a, i: jnp.take_along_axis(a, i[..., None], axis=2))(
    out.reshape(nh, batch, heads, tp, -1), inv
  )  # [NH,B,H,Tp,Dv]
  lse = jnp.take_along_axis(lse.reshape(nh, batch, heads, tp), inv, axis=-1)
  top = jnp.max(lse, axis=0)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  w = jnp.exp(lse - top)
  den = jnp.sum(w, axis=0)
  w = w / jnp.where(den > 0, den, 1.0)
  o = jnp.sum(w[..., None] * out, axis=0)[:, :, :seq]  # [B, H, T, Dv]
  o = jnp.swapaxes(o, 1, 2).astype(qk.dtype)
  if not return_counts:
    return o
  per_query = jnp.sum(jnp.where(valid, 1.0 / count, 0.0), axis=-1)
  per_query = jnp.take_along_axis(
    per_query.reshape(nh, batch, heads, tp), inv, axis=-1
  )
  counts = jnp.sum(per_query, axis=(0,))[:, :, :seq].mean(axis=1)
  return o, counts.astype(jnp.float32)


def lsh_nominal_keys_per_query(
  seq_len: int,
  *,
  n_hashes: int,
  chunk_size: int,
  n_buckets: int,
  same_bucket: bool = True,
) -> np.ndarray:
  """Estimated keys per query, float64[n], under uniformly random hashing.

      same_bucket:  min(i + 1, max(1, i * (1 - (1 - 1/n_buckets)^n_hashes)),
                        n_hashes * chunk_size)
      otherwise:    min(i + 1, n_hashes * chunk_size)

  A past key shares the query's bucket in at least one of the n_hashes rounds
  with probability 1 - (1 - 1/n_buckets)^n_hashes; each round offers about
  chunk_size causal candidates (half of the own + previous chunk), and a
  query with no other key attends itself. The real count is data-dependent
  (similar tokens collide more often); `lsh_attention(...,
  return_counts=True)` and the layer's aux["attended_keys"] report it exactly.
  """
  i = np.arange(seq_len, dtype=np.float64)
  cap = np.minimum(i + 1, n_hashes * chunk_size)
  if same_bucket:
    hit = 1.0 - (1.0 - 1.0 / n_buckets) ** n_hashes
    cap = np.minimum(cap, np.maximum(1.0, i * hit))
  return cap
