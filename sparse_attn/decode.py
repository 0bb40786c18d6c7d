"""KV cache + indexer key cache, chunked prefill, decode step, generation.

DSA pays off at decode time: a step scores the cached indexer keys (one
DI-vector per token, cheap), keeps the top-k, and reads only those K rows of
the KV cache. This module keeps, per layer, a `LayerCache`

    k, v        [B, S_max, G, D]   keys (RoPE-d) and values of every kind
    k_idx       [B, S_max, DI]     DSA only: indexer keys (LayerNorm + RoPE-d),
                                   float32, bfloat16 or float8_e4m3fn
    k_idx_scale f32[B, S_max]      DSA + float8 only: per-token dequant scale

plus per-sequence lengths int32[B] (`Cache.lengths`). T new tokens of row b
sit at positions lengths[b] + arange(T); they are written into the cache at
that per-row offset (a vmap'd dynamic_update_slice), then attend over the
cache with the pure API: q_offset = lengths (int32[B]) and kv_lengths =
lengths + num_valid (num_valid[b] <= T new tokens of row b are real; the
rest is padding of a shorter prompt). The same jitted function serves
prefill chunks (T = chunk) and decode steps (T = 1).

Overflow never wraps: dynamic_update_slice clamps its start index, so the
host-side API tracks an upper bound of the lengths as a Python int
(`Cache.max_length`) and raises ValueError before launching a step that
would write past S_max.

Attention reads a static prefix "view" of the cache, the smallest power of
two >= the longest sequence (at least `min_view`, at most S_max), so a step
costs O(current length), not O(S_max), at the price of one compilation per
view size (log2(S_max) at most).

Kinds (see docs/decode.md): dense, dsa, sliding_window, strided, fixed, nsa
and moba attend T new queries against the full K/V cache with their pure
functions (q_offset / kv_lengths); lsh has no incremental form and
recomputes LSH self-attention over the cached prefix (its cache holds the
shared-QK vectors of all H heads instead of keys), exact for
lookback="window" only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from sparse_attn import sharding as shd
from sparse_attn.attention import dense_attention, dsa_attention
from sparse_attn.baseline_layers import (FixedAttention, LSHAttention,
                                         MoBAAttention, NSAAttention,
                                         SlidingWindowAttention,
                                         StridedAttention)
from sparse_attn.layers import MODES, AttentionLayer, DenseAttention, DSAAttention
from sparse_attn.lsh import lsh_attention
from sparse_attn.moba import moba_attention
from sparse_attn.nsa import nsa_attention
from sparse_attn.patterns import (sliding_window_attention,
                                  sparse_transformer_attention)

INDEX_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")
_F8_MAX = 448.0   # largest finite float8_e4m3fn


# ---------------------------------------------------------------------------
# cache pytrees
# ---------------------------------------------------------------------------

@struct.dataclass
class LayerCache:
  """One attention layer's cache (see the module docstring for shapes)."""
  k: jax.Array
  v: jax.Array
  k_idx: jax.Array | None = None
  k_idx_scale: jax.Array | None = None


@struct.dataclass
class Cache:
  """Per-layer caches + lengths int32[B].

  max_length is a host-side (static, non-pytree) upper bound of `lengths`,
  used to refuse overflowing writes before a step is launched and to pick
  the attention view. Do not pass a Cache itself to jax.jit (the static
  field would retrace every step); the `Decoder` jits its arrays.
  """
  layers: tuple[LayerCache, ...]
  lengths: jax.Array
  max_length: int = struct.field(pytree_node=False, default=0)

  @property
  def capacity(self) -> int:
    """S_max: tokens each sequence can hold."""
    return int(self.layers[0].k.shape[1])

  @property
  def batch_size(self) -> int:
    return int(self.lengths.shape[0])


def _index_dtype(name) -> jnp.dtype:
  name = jnp.dtype(name).name if not isinstance(name, str) else name
  if name not in INDEX_DTYPES:
    raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got "
                     f"{name!r}.")
  return jnp.dtype(name)


