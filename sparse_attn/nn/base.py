"""The attention layer every kind builds on: projections, RoPE, cache, one forward.

One call serves training, evaluation, chunked prefill and decode steps:

    y, aux = layer(x, positions=None, kv_lengths=None, mode="sparse")
    y, aux, cache = layer(x, positions=pos, kv_lengths=kv, mode=m, cache=cache)

x [B, T, E] -> y [B, T, E]. `aux` is a dict of f32 scalars that models sum
over layers:
  - "indexer_kl": the layer's indexer loss (0 for kinds without an indexer,
    and with a cache: losses are training quantities);
  - "attended_keys": query-key pairs attended (summed over B and T; for kinds
    whose key set differs between heads, the mean over heads);
  - "visible_keys": the pairs a dense causal layer would attend.
`mode` is the DSA training stage: "dense" (dense attention, no indexer
loss), "warmup" (dense attention + the dense indexer KL) or "sparse" (top-k
attention + the sparse KL); kinds without an indexer ignore it.

The cache belongs to the layer (as in the Flax Gemma example). `init_cache`
returns this kind's cache pytree (its first leaf [B, S_max, ...], the
others [B, ...]; the layout is the kind's business, e.g. DSA adds its
indexer key cache, CSA / HCA their entries per group). With `cache=`,
the T new tokens of row b sit at positions[b] = start[b] + arange(T), where
start[b] tokens are already cached (a row continues where its last call
ended, or restarts at 0: kinds may keep state of the latest tokens, as
CSA / HCA do): the layer writes their rows at that
offset, attends over the first `view` cache slots (a static int, default
S_max; the caller keeps it >= every row's kv_length) with
q_offset = start and `kv_lengths` (default start + T), and returns the
updated cache. Writes never wrap: callers keep start + T <= S_max
(`sparse_attn.inference.Decoder` checks it on the host before any write).

Subclasses implement `attend(q, k, v, ctx) -> (o [B, T, H, Dv], aux, cache)`;
`ctx` (a `Context`) carries the layer input, positions, kv_lengths, mode and,
when decoding, q_offset, the cache (K/V rows already written) and the view.
Parameters carry logical axis names (`logical_axes` metadata: embed, heads,
kv_heads, head_dim, ...) that `sparse_attn.sharding` maps to mesh axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, overload

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from sparse_attn import dispatch
from sparse_attn.nn.norm import RMSNorm
from sparse_attn.nn.params import param
from sparse_attn.ops import masking
from sparse_attn.ops.rope import RopeScaling, apply_rope, as_rope_scaling

MODES = ("dense", "warmup", "sparse")
# The Pallas kernels a layer may configure (`block_sizes`).
KERNELS = ("topk", "gathered_attention")

Aux = dict[str, jax.Array]


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def default_positions(x: jax.Array) -> jax.Array:
  """int32[B, T] positions 0..T-1 of every row of x [B, T, ...]."""
  batch, length = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def dense_key_counts(
  positions: jax.Array, num_keys: int, kv_lengths: Any
) -> jax.Array:
  """Number of query-key pairs a dense causal layer attends (f32 scalar)."""
  return jnp.sum(masking.num_visible(positions, num_keys, kv_lengths)).astype(
    jnp.float32
  )


def counts_aux(
  attended: jax.typing.ArrayLike | None,
  positions: jax.Array,
  num_keys: int,
  kv_lengths: Any,
  kl: jax.Array | None = None,
) -> Aux:
  """The aux dict: attended pairs (any shape, summed; None: every visible
  pair, i.e. dense attention), the dense count, the indexer KL (default 0)."""
  visible = dense_key_counts(positions, num_keys, kv_lengths)
  return {
    "indexer_kl": jnp.zeros((), jnp.float32) if kl is None else kl,
    "attended_keys": visible
    if attended is None
    else jnp.sum(attended).astype(jnp.float32),
    "visible_keys": visible,
  }


def write_rows(
  cache: jax.Array, new: jax.Array, starts: jax.Array
) -> jax.Array:
  """cache[b, starts[b]:starts[b]+T] = new[b] (per-row offsets).

  dynamic_update_slice clamps a start that would overflow, so callers must
  keep starts + T <= S_max.
  """

  def one(c, n, s):
    return jax.lax.dynamic_update_slice(
      c, n.astype(c.dtype), (s,) + (0,) * (c.ndim - 1)
    )

  return jax.vmap(one)(cache, new, starts)


@struct.dataclass
class KVCache:
  """Keys (RoPE applied) k [B, S_max, G, D] and values v [B, S_max, G, Dv].

  `axes` names the logical axes of each field (for `sharding` rules). Every
  cache of every kind is [B, ...] in each leaf and [B, S_max, ...] in its
  first (`Cache.capacity` reads S_max there).
  """

  k: jax.Array
  v: jax.Array

  axes: ClassVar[dict[str, tuple[str, ...]]] = {
    "k": ("batch", "length", "kv_heads", "head_dim"),
    "v": ("batch", "length", "kv_heads", "head_dim"),
  }


@dataclasses.dataclass(frozen=True)
class Context:
  """What `attend` sees besides q, k, v (all arrays traced, view static)."""

  x: jax.Array  # [B, T, E] layer input
  positions: jax.Array  # int32[B, T] absolute positions
  kv_lengths: jax.Array | None  # int32[B] or None (no padding)
  mode: str  # "dense" | "warmup" | "sparse"
  q_offset: jax.Array | None = None  # int32[B] with a cache; None = S - T
  cache: Any = None  # this layer's cache (K/V rows written)
  view: int | None = None  # cache slots attention reads
  # The sequence sharded over a mesh axis (`sparse_attn.nn.context_parallel`
  # .ContextParallel); None: every device holds the whole sequence.
  context_parallel: Any = None
  # The selection of the nearest preceding full DSA layer, for a layer that
  # reuses it (`sparse_attn.nn.index_share.SharedIndex`, IndexCache).
  shared: Any = None

  @property
  def decoding(self) -> bool:
    return self.cache is not None


class AttentionLayer(nnx.Module):
  """GQA/MQA projections shared by every kind: x -> (q, k, v), o -> y.

  Args:
    embed_dim, num_heads, num_kv_heads, head_dim: E, H, G, D (H % G == 0).
    layer_index: position of the layer in its model (kinds that alternate
      patterns by layer, or seed per-layer hashing, read it).
    implementation: None / "xla" / "pallas" for the kinds that have kernels.
    block_sizes: the kernels' tile sizes, {"topk": ..., "gathered_attention":
      ...} with a `BlockSizes` or a dict of its fields each (None fields and
      missing kernels take the per-platform defaults); the XLA path ignores
      them.
    rope_base: RoPE base of q and k.
    rope_scaling: RoPE frequency scaling (`sparse_attn.ops.rope.RopeScaling`,
      or its HF-style dict: YaRN, llama3, linear); None: plain RoPE.
    qkv_bias: biases bq [H, D], bk / bv [G, D] on the q, k, v projections
      (Qwen2; Llama / Qwen3 with attention_bias).
    out_bias: a bias bo [E] on the output projection (Llama / Qwen3 with
      attention_bias).
    qk_norm: RMSNorm over head_dim of every q and k head, before RoPE
      (Qwen3's q_norm / k_norm), with eps `norm_eps`.
    dtype / param_dtype: activation / parameter dtypes.
  """

  #: Whether the layer's projections are the GQA ones above, so the
  #: qkv_bias / out_bias / qk_norm options apply (MLA and shared-QK layers
  #: project differently and refuse them).
  projection_options: ClassVar[bool] = True
  #: Whether `attend` runs with the sequence sharded (`context_parallel=`);
  #: kinds whose patterns need the whole sequence on one device leave it off.
  supports_context_parallel: ClassVar[bool] = False

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    layer_index: int = 0,
    implementation: str | None = None,
    block_sizes: Mapping[str, Any] | None = None,
    rope_base: float = 10000.0,
    rope_scaling: Any = None,
    qkv_bias: bool = False,
    out_bias: bool = False,
    qk_norm: bool = False,
    norm_eps: float = 1e-6,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(
        f"num_heads={num_heads} must be a multiple of num_kv_heads="
        f"{num_kv_heads}."
      )
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
    self.layer_index, self.implementation = int(layer_index), implementation
    sizes = dict(block_sizes or {})
    unknown = sorted(set(sizes) - set(KERNELS))
    if unknown:
      raise ValueError(
        f"block_sizes: unknown kernels {unknown}; known: {list(KERNELS)}."
      )
    # Frozen dataclasses (hashable), so they are static data of the module.
    self.topk_block_sizes = dispatch.block_sizes(
      "topk", sizes.get("topk"), "block_sizes['topk']"
    )
    self.attention_block_sizes = dispatch.block_sizes(
      "gathered_attention",
      sizes.get("gathered_attention"),
      "block_sizes['gathered_attention']",
    )
    self.rope_base, self.dtype = rope_base, dtype
    self.rope_scaling: RopeScaling | None = as_rope_scaling(rope_scaling)
    options = {"qkv_bias": qkv_bias, "out_bias": out_bias, "qk_norm": qk_norm}
    if any(options.values()) and not self.projection_options:
      raise ValueError(
        f"{type(self).__name__} does not take "
        f"{sorted(k for k, v in options.items() if v)}: its projections "
        "are not the GQA q/k/v/o ones."
      )
    self.qkv_bias, self.out_bias = bool(qkv_bias), bool(out_bias)
    self.qk_norm, self.norm_eps = bool(qk_norm), float(norm_eps)
    self.init_projections(rngs, param_dtype)

  @property
  def kv_slots(self) -> int:
    """K/V heads the projections produce and the cache holds: num_kv_heads
    (a kind with several K/V sets, NSA's per branch, holds them all)."""
    return self.num_kv_heads

  def init_projections(self, rngs: nnx.Rngs, param_dtype: Any) -> None:
    """Creates the projection parameters (GQA: wq, wk, wv, wo).

    Layers with other projections (MLA) override this and `project` /
    `output`.
    """
    e, h = self.embed_dim, self.num_heads
    g, d = self.kv_slots, self.head_dim
    self.wq = param(
      rngs, (e, h, d), ("embed", "heads", "head_dim"), param_dtype
    )
    self.wk = param(
      rngs, (e, g, d), ("embed", "kv_heads", "head_dim"), param_dtype
    )
    self.wv = param(
      rngs, (e, g, d), ("embed", "kv_heads", "head_dim"), param_dtype
    )
    self.wo = param(
      rngs, (h, d, e), ("heads", "head_dim", "embed"), param_dtype
    )
    zeros = nnx.initializers.zeros_init()
    if self.qkv_bias:
      self.bq = param(rngs, (h, d), ("heads", "head_dim"), param_dtype, zeros)
      self.bk = param(
        rngs, (g, d), ("kv_heads", "head_dim"), param_dtype, zeros
      )
      self.bv = param(
        rngs, (g, d), ("kv_heads", "head_dim"), param_dtype, zeros
      )
    if self.out_bias:
      self.bo = param(rngs, (e,), ("embed",), param_dtype, zeros)
    if self.qk_norm:
      eps = self.norm_eps
      self.q_norm = RMSNorm(
        d, eps=eps, param_dtype=param_dtype, axis_name="head_dim"
      )
      self.k_norm = RMSNorm(
        d, eps=eps, param_dtype=param_dtype, axis_name="head_dim"
      )

  # -- projections -----------------------------------------------------------

  def project(
    self, x: jax.Array, positions: jax.Array
  ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """x [B, T, E] -> q [B, T, H, D], k [B, T, G, D], v [B, T, G, D] (RoPE-d)."""
    x = x.astype(self.dtype)
    q = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(self.dtype))
    k = jnp.einsum("bte,egd->btgd", x, self.wk[...].astype(self.dtype))
    v = jnp.einsum("bte,egd->btgd", x, self.wv[...].astype(self.dtype))
    if self.qkv_bias:
      q = q + self.bq[...].astype(self.dtype)
      k = k + self.bk[...].astype(self.dtype)
      v = v + self.bv[...].astype(self.dtype)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return self.rope(q, positions), self.rope(k, positions), v

  def rope(
    self,
    x: jax.Array,
    positions: jax.Array,
    *,
    rope_dim: int | None = None,
    interleaved: bool = False,
  ) -> jax.Array:
    """RoPE of the layer (its base and scaling) on x [B, T, N, D]."""
    return apply_rope(
      x,
      positions,
      rope_dim=rope_dim,
      base=self.rope_base,
      scaling=self.rope_scaling,
      interleaved=interleaved,
    )

  def output(self, o: jax.Array) -> jax.Array:
    """o [B, T, H, Dv] -> y [B, T, E]."""
    y = jnp.einsum("bthd,hde->bte", o, self.wo[...].astype(self.dtype))
    if self.out_bias:
      y = y + self.bo[...].astype(self.dtype)
    return y

  # -- cache -----------------------------------------------------------------

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> Any:
    """Zero cache for batch_size sequences of up to max_len tokens.

    dtype: K/V storage (default: the layer's activation dtype).
    index_dtype: the DSA indexer key storage (other kinds ignore it).
    """
    del index_dtype
    dt = self.dtype if dtype is None else dtype
    shape = (batch_size, max_len, self.kv_slots, self.head_dim)
    return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))

  def write_cache(
    self,
    cache: Any,
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array,
    start: jax.Array,
  ) -> Any:
    """Writes the new tokens' K/V rows at per-row offsets `start` int32[B]."""
    del q
    if k is None:
      raise ValueError(
        f"{type(self).__name__}.project returns no k, so the layer must "
        "override write_cache."
      )
    return cache.replace(
      k=write_rows(cache.k, k, start), v=write_rows(cache.v, v, start)
    )

  def read_cache(self, cache: Any, view: int) -> tuple[jax.Array, jax.Array]:
    """(k [B, view, ...], v [B, view, ...]): the prefix attention reads."""
    return cache.k[:, :view], cache.v[:, :view]

  # -- the forward -----------------------------------------------------------

  @overload
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    mode: str = "sparse",
    cache: None = None,
    view: int | None = None,
    context_parallel: Any = None,
    shared: Any = None,
  ) -> tuple[jax.Array, Aux]: ...

  @overload
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    mode: str = "sparse",
    cache: Any,
    view: int | None = None,
    context_parallel: Any = None,
    shared: Any = None,
  ) -> tuple[jax.Array, Aux, Any]: ...

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    mode: str = "sparse",
    cache: Any = None,
    view: int | None = None,
    context_parallel: Any = None,
    shared: Any = None,
  ) -> tuple[jax.Array, Aux] | tuple[jax.Array, Aux, Any]:
    """(y, aux) without a cache; (y, aux, new_cache) with one (see module doc).

    context_parallel: a `ContextParallel` when x [B, T, E] is in its layout
    order and sharded over its axis (positions then required: the natural
    position of each row). Without a cache, a full sequence (no
    kv_lengths); with one, a prefill chunk of T tokens (T splits into the
    layout; padding past kv_lengths allowed): its K/V rows are written in
    natural order and its queries attend the cache view, read whole on
    every shard. Single-token decode steps run without it.

    shared: the `SharedIndex` of the nearest preceding full DSA layer of
    the same call (IndexCache), for a DSA layer without an indexer of its
    own; every other layer ignores it. A full layer returns its own in
    aux["index_share"] (the Transformer passes it on).
    """
    check_mode(mode)
    if x.ndim != 3 or x.shape[-1] != self.embed_dim:
      raise ValueError(
        f"x must be [B, T, E={self.embed_dim}], got shape {x.shape}."
      )
    if context_parallel is not None:
      self._check_context_parallel(
        context_parallel, x, positions, kv_lengths, cache
      )
    if positions is None:
      if cache is not None:
        raise ValueError(
          "positions int32[B, T] are required with a cache "
          "(they say where the new tokens go)."
        )
      positions = default_positions(x)
    if tuple(positions.shape) != tuple(x.shape[:2]):
      raise ValueError(
        f"positions must be [B, T] = {x.shape[:2]}, got shape "
        f"{positions.shape}."
      )
    q, k, v = self.project(x, positions)
    if cache is None:
      ctx = Context(
        x,
        positions,
        kv_lengths,
        mode,
        context_parallel=context_parallel,
        shared=shared,
      )
      o, aux, _ = self.attend(q, k, v, ctx)
      self._check_attend(x, o, aux)
      return self.output(o), aux
    start = positions[:, 0].astype(jnp.int32)
    if kv_lengths is None:
      kv_lengths = start + x.shape[1]
    capacity: int = jax.tree.leaves(cache)[0].shape[1]
    view = capacity if view is None else int(view)
    if not 1 <= view <= capacity:
      raise ValueError(f"view must be in [1, S_max={capacity}], got {view}.")
    if context_parallel is None:
      cache = self.write_cache(cache, q, k, v, start)
    else:
      # The chunk is in layout order; the cache holds natural order.
      k_rows, v_rows = context_parallel.to_natural((k, v))
      cache = self.write_cache(cache, q, k_rows, v_rows, start)
    # The barrier keeps XLA from fusing the in-place row write into the
    # attention that reads the cache: fused, it copies the whole cache
    # (several times per step on CPU) instead of updating the donated buffer.
    cache = jax.lax.optimization_barrier(cache)
    k_view, v_view = self.read_cache(cache, view)
    ctx = Context(
      x,
      positions,
      kv_lengths,
      mode,
      q_offset=start,
      cache=cache,
      view=view,
      context_parallel=context_parallel,
      shared=shared,
    )
    o, aux, new_cache = self.attend(q, k_view, v_view, ctx)
    self._check_attend(x, o, aux)
    # A kind's attend must hand back a cache of the same structure and
    # shapes (it may only have written rows into it).
    chex.assert_trees_all_equal_shapes_and_dtypes(new_cache, cache)
    return self.output(o), aux, new_cache

  def _check_context_parallel(
    self, cp: Any, x: jax.Array, positions, kv_lengths, cache
  ) -> None:
    name = type(self).__name__
    if not type(self).supports_context_parallel:
      raise ValueError(
        f"context_parallel: {name} does not support a sharded sequence "
        f"(supported: dense, dsa, mla, mla_dsa)."
      )
    if cache is None and kv_lengths is not None:
      raise ValueError(
        "context_parallel runs full sequences without padding: kv_lengths "
        "must be None without a cache (mask padded tokens in the loss)."
      )
    if positions is None:
      raise ValueError(
        "context_parallel needs positions int32[B, S] (the natural position "
        "of each row of the layout, ContextParallel.layout_positions, plus "
        "the chunk's start with a cache)."
      )
    cp.check_length(f"x of shape {x.shape}", x.shape[1])

  def _check_attend(self, x: jax.Array, o: jax.Array, aux: Aux) -> None:
    """What every kind's attend must return (a clear error for new kinds)."""
    chex.assert_shape(o, (x.shape[0], x.shape[1], self.num_heads, None))
    missing = {"indexer_kl", "attended_keys", "visible_keys"} - set(aux)
    if missing:
      raise ValueError(
        f"{type(self).__name__}.attend returned aux without "
        f"{sorted(missing)}; use counts_aux(...)."
      )

  #: The kind's attention as a pure function of its params dataclass,
  #: fn(q, k, v, params, *, q_offset, kv_lengths, layer_index,
  #: implementation, block_sizes, **attention_inputs(ctx)) -> (o [B,T,H,Dv],
  #: keys attended per query f32[B,T]). A kind that sets it (and stores its
  #: params as `self.params`) needs no `attend` of its own; the registry's
  #: pure form is the same function (`nn.kind.pure_form`).
  counted_attention: ClassVar[Callable[..., tuple[jax.Array, jax.Array]] | None]
  counted_attention = None
  params: Any = None

  def attention_inputs(self, ctx: Context) -> dict[str, Any]:
    """Extra keyword inputs of `counted_attention` (e.g. NSA's gates)."""
    del ctx
    return {}

  def attention_kv(
    self, k: Any, v: jax.Array
  ) -> tuple[Any, jax.Array, dict[str, Any]]:
    """(k, v, extra keyword inputs) `counted_attention` gets from the
    projected or cached K/V: as they are by default (NSA splits its
    branches' K/V, LSH passes its pre-RoPE vectors to hash)."""
    return k, v, {}

  def attend(
    self, q: jax.Array, k: Any, v: jax.Array, ctx: Context
  ) -> tuple[jax.Array, Aux, Any]:
    """Attention of a kind: (o [B, T, H, Dv], aux, ctx.cache possibly updated).

    The default runs `counted_attention`; kinds with an indexer or a cache of
    their own override it.
    """
    fn = type(self).counted_attention
    if fn is None:
      raise TypeError(
        f"{type(self).__name__} must set counted_attention or implement "
        f"attend()."
      )
    k, v, kv_inputs = self.attention_kv(k, v)
    o, counts = fn(
      q,
      k,
      v,
      self.params,
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
      layer_index=self.layer_index,
      implementation=self.implementation,
      block_sizes=self.attention_block_sizes,
      **kv_inputs,
      **self.attention_inputs(ctx),
    )
    aux = counts_aux(counts, ctx.positions, v.shape[1], ctx.kv_lengths)
    return o, aux, ctx.cache
