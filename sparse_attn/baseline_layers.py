"""NNX layers for the sparse-attention families DSA is compared with.

Every class subclasses `sparse_attn.layers.AttentionLayer`, so

    y, aux = layer(x, positions=None, kv_lengths=None, mode="sparse")

works exactly as for DenseAttention / DSAAttention. `mode` is ignored (none
of these kinds has an indexer or a warm-up stage). aux:
  - "indexer_kl": 0;
  - "attended_keys": query-key pairs attended, summed over B and T; for kinds
    whose key set differs between heads (split Sparse Transformer, LSH, MoBA)
    the per-query count is the mean over heads; NSA counts the keys of its
    three branches (compressed block summaries count as keys);
  - "visible_keys": the dense causal count (`layers.dense_key_counts`).

All constructors take (embed_dim, num_heads, num_kv_heads, head_dim, *,
<kind params>, layer_index=0, rope_base, dtype, param_dtype, rngs), so a model
can build any kind from a config with `BASELINE_LAYERS[name](...)`.

Key budgets: `keys_per_query(kind, n, **params)` (float64[n], keys attended
by the query at position i of a causal sequence of length n), `key_budget`
(its mean) and `match_budget` (the kind's parameters that hit a target mean
budget). Missing params take the layer defaults (`DEFAULTS`).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attn.layers import AttentionLayer, dense_key_counts
from sparse_attn.lsh import lsh_attention, lsh_nominal_keys_per_query
from sparse_attn.moba import moba_attention, moba_keys_per_query
from sparse_attn.nsa import mean_compress, nsa_attention, nsa_keys_per_query
from sparse_attn.params import param
from sparse_attn.rope import apply_rope
from sparse_attn.patterns import (sliding_window_attention,
                                  sliding_window_keys_per_query,
                                  sparse_transformer_attention,
                                  sparse_transformer_keys_per_query)


class _Baseline(AttentionLayer):
  """Shared constructor tail and aux dict of the baseline kinds."""

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, layer_index: int = 0,
               rope_base: float = 10000.0, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim,
                     rope_base=rope_base, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.layer_index = int(layer_index)

  @staticmethod
  def _aux(counts, positions, num_keys, kv_lengths, kl=None):
    return {"indexer_kl": jnp.zeros((), jnp.float32) if kl is None else kl,
            "attended_keys": jnp.sum(counts).astype(jnp.float32),
            "visible_keys": dense_key_counts(positions, num_keys, kv_lengths)}


class SlidingWindowAttention(_Baseline):
  """Local causal attention over the last `window` keys (gathered)."""

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               window: int = 64, implementation: str | None = None, **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.window, self.implementation = int(window), implementation

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    o, counts = sliding_window_attention(
        q, k, v, window=self.window, kv_lengths=kv_lengths,
        implementation=self.implementation, return_counts=True)
    return o, self._aux(counts, positions, k.shape[1], kv_lengths)


class _SparseTransformer(_Baseline):
  pattern = ""

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               stride: int, summary: int, combine: str, **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.stride, self.summary, self.combine = int(stride), int(summary), combine
    sparse_transformer_keys_per_query(1, pattern=self.pattern, stride=stride,
                                      summary=summary, combine=combine)

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    o, counts = sparse_transformer_attention(
        q, k, v, pattern=self.pattern, stride=self.stride,
        summary=self.summary, combine=self.combine,
        layer_index=self.layer_index, kv_lengths=kv_lengths,
        return_counts=True)
    return o, self._aux(counts, positions, k.shape[1], kv_lengths)


class StridedAttention(_SparseTransformer):
  """Sparse Transformer, strided pattern: local band of l + every l-th key."""
  pattern = "strided"

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               stride: int = 16, combine: str = "merged", **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim,
                     stride=stride, summary=1, combine=combine, **kw)


class FixedAttention(_SparseTransformer):
  """Sparse Transformer, fixed pattern: own block of l + last c of each block."""
  pattern = "fixed"

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               stride: int = 16, summary: int = 2, combine: str = "merged",
               **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim,
                     stride=stride, summary=summary, combine=combine, **kw)


class LSHAttention(_Baseline):
  """Reformer LSH attention with shared QK (no key projection).

  Queries and keys both come from the query projection `wq` (keys are the
  length-normalised queries), so this layer has no `wk`. Rotations are fixed
  per layer: key = fold_in(PRNGKey(hash_seed), layer_index), drawn at every
  call (deterministic, no RNG state; identical in training and evaluation).
  lookback defaults to "window" (strictly causal, see `sparse_attn.lsh`);
  "chunk" is the paper's own + previous chunk.
  """

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               n_buckets: int = 8, n_hashes: int = 2, chunk_size: int = 32,
               same_bucket: bool = True, lookback: str = "window",
               hash_seed: int = 0, **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    del self.wk
    self.n_buckets, self.n_hashes = int(n_buckets), int(n_hashes)
    self.chunk_size, self.same_bucket = int(chunk_size), bool(same_bucket)
    self.hash_seed, self.lookback = int(hash_seed), lookback
    if self.n_buckets < 2 or self.n_buckets % 2:
      raise ValueError(f"n_buckets must be even and >= 2, got {n_buckets}.")

  def project(self, x, positions):
    x = x.astype(self.dtype)
    q = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(self.dtype))
    v = jnp.einsum("bte,egd->btgd", x, self.wv[...].astype(self.dtype))
    return apply_rope(q, positions, base=self.rope_base), None, v

  def hash_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.hash_seed), self.layer_index)

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    o, counts = lsh_attention(
        q, v, n_buckets=self.n_buckets, n_hashes=self.n_hashes,
        chunk_size=self.chunk_size, key=self.hash_key(),
        same_bucket=self.same_bucket, lookback=self.lookback,
        kv_lengths=kv_lengths,
        return_counts=True)
    return o, self._aux(counts, positions, q.shape[1], kv_lengths)


class NSAAttention(_Baseline):
  """Native Sparse Attention: compressed + selected + window, sigmoid-gated.

  Gates g[B, T, H, 3] = sigmoid(x @ w_gate). Compression "mean" mean-pools
  each block; "mlp" adds a learned MLP over the flattened block (with an
  intra-block position embedding) to the mean: summary = mean + MLP(block),
  separately for keys and values, shared by the kv heads.
  """

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               cmp_block: int = 16, cmp_stride: int = 8,
               select_block: int = 16, num_selected: int = 4,
               window: int = 32, compress: str = "mean",
               mlp_hidden: int | None = None,
               implementation: str | None = None, rngs: nnx.Rngs,
               param_dtype: Any = jnp.float32, **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, rngs=rngs,
                     param_dtype=param_dtype, **kw)
    if compress not in ("mean", "mlp"):
      raise ValueError(f"compress must be 'mean' or 'mlp', got {compress!r}.")
    self.cmp_block, self.cmp_stride = int(cmp_block), int(cmp_stride)
    self.select_block, self.num_selected = int(select_block), int(num_selected)
    self.window, self.compress = int(window), compress
    self.implementation = implementation
    self.w_gate = param(rngs, (embed_dim, num_heads, 3),
                        ("embed", "heads", "nsa_branches"), param_dtype)
    if compress == "mlp":
      hidden = mlp_hidden or 2 * head_dim
      l, d = self.cmp_block, head_dim
      zeros = nnx.initializers.zeros_init()
      for name in ("k", "v"):
        setattr(self, f"cmp_pos_{name}",
                param(rngs, (l, d), ("nsa_block", "head_dim"), param_dtype,
                      init=zeros))
        setattr(self, f"cmp_w1_{name}",
                param(rngs, (l * d, hidden), ("nsa_block_dim", "mlp"),
                      param_dtype))
        setattr(self, f"cmp_w2_{name}",
                param(rngs, (hidden, d), ("mlp", "head_dim"), param_dtype))

  def _mlp(self, name):
    pos = getattr(self, f"cmp_pos_{name}")[...].astype(self.dtype)
    w1 = getattr(self, f"cmp_w1_{name}")[...].astype(self.dtype)
    w2 = getattr(self, f"cmp_w2_{name}")[...].astype(self.dtype)

    def fn(windows):                                   # [B, N, G, l, D]
      flat = (windows + pos).reshape(*windows.shape[:3], -1)
      return mean_compress(windows) + jax.nn.gelu(flat @ w1) @ w2

    return fn

  def gates(self, x):
    g = jnp.einsum("bte,ehc->bthc", x.astype(self.dtype),
                   self.w_gate[...].astype(self.dtype))
    return jax.nn.sigmoid(g)

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    mlp = self.compress == "mlp"
    o, counts = nsa_attention(
        q, k, v, self.gates(x), cmp_block=self.cmp_block,
        cmp_stride=self.cmp_stride, select_block=self.select_block,
        num_selected=self.num_selected, window=self.window,
        compress_k=self._mlp("k") if mlp else None,
        compress_v=self._mlp("v") if mlp else None, kv_lengths=kv_lengths,
        implementation=self.implementation, return_counts=True)
    return o, self._aux(counts, positions, k.shape[1], kv_lengths)


class MoBAAttention(_Baseline):
  """MoBA: per-head top-k key blocks by q . mean(block keys), own block forced."""

  def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *,
               block_size: int = 16, top_k: int = 3, **kw):
    super().__init__(embed_dim, num_heads, num_kv_heads, head_dim, **kw)
    self.block_size, self.top_k = int(block_size), int(top_k)

  def attend(self, q, k, v, x, positions, kv_lengths, mode):
    o, counts = moba_attention(q, k, v, block_size=self.block_size,
                               top_k=self.top_k, kv_lengths=kv_lengths,
                               return_counts=True)
    return o, self._aux(counts, positions, k.shape[1], kv_lengths)


BASELINE_LAYERS = {
    "sliding_window": SlidingWindowAttention,
    "strided": StridedAttention,
    "fixed": FixedAttention,
    "lsh": LSHAttention,
    "nsa": NSAAttention,
    "moba": MoBAAttention,
}

# Kind parameters (constructor keyword defaults) of every baseline kind.
DEFAULTS: dict[str, dict[str, Any]] = {
    name: {p.name: p.default
           for p in inspect.signature(cls.__init__).parameters.values()
           if p.kind == p.KEYWORD_ONLY and p.default is not p.empty
           and p.name not in ("rngs", "param_dtype")}
    for name, cls in BASELINE_LAYERS.items()
}
DEFAULTS["dense"] = {}
DEFAULTS["dsa"] = {"top_k": 64}

# ---------------------------------------------------------------------------
# Key budgets.


def _counts(kind: str, n: int, p: dict[str, Any]) -> np.ndarray:
  i = np.arange(n)
  if kind == "dense":
    return (i + 1).astype(np.float64)
  if kind == "dsa":
    return np.minimum(p["top_k"], i + 1).astype(np.float64)
  if kind == "sliding_window":
    return sliding_window_keys_per_query(n, p["window"])
  if kind in ("strided", "fixed"):
    return sparse_transformer_keys_per_query(
        n, pattern=kind, stride=p["stride"], summary=p.get("summary", 1),
        combine=p["combine"], layer_index=p.get("layer_index"),
        num_heads=p.get("num_heads"))
  if kind == "lsh":
    return lsh_nominal_keys_per_query(n, n_hashes=p["n_hashes"],
                                      chunk_size=p["chunk_size"],
                                      n_buckets=p["n_buckets"],
                                      same_bucket=p["same_bucket"])
  if kind == "nsa":
    return nsa_keys_per_query(n, cmp_block=p["cmp_block"],
                              cmp_stride=p["cmp_stride"],
                              select_block=p["select_block"],
                              num_selected=p["num_selected"],
                              window=p["window"])
  if kind == "moba":
    return moba_keys_per_query(n, block_size=p["block_size"], top_k=p["top_k"])
  raise ValueError(f"unknown kind {kind!r}; known: {sorted(DEFAULTS)}.")


def _params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
  if kind not in DEFAULTS:
    raise ValueError(f"unknown kind {kind!r}; known: {sorted(DEFAULTS)}.")
  p = dict(DEFAULTS[kind])
  p["layer_index"] = None       # "alternate": average over the two parities
  p.update(params)
  return p


def keys_per_query(kind: str, seq_len: int, **params) -> np.ndarray:
  """float64[seq_len]: keys attended by the query at position i (causal, no padding).

  params: the layer's kind parameters (missing ones from DEFAULTS); also
  `num_heads` (split Sparse Transformer) and `layer_index` (alternate;
  None = mean over the two parities). For "lsh" the count is nominal
  (data-dependent; see `lsh.lsh_nominal_keys_per_query`).
  """
  return _counts(kind, int(seq_len), _params(kind, params))


def key_budget(kind: str, seq_len: int, **params) -> float:
  """Average keys per query of `kind` on a causal sequence of length seq_len."""
  return float(np.mean(keys_per_query(kind, seq_len, **params)))


# The parameter `match_budget` tunes for each kind by default.
BUDGET_PARAM = {"dsa": "top_k", "sliding_window": "window", "strided": "stride",
                "fixed": "stride", "lsh": "chunk_size", "nsa": "num_selected",
                "moba": "top_k"}


def match_budget(kind: str, seq_len: int, target: float, *,
                 free: str | None = None, **params) -> dict[str, Any]:
  """Kind parameters whose key budget is closest to `target` keys per query.

  Searches integer values 1..seq_len of the `free` parameter (default
  BUDGET_PARAM[kind]) with the other parameters fixed (`params`, else
  DEFAULTS); ties go to the smaller value. Returns the full parameter dict
  (DEFAULTS updated), ready to pass to the layer constructor.
  """
  free = free or BUDGET_PARAM.get(kind)
  if free is None:
    raise ValueError(f"kind {kind!r} has no budget parameter to tune.")
  base = _params(kind, params)
  best, best_err = None, np.inf
  for value in range(1, int(seq_len) + 1):
    p = dict(base, **{free: value})
    if kind == "fixed" and p["summary"] > value:
      continue
    if kind == "nsa" and p["cmp_stride"] > p["cmp_block"]:
      continue
    err = abs(float(np.mean(_counts(kind, int(seq_len), p))) - target)
    if err < best_err:
      best, best_err = value, err
  if best is None:
    raise ValueError(f"no value of {free} is valid for {kind} with {params}.")
  out = dict(DEFAULTS[kind])
  out.update(params)
  out[free] = best
  return out