def quantize_index_keys(k_idx: jax.Array, dtype) -> tuple[jax.Array, Any]:
  """k_idx [..., DI] -> (stored [..., DI] in `dtype`, f32 scale [...] or None).

  float8_e4m3fn uses one f32 scale per token (amax / 448, as DeepSeek stores
  its indexer cache); bfloat16 / float32 are plain casts.
  """
  dtype = _index_dtype(dtype)
  if dtype != jnp.float8_e4m3fn:
    return k_idx.astype(dtype), None
  kf = k_idx.astype(jnp.float32)
  amax = jnp.max(jnp.abs(kf), axis=-1)
  scale = jnp.where(amax > 0, amax / _F8_MAX, 1.0)
  return (kf / scale[..., None]).astype(dtype), scale


def dequantize_index_keys(stored: jax.Array, scale: jax.Array | None,
                          dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_index_keys` (to `dtype`)."""
  x = stored.astype(jnp.float32)
  if scale is not None:
    x = x * scale[..., None]
  return x.astype(dtype)


def _layer_cache_shapes(layer, batch: int, max_len: int, index_dtype,
                        kv_dtype) -> LayerCache:
  """ShapeDtypeStructs of one layer's cache."""
  sds = jax.ShapeDtypeStruct
  if isinstance(layer, LSHAttention):
    if layer.lookback != "window":
      raise ValueError(
          "LSH decode is only exact with lookback='window' (chunk boundaries "
          "of lookback='chunk' depend on every token); this layer has "
          f"lookback={layer.lookback!r}.")
    kshape = (batch, max_len, layer.num_heads, layer.head_dim)
  elif isinstance(layer, AttentionLayer):
    kshape = (batch, max_len, layer.num_kv_heads, layer.head_dim)
  else:
    raise ValueError(f"no decode support for layer type {type(layer).__name__}.")
  vshape = (batch, max_len, layer.num_kv_heads, layer.head_dim)
  out = LayerCache(k=sds(kshape, kv_dtype), v=sds(vshape, kv_dtype))
  if isinstance(layer, DSAAttention):
    idt = _index_dtype(index_dtype)
    di = layer.indexer.head_dim
    out = out.replace(k_idx=sds((batch, max_len, di), idt))
    if idt == jnp.float8_e4m3fn:
      out = out.replace(k_idx_scale=sds((batch, max_len), jnp.float32))
  return out


def _attention_layers(model) -> list[AttentionLayer]:
  return [block.attn for block in model.blocks]


def cache_shapes(model, batch_size: int, max_len: int, *,
                 index_dtype="float32") -> Cache:
  """Abstract cache (ShapeDtypeStructs) for `model` (a sparse_attn Transformer)."""
  if max_len < 1 or batch_size < 1:
    raise ValueError(f"batch_size and max_len must be >= 1, got "
                     f"{batch_size}, {max_len}.")
  kv_dtype = jnp.dtype(model.cfg.dtype)
  layers = tuple(_layer_cache_shapes(l, batch_size, max_len, index_dtype,
                                     kv_dtype)
                 for l in _attention_layers(model))
  return Cache(layers=layers,
               lengths=jax.ShapeDtypeStruct((batch_size,), jnp.int32),
               max_length=0)


_CACHE_AXES = {"k": ("batch", "length", "kv_heads", "head_dim"),
               "v": ("batch", "length", "kv_heads", "head_dim"),
               "k_idx": ("batch", "length", "indexer_dim"),
               "k_idx_scale": ("batch", "length")}


def cache_shardings(cache: Cache, mesh: Mesh,
                    rules=shd.LOGICAL_RULES) -> Cache:
  """NamedShardings (same structure as `cache`) sharding it like activations.

  Batch over the mesh's batch axes (data x fsdp), kv heads over "tensor"
  (LSH caches shard their H query heads the same way), everything else
  replicated; a dimension that does not divide its mesh axes stays
  replicated (`sharding.logical_to_spec`). Works on arrays or
  ShapeDtypeStructs.
  """
  def layer(lc: LayerCache) -> LayerCache:
    out = {}
    for name in ("k", "v", "k_idx", "k_idx_scale"):
      x = getattr(lc, name)
      out[name] = None if x is None else NamedSharding(
          mesh, shd.logical_to_spec(_CACHE_AXES[name], x.shape, mesh, rules))
    return LayerCache(**out)

  lengths = NamedSharding(mesh, shd.logical_to_spec(
      ("batch",), cache.lengths.shape, mesh, rules))
  return Cache(layers=tuple(layer(l) for l in cache.layers), lengths=lengths,
               max_length=cache.max_length)


def init_cache(model, batch_size: int, max_len: int, *,
               index_dtype="float32", mesh: Mesh | None = None) -> Cache:
  """Zero cache with lengths 0; sharded by `cache_shardings` if mesh given."""
  abstract = cache_shapes(model, batch_size, max_len, index_dtype=index_dtype)
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  if mesh is None:
    return jax.jit(zeros)()
  return jax.jit(zeros, out_shardings=cache_shardings(abstract, mesh))()


# ---------------------------------------------------------------------------
# per-kind cached attention
# ---------------------------------------------------------------------------

def write_rows(cache: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """cache[b, starts[b]:starts[b]+T] = new[b] (per-row offsets).

  dynamic_update_slice clamps a start that would overflow: callers must
  ensure starts + T <= S_max (the Decoder checks it on the host).
  """
  def one(c, n, s):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype),
                                        (s,) + (0,) * (c.ndim - 1))
  return jax.vmap(one)(cache, new, starts)


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What every kind's cached attention sees (all traced except view/mode)."""
  x: jax.Array            # [B, T, E] layer input (normed)
  positions: jax.Array    # int32[B, T] = lengths[:, None] + arange(T)
  lengths: jax.Array      # int32[B] tokens in the cache before this step
  kv_lengths: jax.Array   # int32[B] valid tokens after this step
  view: int               # static cache prefix attention reads
  mode: str               # DSA stage: "sparse" (top-k) or "dense"/"warmup"


# kind class -> fn(layer, q, k_view, v_view, lc, s: StepInputs) -> (o, lc)
CACHED_ATTENTION: dict[type, Callable] = {}


def register_cached_attention(cls: type, fn: Callable) -> None:
  """Decode support for a layer class (looked up along the MRO)."""
  CACHED_ATTENTION[cls] = fn


def _lookup(layer) -> Callable:
  for cls in type(layer).__mro__:
    if cls in CACHED_ATTENTION:
      return CACHED_ATTENTION[cls]
  raise ValueError(f"attention layer {type(layer).__name__} has no decode "
                   f"support; known: {[c.__name__ for c in CACHED_ATTENTION]}.")


def _dense_cached(layer, q, k, v, lc, s):
  del layer
  return dense_attention(q, k, v, q_offset=s.lengths,
                         kv_lengths=s.kv_lengths), lc


def _dsa_cached(layer: DSAAttention, q, k, v, lc, s):
  q_idx, k_idx, w = layer.index(s.x, s.positions)
  stored, scale = quantize_index_keys(k_idx, lc.k_idx.dtype)
  lc = lc.replace(k_idx=write_rows(lc.k_idx, stored, s.lengths))
  if scale is not None:
    lc = lc.replace(k_idx_scale=write_rows(lc.k_idx_scale, scale, s.lengths))
  lc = jax.lax.optimization_barrier(lc)  # in-place write, see layer_step
  if s.mode != "sparse":
    return _dense_cached(layer, q, k, v, lc, s)
  view_scale = None if scale is None else lc.k_idx_scale[:, :s.view]
  keys = dequantize_index_keys(lc.k_idx[:, :s.view], view_scale, q_idx.dtype)
  o = dsa_attention(q, k, v, q_idx, keys, w, top_k=layer.top_k,
                    q_offset=s.lengths, kv_lengths=s.kv_lengths,
                    implementation=layer.implementation)
  return o, lc


def _sliding_cached(layer: SlidingWindowAttention, q, k, v, lc, s):
  return sliding_window_attention(
      q, k, v, window=layer.window, q_offset=s.lengths,
      kv_lengths=s.kv_lengths, implementation=layer.implementation), lc


def _sparse_transformer_cached(layer, q, k, v, lc, s):
  return sparse_transformer_attention(
      q, k, v, pattern=layer.pattern, stride=layer.stride,
      summary=layer.summary, combine=layer.combine,
      layer_index=layer.layer_index, q_offset=s.lengths,
      kv_lengths=s.kv_lengths), lc


def _nsa_cached(layer: NSAAttention, q, k, v, lc, s):
  mlp = layer.compress == "mlp"
  # pylint: disable=protected-access
  o = nsa_attention(
      q, k, v, layer.gates(s.x), cmp_block=layer.cmp_block,
      cmp_stride=layer.cmp_stride, select_block=layer.select_block,
      num_selected=layer.num_selected, window=layer.window,
      compress_k=layer._mlp("k") if mlp else None,
      compress_v=layer._mlp("v") if mlp else None, q_offset=s.lengths,
      kv_lengths=s.kv_lengths, implementation=layer.implementation)
  return o, lc


def _moba_cached(layer: MoBAAttention, q, k, v, lc, s):
  return moba_attention(q, k, v, block_size=layer.block_size,
                        top_k=layer.top_k, q_offset=s.lengths,
                        kv_lengths=s.kv_lengths), lc


def _lsh_cached(layer: LSHAttention, q, k, v, lc, s):
  """Recomputes LSH self-attention over the cached prefix (no incremental form).

  `k` is the cached shared-QK prefix [B, view, H, D] (it already holds q);
  outputs at positions lengths[b] + arange(T) are taken from the result.
  O(view log view) per step.
  """
  o = lsh_attention(k, v, n_buckets=layer.n_buckets, n_hashes=layer.n_hashes,
                    chunk_size=layer.chunk_size, key=layer.hash_key(),
                    same_bucket=layer.same_bucket, lookback=layer.lookback,
                    kv_lengths=s.kv_lengths)
  idx = jnp.clip(s.positions, 0, o.shape[1] - 1)
  return jnp.take_along_axis(o, idx[:, :, None, None], axis=1), lc


register_cached_attention(DenseAttention, _dense_cached)
register_cached_attention(DSAAttention, _dsa_cached)
register_cached_attention(SlidingWindowAttention, _sliding_cached)
register_cached_attention(StridedAttention, _sparse_transformer_cached)
register_cached_attention(FixedAttention, _sparse_transformer_cached)
register_cached_attention(NSAAttention, _nsa_cached)
register_cached_attention(MoBAAttention, _moba_cached)
register_cached_attention(LSHAttention, _lsh_cached)


def layer_step(layer: AttentionLayer, x: jax.Array, lc: LayerCache,
               s: StepInputs) -> tuple[jax.Array, LayerCache]:
  """One attention layer on T new tokens against its cache: (y [B,T,E], cache)."""
  fn = _lookup(layer)
  q, k, v = layer.project(x, s.positions)
  if k is None:           # shared-QK (LSH): the cache keeps q itself
    k = q
  lc = lc.replace(k=write_rows(lc.k, k, s.lengths),
                  v=write_rows(lc.v, v, s.lengths))
  # The barrier keeps XLA from fusing the in-place row write into the
  # attention that reads the cache: fused, it copies the whole cache (several
  # times per step on CPU) instead of updating the donated buffer in place.
  lc = jax.lax.optimization_barrier(lc)
  o, lc = fn(layer, q, lc.k[:, :s.view], lc.v[:, :s.view], lc, s)
  return layer.output(o), lc


def forward_cached(model, layers, lengths, tokens, num_valid, *, view: int,
                   mode: str = "sparse", last_only: bool = False):
  """The Transformer on T new tokens per row against the cache (traceable).

  tokens int[B, T]; num_valid int32[B] (<= T) real tokens per row. Returns
  (logits f32[B, T, V] or, with last_only, f32[B, V] at each row's last real
  token, new layers, new lengths = lengths + num_valid). Mirrors
  `model.Transformer.__call__` / `Block.__call__` block by block.
  """
  cfg = model.cfg
  batch, num_new = tokens.shape
  positions = lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)
  kv_lengths = lengths + num_valid
  table = model.embed[...]
  x = table[tokens].astype(model.dtype) * jnp.asarray(cfg.embed_dim ** 0.5,
                                                      model.dtype)
  new_layers = []
  for block, lc in zip(model.blocks, layers):
    s = StepInputs(block.attn_norm(x), positions, lengths, kv_lengths, view,
                   mode)
    y, lc = layer_step(block.attn, s.x, lc, s)
    x = x + y.astype(x.dtype)
    x = x + block.mlp(block.mlp_norm(x)).astype(x.dtype)
    new_layers.append(lc)
  if last_only:
    last = jnp.clip(num_valid - 1, 0, num_new - 1)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
  x = model.final_norm(x)
  if cfg.tie_embeddings:
    logits = jnp.einsum("bte,ve->btv", x, table.astype(model.dtype))
  else:
    logits = jnp.einsum("bte,ev->btv", x, model.unembed[...].astype(model.dtype))
  logits = logits.astype(jnp.float32)
  if last_only:
    logits = logits[:, 0]
  return logits, tuple(new_layers), kv_lengths


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------

def sample_logits(logits: jax.Array, key: jax.Array, *,
                  temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
  """int32[B] tokens from logits f32[B, V].

  temperature 0: greedy (argmax). Otherwise softmax(logits / temperature)
  restricted to the smallest set of tokens whose probability reaches top_p
  (nucleus sampling; top_p = 1 keeps every token; the top token is always
  kept).
  """
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got "
                     f"{temperature}, {top_p}.")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs   # mass of strictly better tokens
    kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# the host-side API
# ---------------------------------------------------------------------------

def _pow2_ceil(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


@dataclasses.dataclass
class Generation:
  """Output of `Decoder.generate`."""
  tokens: np.ndarray          # int32[B, max_new_tokens] generated tokens
  prompt_lengths: np.ndarray  # int32[B]
  prefill_s: float            # wall time of the prefill (incl. compilation)
  first_step_s: float         # first decode step (incl. its compilation)
  decode_s: float             # the remaining decode steps
  prefill_tokens: int         # real prompt tokens processed
  decode_steps: int           # steps timed in decode_s

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prefill_tokens / max(self.prefill_s, 1e-9)

  @property
  def decode_tokens_per_s(self) -> float:
    """Generated tokens per second over the timed steps (all rows)."""
    return self.decode_steps * len(self.tokens) / max(self.decode_s, 1e-9)


class Decoder:
  """Chunked prefill, decode steps and generation for a sparse_attn Transformer.

      dec = Decoder(model, chunk_size=512)
      cache = dec.init_cache(batch_size=2, max_len=4096)
      logits, cache = dec.prefill(cache, tokens, prompt_lengths)  # f32[B, V]
      logits, cache = dec.step(cache, next_tokens)                # f32[B, V]
      out = dec.generate(tokens, prompt_lengths, max_new_tokens=64)

  Args:
    model: a `sparse_attn.model.Transformer` (any attention kind with decode
      support; see docs/decode.md).
    chunk_size: prompt tokens per prefill step (the last chunk may be
      shorter); a chunk attends over the cache, so peak memory is bounded by
      the chunk, never [P, P].
    index_dtype: storage of the DSA indexer key cache: "float32",
      "bfloat16" or "float8_e4m3fn" (+ per-token f32 scale).
    mode: "sparse" (DSA top-k) or "dense" (DSA layers attend densely: the
      dense twin of the same weights); other kinds ignore it.
    mesh: if given, caches are created with `cache_shardings(cache, mesh)`
      and every step keeps them so (parameters keep their own shardings).
    min_view: smallest attention view (see the module docstring); views are
      powers of two between min_view and S_max.
  """

  def __init__(self, model, *, chunk_size: int = 512, index_dtype="float32",
               mode: str = "sparse", mesh: Mesh | None = None,
               min_view: int = 256):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if chunk_size < 1 or min_view < 1:
      raise ValueError(f"chunk_size and min_view must be >= 1, got "
                       f"{chunk_size}, {min_view}.")
    self.cfg = model.cfg
    self.index_dtype = _index_dtype(index_dtype)
    self.chunk_size, self.mode, self.mesh = int(chunk_size), mode, mesh
    self.min_view = int(min_view)
    # Fail early on kinds without decode support.
    cache_shapes(model, 1, 1, index_dtype=self.index_dtype)
    for layer in _attention_layers(model):
      _lookup(layer)
    self._model = model
    self.graphdef, self.params = nnx.split(model)
    self._extend = jax.jit(self._extend_fn,
                           static_argnames=("view", "last_only"),
                           donate_argnums=(1,))
    self._decode_sample = jax.jit(self._decode_sample_fn,
                                  static_argnames=("view", "temperature",
                                                   "top_p"),
                                  donate_argnums=(1,))

  # -- jitted bodies -------------------------------------------------------

  def _constrain(self, layers, lengths):
    if self.mesh is None:
      return layers, lengths
    sh = cache_shardings(Cache(layers, lengths), self.mesh)
    layers = jax.lax.with_sharding_constraint(layers, sh.layers)
    return layers, jax.lax.with_sharding_constraint(lengths, sh.lengths)

  def _extend_fn(self, params, layers, lengths, tokens, num_valid, *, view,
                 last_only):
    model = nnx.merge(self.graphdef, params)
    logits, layers, lengths = forward_cached(
        model, layers, lengths, tokens, num_valid, view=view, mode=self.mode,
        last_only=last_only)
    layers, lengths = self._constrain(layers, lengths)
    return logits, layers, lengths

  def _decode_sample_fn(self, params, layers, lengths, tokens, key, *, view,
                        temperature, top_p):
    ones = jnp.ones_like(lengths)
    logits, layers, lengths = self._extend_fn(
        params, layers, lengths, tokens[:, None], ones, view=view,
        last_only=True)
    nxt = sample_logits(logits, key, temperature=temperature, top_p=top_p)
    return nxt, layers, lengths

  # -- host-side helpers ---------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int) -> Cache:
    """Zero cache for batch_size sequences of up to max_len tokens."""
    return init_cache(self._model, batch_size, max_len,
                      index_dtype=self.index_dtype, mesh=self.mesh)

  def view_for(self, cache: Cache, end: int) -> int:
    """Static cache prefix covering `end` tokens (power of two, clipped)."""
    return min(cache.capacity, max(self.min_view, _pow2_ceil(end)))

  def _check_room(self, cache: Cache, num_new: int, what: str):
    if cache.max_length + num_new > cache.capacity:
      raise ValueError(
          f"KV cache overflow: {what} would write {num_new} token(s) after up "
          f"to {cache.max_length} cached ones, past the cache capacity "
          f"S_max={cache.capacity}; allocate a larger cache (max_len).")

  def extend(self, cache: Cache, tokens, num_valid=None, *,
             last_only: bool = True, view: int | None = None):
    """T new tokens per row at each row's own offset -> (logits, cache).

    tokens int[B, T]; num_valid int[B] (default T): the first num_valid[b]
    tokens of row b are real (the rest is padding, written past the row's
    end and never attended). logits f32[B, V] at each row's last real token
    (last_only) or f32[B, T, V]. Raises ValueError, before launching, if any
    row could overflow the cache.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] != cache.batch_size:
      raise ValueError(f"tokens must be int[B={cache.batch_size}, T], got "
                       f"shape {tokens.shape}.")
    num_new = tokens.shape[1]
    self._check_room(cache, num_new, "this step")
    if num_valid is None:
      num_valid = np.full((cache.batch_size,), num_new, np.int32)
    num_valid = jnp.asarray(num_valid, jnp.int32)
    if view is None:
      view = self.view_for(cache, cache.max_length + num_new)
    logits, layers, lengths = self._extend(
        self.params, cache.layers, cache.lengths, tokens, num_valid,
        view=view, last_only=last_only)
    return logits, Cache(layers, lengths, cache.max_length + num_new)

  def step(self, cache: Cache, tokens, *, view: int | None = None):
    """One decode step: tokens int[B] -> (logits f32[B, V], cache)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return self.extend(cache, tokens[:, None], view=view)

  def prefill(self, cache: Cache, tokens, prompt_lengths=None, *,
              return_all: bool = False):
    """Prompts in chunks of chunk_size -> (logits f32[B, V], cache).

    tokens int[B, P] right-padded; prompt_lengths int[B] in [1, P] (default
    P), on the host. The cache must be empty (lengths 0). Returns the
    logits at each row's last prompt token (f32[B, P, V] at every position
    with return_all) and the cache with lengths = prompt_lengths.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != cache.batch_size:
      raise ValueError(f"tokens must be int[B={cache.batch_size}, P], got "
                       f"shape {tokens.shape}.")
    batch, plen = tokens.shape
    lens = (np.full((batch,), plen, np.int64) if prompt_lengths is None
            else np.asarray(prompt_lengths).astype(np.int64))
    if lens.shape != (batch,) or lens.min() < 1 or lens.max() > plen:
      raise ValueError(f"prompt_lengths must be int[{batch}] in [1, P={plen}],"
                       f" got {lens.tolist()}.")
    if cache.max_length != 0:
      raise ValueError("prefill needs an empty cache (use extend() to add "
                       "tokens to a filled one).")
    if int(lens.max()) > cache.capacity:
      raise ValueError(f"KV cache overflow: prompt of {int(lens.max())} tokens "
                       f"exceeds the cache capacity S_max={cache.capacity}.")
    plen = int(lens.max())          # drop all-padding columns
    tokens = tokens[:, :plen]
    last, outs = None, []
    for start in range(0, plen, self.chunk_size):
      chunk = tokens[:, start:start + self.chunk_size]
      valid = np.clip(lens - start, 0, chunk.shape[1]).astype(np.int32)
      logits, cache = self.extend(cache, chunk, valid,
                                  last_only=not return_all)
      # extend's bound assumed every row grew by T; the real bound is tighter.
      cache = cache.replace(max_length=int(np.minimum(lens, start +
                                                      chunk.shape[1]).max()))
      if return_all:
        outs.append(logits)
        continue
      has = jnp.asarray(valid > 0)[:, None]
      last = logits if last is None else jnp.where(has, logits, last)
    if return_all:
      return jnp.concatenate(outs, axis=1), cache
    return last, cache

  def generate(self, tokens, prompt_lengths=None, *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               max_len: int | None = None) -> Generation:
    """Prefill + max_new_tokens sampled tokens per row (greedy by default).

    The cache holds max_len tokens (default max(prompt_lengths) +
    max_new_tokens); a longer request raises ValueError up front. Every
    decode step attends over one fixed view (one compilation).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int[B, P], got shape {tokens.shape}.")
    batch = tokens.shape[0]
    lens = (np.full((batch,), tokens.shape[1], np.int64)
            if prompt_lengths is None else np.asarray(prompt_lengths))
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    need = int(lens.max()) + max_new_tokens - 1   # the last token is not cached
    max_len = need if max_len is None else int(max_len)
    if need > max_len:
      raise ValueError(
          f"KV cache overflow: prompt of up to {int(lens.max())} tokens + "
          f"{max_new_tokens} new tokens needs {need} cached tokens, but "
          f"max_len={max_len}.")
    sample_logits(jnp.zeros((1, 2)), jax.random.key(0),
                  temperature=temperature, top_p=top_p)   # validates args
    cache = self.init_cache(batch, max_len)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    logits, cache = self.prefill(cache, tokens, lens)
    key, sub = jax.random.split(key)
    tok = sample_logits(logits, sub, temperature=temperature, top_p=top_p)
    tok.block_until_ready()
    t1 = time.perf_counter()
    view = self.view_for(cache, need)
    out, first_s = [tok], 0.0
    for i in range(max_new_tokens - 1):
      self._check_room(cache, 1, "this decode step")
      key, sub = jax.random.split(key)
      tok, layers, lengths = self._decode_sample(
          self.params, cache.layers, cache.lengths, tok, sub, view=view,
          temperature=float(temperature), top_p=float(top_p))
      cache = Cache(layers, lengths, cache.max_length + 1)
      out.append(tok)
      if i == 0:
        tok.block_until_ready()
        first_s = time.perf_counter() - t1
    out = np.stack([np.asarray(t) for t in out], axis=1)
    t2 = time.perf_counter()
    steps = max(max_new_tokens - 2, 0)
    return Generation(tokens=out.astype(np.int32),
                      prompt_lengths=lens.astype(np.int32),
                      prefill_s=t1 - t0, first_step_s=first_s,
                      decode_s=(t2 - t1 - first_s) if steps else 0.0,
                      prefill_tokens=int(lens.sum()), decode_steps=steps)


def generate(model, tokens, prompt_lengths=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             chunk_size: int = 512, index_dtype="float32",
             mode: str = "sparse", mesh: Mesh | None = None,
             max_len: int | None = None) -> Generation:
  """One-call generation (see `Decoder.generate`)."""
  dec = Decoder(model, chunk_size=chunk_size, index_dtype=index_dtype,
                mode=mode, mesh=mesh)
  return dec.generate(tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, seed=seed,
                      max_len=max_len)
