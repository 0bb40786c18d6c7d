"""The host-side decoding driver: chunked prefill, decode steps, generation.

The model does the work (`Transformer.__call__(tokens, cache=...)`: one
forward for training and decoding, each attention layer owning its cache);
the `Decoder` drives it from the host:
  - chunking: a prompt is prefilled `chunk_size` tokens at a time, so peak
    memory is bounded by a chunk, never [P, P];
  - views: attention reads a static prefix of the cache, the smallest power
    of two >= the longest sequence (at least `min_view`, at most S_max), so a
    step costs O(current length), not O(S_max), at the price of one
    compilation per view size (log2(S_max) at most);
  - overflow: writes never wrap (dynamic_update_slice clamps its start), so
    the Decoder tracks an upper bound of the lengths as a Python int
    (`Cache.max_length`) and raises ValueError before launching a step that
    would write past S_max;
  - sampling (greedy / temperature / top-p) and jitted steps with donated
    caches, optionally sharded over a mesh (`cache_shardings`);
  - context parallelism (`context_parallel=`): each prefill chunk is split
    over the mesh's context axis in its causally balanced layout (its
    activations O(chunk / C) per device) and writes the cache in natural
    order; decode steps (one token) run as without it.

Prompts of different lengths are batched right-padded: row b's tokens are
written at its own offset (lengths[b]) and only num_valid[b] of them count.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sparse_attn.inference.sampling import sample_logits
from sparse_attn.models.cache import Cache, cache_shardings
from sparse_attn.nn.base import check_mode
from sparse_attn.ops import context_layout
from sparse_attn.ops.quantize import index_dtype as as_index_dtype


def init_cache(
  model,
  batch_size: int,
  max_len: int,
  *,
  index_dtype: Any = "float32",
  mesh: Mesh | None = None,
) -> Cache:
  """model.init_cache(...) made by one jitted call, sharded if mesh is given."""
  make = lambda: model.init_cache(batch_size, max_len, index_dtype=index_dtype)
  if mesh is None:
    return jax.jit(make)()
  abstract = jax.eval_shape(make)
  return jax.jit(make, out_shardings=cache_shardings(abstract, mesh))()


def cache_shapes(
  model, batch_size: int, max_len: int, *, index_dtype: Any = "float32"
) -> Cache:
  """Abstract cache (ShapeDtypeStructs) of `model`."""
  return jax.eval_shape(
    lambda: model.init_cache(batch_size, max_len, index_dtype=index_dtype)
  )


def _pow2_ceil(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


@dataclasses.dataclass
class Generation:
  """Output of `Decoder.generate`."""

  tokens: np.ndarray  # int32[B, max_new_tokens] generated tokens
  prompt_lengths: np.ndarray  # int32[B]
  prefill_s: float  # wall time of the prefill (incl. compilation)
  first_step_s: float  # first decode step (incl. its compilation)
  decode_s: float  # the remaining decode steps
  prefill_tokens: int  # real prompt tokens processed
  decode_steps: int  # steps timed in decode_s

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
    model: a `sparse_attn.models.Transformer` (every registered kind decodes;
      see docs/decode.md).
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
    context_parallel: a `sparse_attn.nn.context_parallel.ContextParallel`
      (its mesh is the default `mesh`): prefill chunks of more than one
      token are split over its axis (chunk_size must split into its layout;
      the last chunk is padded to do so). Each shard reads the cache view
      whole; the cache, logits and sampled tokens equal the unsharded
      Decoder's. Dense, DSA, MLA and DSA-on-MLA layers only.
  """

  def __init__(
    self,
    model,
    *,
    chunk_size: int = 512,
    index_dtype: Any = "float32",
    mode: str = "sparse",
    mesh: Mesh | None = None,
    min_view: int = 256,
    context_parallel: Any = None,
  ):
    check_mode(mode)
    if chunk_size < 1 or min_view < 1:
      raise ValueError(
        f"chunk_size and min_view must be >= 1, got {chunk_size}, {min_view}."
      )
    self.context_parallel = context_parallel
    if context_parallel is not None:
      context_parallel.check_length(f"chunk_size={chunk_size}", chunk_size)
      mesh = context_parallel.mesh if mesh is None else mesh
    self.cfg = model.cfg
    self.index_dtype = as_index_dtype(index_dtype)
    self.chunk_size, self.mode, self.mesh = int(chunk_size), mode, mesh
    self.min_view = int(min_view)
    # Fail early on layers that cannot decode (e.g. LSH with lookback="chunk").
    cache_shapes(model, 1, 1, index_dtype=self.index_dtype)
    self._model = model
    self.graphdef, self.params = nnx.split(model)
    self._extend = jax.jit(
      self._extend_fn,
      static_argnames=("view", "last_only", "split"),
      donate_argnums=(1,),
    )
    self._decode_sample = jax.jit(
      self._decode_sample_fn,
      static_argnames=("view", "temperature", "top_p"),
      donate_argnums=(1,),
    )

  # -- jitted bodies -------------------------------------------------------

  def _constrain(self, layers, lengths):
    if self.mesh is None:
      return layers, lengths
    sh = cache_shardings(Cache(layers, lengths), self.mesh)
    layers = jax.lax.with_sharding_constraint(layers, sh.layers)
    return layers, jax.lax.with_sharding_constraint(lengths, sh.lengths)

  def _extend_fn(
    self,
    params,
    layers,
    lengths,
    tokens,
    num_valid,
    *,
    view,
    last_only,
    split=False,
  ):
    # split: the chunk runs over the context axis, in its layout order;
    # tokens in and logits out stay in natural order.
    cp = self.context_parallel if split else None
    if cp is not None:
      tokens = context_layout.to_layout(tokens, cp.size, cp.layout)
      tokens = jax.lax.with_sharding_constraint(tokens, cp.sequence_sharding())
    model = nnx.merge(self.graphdef, params)
    logits, _, cache = model(
      tokens,
      mode=self.mode,
      cache=Cache(layers, lengths),
      num_valid=num_valid,
      view=view,
      logits_at=num_valid - 1 if last_only else None,
      context_parallel=cp,
    )
    if cp is not None and not last_only:
      logits = cp.to_natural(logits)
    layers, lengths = self._constrain(cache.layers, cache.lengths)
    return logits, layers, lengths

  def _decode_sample_fn(
    self, params, layers, lengths, tokens, key, *, view, temperature, top_p
  ):
    ones = jnp.ones_like(lengths)
    logits, layers, lengths = self._extend_fn(
      params, layers, lengths, tokens[:, None], ones, view=view, last_only=True
    )
    nxt = sample_logits(logits, key, temperature=temperature, top_p=top_p)
    return nxt, layers, lengths

  # -- host-side helpers ---------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int) -> Cache:
    """Zero cache for batch_size sequences of up to max_len tokens."""
    return init_cache(
      self._model,
      batch_size,
      max_len,
      index_dtype=self.index_dtype,
      mesh=self.mesh,
    )

  def view_for(self, cache: Cache, end: int) -> int:
    """Static cache prefix covering `end` tokens (power of two, clipped)."""
    return min(cache.capacity, max(self.min_view, _pow2_ceil(end)))

  def _check_room(self, cache: Cache, num_new: int, what: str):
    if cache.max_length + num_new > cache.capacity:
      raise ValueError(
        f"KV cache overflow: {what} would write {num_new} token(s) after up "
        f"to {cache.max_length} cached ones, past the cache capacity "
        f"S_max={cache.capacity}; allocate a larger cache (max_len)."
      )

  def extend(
    self,
    cache: Cache,
    tokens,
    num_valid=None,
    *,
    last_only: bool = True,
    view: int | None = None,
  ):
    """T new tokens per row at each row's own offset -> (logits, cache).

    tokens int[B, T]; num_valid int[B] (default T): the first num_valid[b]
    tokens of row b are real (the rest is padding, written past the row's
    end and never attended). With context_parallel, T > 1 must split into
    its layout (T = 1 runs unsharded). logits f32[B, V] at each row's last real token
    (last_only) or f32[B, T, V]. Raises ValueError, before launching, if any
    row could overflow the cache.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] != cache.batch_size:
      raise ValueError(
        f"tokens must be int[B={cache.batch_size}, T], got "
        f"shape {tokens.shape}."
      )
    num_new = tokens.shape[1]
    self._check_room(cache, num_new, "this step")
    if num_valid is None:
      num_valid = np.full((cache.batch_size,), num_new, np.int32)
    num_valid = jnp.asarray(num_valid, jnp.int32)
    if view is None:
      view = self.view_for(cache, cache.max_length + num_new)
    cp = self.context_parallel
    split = cp is not None and num_new > 1
    if cp is not None and split:
      cp.check_length(
        f"tokens of shape {tokens.shape} (a context-parallel chunk)", num_new
      )
    logits, layers, lengths = self._extend(
      self.params,
      cache.layers,
      cache.lengths,
      tokens,
      num_valid,
      view=view,
      last_only=last_only,
      split=split,
    )
    return logits, Cache(layers, lengths, cache.max_length + num_new)

  def step(self, cache: Cache, tokens, *, view: int | None = None):
    """One decode step: tokens int[B] -> (logits f32[B, V], cache)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    return self.extend(cache, tokens[:, None], view=view)

  def _pad_chunk(self, chunk: np.ndarray, start: int, capacity: int):
    """A context-parallel chunk right-padded to split into the layout."""
    cp = self.context_parallel
    multiple = cp.size * context_layout.chunks_per_shard(cp.layout)
    width = -(-chunk.shape[1] // multiple) * multiple
    if start + width > capacity:
      raise ValueError(
        f"KV cache overflow: the last prefill chunk, padded to {width} "
        f"tokens (a multiple of {multiple} for context_parallel), would end "
        f"at {start + width}, past S_max={capacity}; allocate a larger cache "
        f"(max_len) or pick chunk_size dividing the prompt."
      )
    pad = np.zeros((chunk.shape[0], width - chunk.shape[1]), chunk.dtype)
    return np.concatenate([chunk, pad], axis=1)

  def prefill(
    self, cache: Cache, tokens, prompt_lengths=None, *, return_all: bool = False
  ):
    """Prompts in chunks of chunk_size -> (logits f32[B, V], cache).

    tokens int[B, P] right-padded; prompt_lengths int[B] in [1, P] (default
    P), on the host. The cache must be empty (lengths 0). Returns the
    logits at each row's last prompt token (f32[B, P, V] at every position
    with return_all) and the cache with lengths = prompt_lengths.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != cache.batch_size:
      raise ValueError(
        f"tokens must be int[B={cache.batch_size}, P], got "
        f"shape {tokens.shape}."
      )
    batch, plen = tokens.shape
    lens = (
      np.full((batch,), plen, np.int64)
      if prompt_lengths is None
      else np.asarray(prompt_lengths).astype(np.int64)
    )
    if lens.shape != (batch,) or lens.min() < 1 or lens.max() > plen:
      raise ValueError(
        f"prompt_lengths must be int[{batch}] in [1, P={plen}],"
        f" got {lens.tolist()}."
      )
    if cache.max_length != 0:
      raise ValueError(
        "prefill needs an empty cache (use extend() to add "
        "tokens to a filled one)."
      )
    if int(lens.max()) > cache.capacity:
      raise ValueError(
        f"KV cache overflow: prompt of {int(lens.max())} tokens "
        f"exceeds the cache capacity S_max={cache.capacity}."
      )
    plen = int(lens.max())  # drop all-padding columns
    tokens = tokens[:, :plen]
    last, outs = None, []
    for start in range(0, plen, self.chunk_size):
      chunk = tokens[:, start : start + self.chunk_size]
      valid = np.clip(lens - start, 0, chunk.shape[1]).astype(np.int32)
      width = chunk.shape[1]
      if self.context_parallel is not None:
        chunk = self._pad_chunk(chunk, start, cache.capacity)
      logits, cache = self.extend(cache, chunk, valid, last_only=not return_all)
      if return_all:
        logits = logits[:, :width]
      # extend's bound assumed every row grew by T; the real bound is tighter.
      cache = dataclasses.replace(
        cache, max_length=int(np.minimum(lens, start + chunk.shape[1]).max())
      )
      if return_all:
        outs.append(logits)
        continue
      has = jnp.asarray(valid > 0)[:, None]
      last = logits if last is None else jnp.where(has, logits, last)
    if return_all:
      return jnp.concatenate(outs, axis=1), cache
    assert last is not None  # plen >= 1 (checked above): one chunk ran
    return last, cache

  def generate(
    self,
    tokens,
    prompt_lengths=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_len: int | None = None,
  ) -> Generation:
    """Prefill + max_new_tokens sampled tokens per row (greedy by default).

    The cache holds max_len tokens (default max(prompt_lengths) +
    max_new_tokens); a longer request raises ValueError up front. Every
    decode step attends over one fixed view (one compilation).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int[B, P], got shape {tokens.shape}.")
    batch = tokens.shape[0]
    lens = (
      np.full((batch,), tokens.shape[1], np.int64)
      if prompt_lengths is None
      else np.asarray(prompt_lengths)
    )
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    need = int(lens.max()) + max_new_tokens - 1  # the last token is not cached
    max_len = need if max_len is None else int(max_len)
    if need > max_len:
      raise ValueError(
        f"KV cache overflow: prompt of up to {int(lens.max())} tokens + "
        f"{max_new_tokens} new tokens needs {need} cached tokens, but "
        f"max_len={max_len}."
      )
    sample_logits(
      jnp.zeros((1, 2)), jax.random.key(0), temperature=temperature, top_p=top_p
    )  # validates args
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
        self.params,
        cache.layers,
        cache.lengths,
        tok,
        sub,
        view=view,
        temperature=float(temperature),
        top_p=float(top_p),
      )
      cache = Cache(layers, lengths, cache.max_length + 1)
      out.append(tok)
      if i == 0:
        tok.block_until_ready()
        first_s = time.perf_counter() - t1
    out = np.stack([np.asarray(t) for t in out], axis=1)
    t2 = time.perf_counter()
    steps = max(max_new_tokens - 2, 0)
    return Generation(
      tokens=out.astype(np.int32),
      prompt_lengths=lens.astype(np.int32),
      prefill_s=t1 - t0,
      first_step_s=first_s,
      decode_s=(t2 - t1 - first_s) if steps else 0.0,
      prefill_tokens=int(lens.sum()),
      decode_steps=steps,
    )


def generate(
  model,
  tokens,
  prompt_lengths=None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  chunk_size: int = 512,
  index_dtype: Any = "float32",
  mode: str = "sparse",
  mesh: Mesh | None = None,
  max_len: int | None = None,
) -> Generation:
  """One-call generation (see `Decoder.generate`)."""
  dec = Decoder(
    model, chunk_size=chunk_size, index_dtype=index_dtype, mode=mode, mesh=mesh
  )
  return dec.generate(
    tokens,
    prompt_lengths,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    seed=seed,
    max_len=max_len,
  )
