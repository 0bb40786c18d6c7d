"""DeepSeek Sparse Attention layer: GQA/MQA attention + a lightning indexer.

Training stages (DeepSeek-V3.2-Exp): `mode="warmup"` attends densely and
returns the dense indexer KL; `mode="sparse"` keeps each query's top-k keys
by index score and returns the sparse KL over that set; `mode="dense"` is
the dense twin (no loss). Decoding keeps the indexer key cache beside the
K/V cache (`DSACache`), optionally in bfloat16 or float8 + a per-token scale.

The stage logic (which attention each mode runs, which KL it returns) is
`indexed_attention`, shared with DSA on MLA (`sparse_attn.nn.mla`); the
indexer key cache is written and read by `cached_index_keys`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sparse_attn.nn import index_share
from sparse_attn.nn.base import (
  AttentionLayer,
  Aux,
  Context,
  KVCache,
  counts_aux,
  write_rows,
)
from sparse_attn.nn.index_share import SharedIndex
from sparse_attn.nn.indexer import LightningIndexer
from sparse_attn.nn.kind import AttentionKind
from sparse_attn.ops import checks, hisa, quantize
from sparse_attn.ops.attention import (
  dense_attention,
  dsa_attention,
  gathered_attention,
)
from sparse_attn.ops.indexer import lightning_topk
from sparse_attn.ops.losses import dense_indexer_kl, sparse_indexer_kl


@dataclasses.dataclass(frozen=True)
class DSAParams:
  """DSA's parameters: top-k and the indexer's size.

  top_k: keys kept per query (K). indexer_heads / indexer_dim: HI / DI.
  indexer_rope_dim: dims of q_idx / k_idx that get RoPE (None: DI // 2).
  detach_indexer_input: the indexer reads a stop-gradient copy of x, so its
  loss never reaches the trunk.
  indexer_precision: "float32" or "fp8" (DeepSeek's FP8 indexer: Hadamard
  rotation + e4m3 codes, `sparse_attn.ops.quantize`); indexer_scale_fmt:
  None or "ue8m0" (power-of-two FP8 scales). indexer_rope_interleaved: the
  indexer rotates interleaved pairs (DeepSeek's first inference demo; the
  default rotate-half is transformers' DeepseekV32Indexer).
  hisa_block_size: None (DSA's flat top-k over every visible key) or the
  block size of HISA's hierarchical top-k (`sparse_attn.ops.hisa`, a
  training-free drop-in: blocks of this many indexer keys are scored by
  their mean key, the best `hisa_blocks` kept, then the top-k of their
  keys); hisa_blocks: HISA's kept blocks per query (m >= 2; the paper's
  64 with block size 128).
  indexer_layers / indexer_every: top-k reuse across layers (IndexCache,
  `sparse_attn.nn.index_share`): the layers whose index is in
  indexer_layers (None: every indexer_every-th layer from 0; the default 1
  is every layer) own an indexer; the others reuse the selection of the
  nearest preceding one. index_share_distill: a reusing layer adds its KL
  against that indexer (the multi-layer distillation loss; each KL of a
  group is divided by the group's size); False: only full layers train
  their indexers, on their own attention.
  """

  top_k: int = 64
  indexer_heads: int = 4
  indexer_dim: int = 32
  indexer_rope_dim: int | None = None
  detach_indexer_input: bool = True
  indexer_precision: str = "float32"
  indexer_scale_fmt: str | None = None
  indexer_rope_interleaved: bool = False
  hisa_block_size: int | None = None
  hisa_blocks: int = hisa.PAPER_NUM_BLOCKS
  indexer_layers: tuple[int, ...] | None = None
  indexer_every: int = 1
  index_share_distill: bool = True

  def __post_init__(self):
    check_indexer_params(self)


def check_indexer_params(p: Any) -> None:
  """Validates the DSA fields of a params dataclass (DSA, DSA on MLA)."""
  for name in ("top_k", "indexer_heads", "indexer_dim"):
    checks.check_positive_int(name, getattr(p, name))
  rope = p.indexer_rope_dim
  if rope is not None and (rope % 2 or not 0 <= rope <= p.indexer_dim):
    raise ValueError(
      f"indexer_rope_dim must be even and in [0, indexer_dim="
      f"{p.indexer_dim}], got {rope}."
    )
  quantize.check_indexer_precision(p.indexer_precision, p.indexer_scale_fmt)
  if p.hisa_block_size is not None:
    hisa.check_hisa_sizes(p.hisa_block_size, p.hisa_blocks)
  if isinstance(p.indexer_layers, list):  # from JSON
    object.__setattr__(p, "indexer_layers", tuple(p.indexer_layers))
  index_share.check_index_share_params(p)
  if p.indexer_precision == "fp8" and p.indexer_dim & (p.indexer_dim - 1):
    raise ValueError(
      f"indexer_precision='fp8' rotates by a Hadamard matrix: indexer_dim "
      f"must be a power of two, got {p.indexer_dim}."
    )


def index_selector(p: Any) -> Callable[..., jax.Array] | None:
  """The top-k stage of DSA parameters `p`: None for DSA's flat
  `lightning_topk`, else HISA's `hisa_topk` at p's block sizes, as
  fn(q_idx, k_idx, weights, k, *, q_offset, kv_lengths) -> int32[B, T, K]."""
  if p.hisa_block_size is None:
    return None
  return functools.partial(
    hisa.hisa_topk, block_size=p.hisa_block_size, num_blocks=p.hisa_blocks
  )


def index_role(p: Any, layer_index: int) -> str:
  """ "full" (owns an indexer) or "shared" (reuses the top-k of the nearest
  preceding full layer) for the DSA layer at layer_index (IndexCache)."""
  return "full" if index_share.owns_indexer(p, layer_index) else "shared"


def sharing(p: Any) -> bool:
  """Whether some DSA layer under params p reuses another's top-k."""
  return p.indexer_layers is not None or p.indexer_every > 1


def share_options(layer: Any) -> dict[str, Any]:
  """distill / kl_weight / layer name of a DSA layer's IndexCache losses:
  with distillation each KL of a group is divided by the group's size (the
  mean over the layers a full layer serves)."""
  distill = layer.dsa.index_share_distill
  weight = 1.0 / layer.index_group_size if distill else 1.0
  return {
    "distill": distill,
    "kl_weight": weight,
    "layer": f"{type(layer).__name__} (layer {layer.layer_index})",
  }


def check_has_indexer(layer: Any) -> None:
  if layer.indexer is None:
    raise ValueError(
      f"{type(layer).__name__} at layer {layer.layer_index} has no indexer: "
      f"it reuses the top-k of an earlier layer (indexer_layers="
      f"{layer.dsa.indexer_layers}, indexer_every={layer.dsa.indexer_every})."
    )


def build_indexer(
  embed_dim: int,
  p: DSAParams,
  *,
  rope_dim: int | None,
  query_input_dim: int | None = None,
  rope_base: float,
  rope_scaling: Any,
  dtype: Any,
  param_dtype: Any,
  rngs: nnx.Rngs,
) -> LightningIndexer:
  """The lightning indexer of a DSA layer with parameters `p` (rope_dim:
  its RoPE dims, None for the indexer's default)."""
  return LightningIndexer(
    embed_dim,
    p.indexer_heads,
    p.indexer_dim,
    rope_dim=rope_dim,
    query_input_dim=query_input_dim,
    rope_base=rope_base,
    rope_scaling=rope_scaling,
    rope_interleaved=p.indexer_rope_interleaved,
    precision=p.indexer_precision,
    scale_fmt=p.indexer_scale_fmt,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
  )


def step_indexer_inputs(layer: Any, ctx: Context):
  """(q_idx, k_idx, weights, cache) of a DSA layer for one call.

  `layer.index(x, positions)` gives the indexer inputs; when decoding, the
  new keys go into the layer's cache and k_idx becomes the cached keys
  [B, view, DI]. An FP8 indexer's own codes and scales are what an fp8 key
  cache stores (bit-exact), so only then are they asked for.
  """
  if not ctx.decoding:
    q_idx, k_idx, w = layer.index(ctx.x, ctx.positions)
    return q_idx, k_idx, w, ctx.cache
  codes = None
  if layer.indexer.precision == "fp8":
    q_idx, k_idx, w, codes = layer.index(
      ctx.x, ctx.positions, return_key_codes=True
    )
  else:
    q_idx, k_idx, w = layer.index(ctx.x, ctx.positions)
  assert ctx.q_offset is not None and ctx.view is not None
  if ctx.context_parallel is not None:
    # A context-parallel chunk is in layout order; the cache is natural.
    k_idx, codes = ctx.context_parallel.to_natural((k_idx, codes))
  cache, k_idx = cached_index_keys(
    ctx.cache, layer.indexer, k_idx, ctx.q_offset, ctx.view, q_idx.dtype, codes
  )
  return q_idx, k_idx, w, cache


def index_key_cache(
  batch_size: int, max_len: int, dim: int, index_dtype: Any
) -> tuple[jax.Array, jax.Array | None]:
  """Zero indexer key cache [B, S_max, DI] (+ f32 scales [B, S_max] for fp8)."""
  idt = quantize.index_dtype(index_dtype)
  scale = (
    jnp.zeros((batch_size, max_len), jnp.float32)
    if idt == jnp.float8_e4m3fn
    else None
  )
  return jnp.zeros((batch_size, max_len, dim), idt), scale


def cached_index_keys(
  cache: Any,
  indexer: LightningIndexer,
  k_idx: jax.Array,
  start: jax.Array,
  view: int,
  dtype: Any,
  codes: Any = None,
) -> tuple[Any, jax.Array]:
  """Writes the new indexer keys at `start`; returns (cache, keys [B, view, DI]).

  `cache` has fields k_idx / k_idx_scale (DSACache, MLADSACache); codes:
  the FP8 indexer's key codes and scales (stored as they are in an fp8
  cache).
  """
  stored, scale = indexer.quantize_keys(k_idx, cache.k_idx.dtype, codes)
  cache = cache.replace(k_idx=write_rows(cache.k_idx, stored, start))
  if scale is not None:
    cache = cache.replace(
      k_idx_scale=write_rows(cache.k_idx_scale, scale, start)
    )
  cache = jax.lax.optimization_barrier(cache)  # in-place write, see base
  view_scale = (
    None if cache.k_idx_scale is None else cache.k_idx_scale[:, :view]
  )
  keys = quantize.dequantize_index_keys(
    cache.k_idx[:, :view], view_scale, dtype
  )
  return cache, keys


def indexed_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  ctx: Context,
  *,
  top_k: int,
  scale: float | None = None,
  implementation: str | None = None,
  topk_block_sizes: Any = None,
  attention_block_sizes: Any = None,
  select: Callable[..., jax.Array] | None = None,
  export: bool = False,
  kl_weight: float = 1.0,
) -> tuple[jax.Array, Aux]:
  """DSA's attention for the stage `ctx.mode`: (o [B, T, H, Dv], aux).

  "sparse": each query's top-k keys by index score (`dsa_attention`) and
  the sparse KL over them; "warmup": dense attention + the dense KL;
  "dense": dense attention, no loss. No loss while decoding. q [B, T, H, D],
  k [B, S, G, D], v [B, S, G, Dv] (any form: GQA, MLA's MHA or absorbed
  form), indexer inputs over the same T and S; `scale` the logit scale
  (None: D**-0.5; MLA passes its own). With `ctx.context_parallel` every
  array is sequence-sharded in its layout order and the same stages run
  through `ContextParallel.indexed_attention`. `select` replaces the
  sparse stage's flat top-k (`index_selector`: HISA's hierarchical one).
  export: also return aux["index_share"], the `SharedIndex` the layers
  reusing this selection need (IndexCache); kl_weight scales the KL.
  """
  if ctx.context_parallel is not None and select is not None:
    raise ValueError(
      "context_parallel: HISA's hierarchical top-k (hisa_block_size) does "
      "not run on a sharded sequence; use the flat top-k (hisa_block_size="
      "None) or context=1."
    )
  if ctx.context_parallel is not None and export:
    raise ValueError(
      "context_parallel: top-k reuse across layers (indexer_layers / "
      "indexer_every) does not run on a sharded sequence."
    )
  if ctx.context_parallel is not None:
    o, idx, kl = ctx.context_parallel.indexed_attention(
      q,
      k,
      v,
      q_idx,
      k_idx,
      weights,
      mode=ctx.mode,
      top_k=top_k,
      scale=scale,
      implementation=implementation,
      topk_block_sizes=topk_block_sizes,
      attention_block_sizes=attention_block_sizes,
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
    )
    attended = None if idx is None else idx >= 0
    # kl_weight is 1 here: sharing across layers is refused above.
    return o, counts_aux(
      attended, ctx.positions, k.shape[1], ctx.kv_lengths, kl
    )
  idx = None
  if ctx.mode == "sparse":
    if select is None:
      select = functools.partial(
        lightning_topk,
        implementation=implementation,
        block_sizes=topk_block_sizes,
      )
    idx = select(
      q_idx,
      k_idx,
      weights,
      top_k,
      q_offset=ctx.q_offset,
      kv_lengths=ctx.kv_lengths,
    )
  o, aux = stage_attention(
    q,
    k,
    v,
    q_idx,
    k_idx,
    weights,
    idx,
    ctx,
    scale=scale,
    implementation=implementation,
    attention_block_sizes=attention_block_sizes,
    kl_weight=kl_weight,
  )
  if export:
    cast(dict, aux)["index_share"] = SharedIndex(q_idx, k_idx, weights, idx)
  return o, aux


def stage_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  indices: jax.Array | None,
  ctx: Context,
  *,
  scale: float | None = None,
  implementation: str | None = None,
  attention_block_sizes: Any = None,
  with_kl: bool = True,
  kl_weight: float = 1.0,
) -> tuple[jax.Array, Aux]:
  """The attention and indexer KL of one DSA stage, given the selection.

  indices int32[B, T, K] (the sparse stage): gathered attention over them
  and the sparse KL; None: dense attention, and in "warmup" the dense KL.
  No KL while decoding or without `with_kl`; it is scaled by kl_weight.
  The indexer inputs may be another layer's (IndexCache's shared layers).
  """
  kl = None
  train = with_kl and not ctx.decoding
  if indices is not None:
    o = gathered_attention(
      q,
      k,
      v,
      indices,
      scale=scale,
      implementation=implementation,
      block_sizes=attention_block_sizes,
    )
    if train:
      kl = sparse_indexer_kl(q, k, q_idx, k_idx, weights, indices, scale=scale)
    attended = indices >= 0
  else:
    o = dense_attention(
      q, k, v, q_offset=ctx.q_offset, kv_lengths=ctx.kv_lengths, scale=scale
    )
    if ctx.mode == "warmup" and train:
      kl = dense_indexer_kl(
        q, k, q_idx, k_idx, weights, kv_lengths=ctx.kv_lengths, scale=scale
      )
    attended = None  # dense: every visible pair
  if kl is not None and kl_weight != 1.0:
    kl = kl * kl_weight
  return o, counts_aux(attended, ctx.positions, k.shape[1], ctx.kv_lengths, kl)


def shared_indexed_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  ctx: Context,
  *,
  scale: float | None = None,
  implementation: str | None = None,
  attention_block_sizes: Any = None,
  distill: bool = True,
  kl_weight: float = 1.0,
  layer: str = "this layer",
) -> tuple[jax.Array, Aux]:
  """A reusing layer's attention (IndexCache): (o [B, T, H, Dv], aux).

  "sparse": gathered attention over the keys `ctx.shared` (the nearest
  preceding full layer's `SharedIndex`) selected, and with `distill` this
  layer's sparse KL against that layer's indexer; "warmup": dense attention
  and the dense KL against it; "dense": dense attention. The KL (times
  kl_weight) trains the full layer's indexer only.
  """
  s = ctx.shared
  if s is None:
    raise ValueError(
      f"{layer} reuses the top-k of an earlier full DSA layer (IndexCache) "
      "and needs its SharedIndex (shared=): run it inside the Transformer, "
      "or pass the full layer's aux['index_share']."
    )
  if ctx.context_parallel is not None:
    raise ValueError(
      "context_parallel: top-k reuse across layers (indexer_layers / "
      "indexer_every) does not run on a sharded sequence."
    )
  if ctx.mode == "sparse" and s.indices is None:
    raise ValueError(
      f"{layer} runs the sparse stage but the full layer it reuses "
      "exported no selection (it ran in another mode)."
    )
  return stage_attention(
    q,
    k,
    v,
    s.q_idx,
    s.k_idx,
    s.weights,
    s.indices if ctx.mode == "sparse" else None,
    ctx,
    scale=scale,
    implementation=implementation,
    attention_block_sizes=attention_block_sizes,
    with_kl=distill,
    kl_weight=kl_weight,
  )


@struct.dataclass
class DSACache(KVCache):
  """K/V cache + the indexer key cache.

  k_idx [B, S_max, DI]: indexer keys (LayerNorm + RoPE applied) stored in
  float32, bfloat16 or float8_e4m3fn; k_idx_scale f32[B, S_max]: the
  per-token dequantisation scale (float8 only, else None).
  """

  k_idx: jax.Array
  k_idx_scale: jax.Array | None = None

  axes: ClassVar[dict[str, tuple[str, ...]]] = {
    **KVCache.axes,
    "k_idx": ("batch", "length", "indexer_dim"),
    "k_idx_scale": ("batch", "length"),
  }


class DSAAttention(AttentionLayer):
  """DeepSeek Sparse Attention: attention over each query's top-k keys.

  The indexer reads a stop-gradient copy of x (`detach_indexer_input`), so
  its KL loss never reaches the trunk, and it receives no gradient from the
  LM loss because all it passes on is an integer selection.
  """

  supports_context_parallel = True

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    top_k: int,
    indexer_heads: int = DSAParams.indexer_heads,
    indexer_dim: int = DSAParams.indexer_dim,
    indexer_rope_dim: int | None = DSAParams.indexer_rope_dim,
    detach_indexer_input: bool = DSAParams.detach_indexer_input,
    indexer_precision: str = DSAParams.indexer_precision,
    indexer_scale_fmt: str | None = DSAParams.indexer_scale_fmt,
    indexer_rope_interleaved: bool = DSAParams.indexer_rope_interleaved,
    hisa_block_size: int | None = DSAParams.hisa_block_size,
    hisa_blocks: int = DSAParams.hisa_blocks,
    indexer_layers: tuple[int, ...] | None = DSAParams.indexer_layers,
    indexer_every: int = DSAParams.indexer_every,
    index_share_distill: bool = DSAParams.index_share_distill,
    rope_base: float = 10000.0,
    rope_scaling: Any = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    **kw: Any,
  ):
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      rope_base=rope_base,
      rope_scaling=rope_scaling,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      **kw,
    )
    self.dsa = DSAParams(  # validates
      top_k=top_k,
      indexer_heads=indexer_heads,
      indexer_dim=indexer_dim,
      indexer_rope_dim=indexer_rope_dim,
      detach_indexer_input=detach_indexer_input,
      indexer_precision=indexer_precision,
      indexer_scale_fmt=indexer_scale_fmt,
      indexer_rope_interleaved=indexer_rope_interleaved,
      hisa_block_size=hisa_block_size,
      hisa_blocks=hisa_blocks,
      indexer_layers=indexer_layers,
      indexer_every=indexer_every,
      index_share_distill=index_share_distill,
    )
    self.top_k = top_k
    self.detach_indexer_input = detach_indexer_input
    self.index_role = index_role(self.dsa, self.layer_index)
    # None for a layer that reuses an earlier one's top-k (IndexCache).
    self.indexer = nnx.data(
      build_indexer(
        embed_dim,
        self.dsa,
        rope_dim=indexer_rope_dim,
        rope_base=rope_base,
        rope_scaling=self.rope_scaling,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      if self.index_role == "full"
      else None
    )

  #: The size of this layer's IndexCache group (set by the Transformer).
  index_group_size: int = 1

  def index(
    self, x: jax.Array, positions: jax.Array, *, return_key_codes: bool = False
  ) -> Any:
    """Indexer inputs (q_idx [B,T,HI,DI], k_idx [B,T,DI], weights [B,T,HI])
    (+ the FP8 key codes, see `LightningIndexer`)."""
    check_has_indexer(self)
    assert self.indexer is not None
    if self.detach_indexer_input:
      x = jax.lax.stop_gradient(x)
    return self.indexer(x, positions, return_key_codes=return_key_codes)

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> DSACache | KVCache:
    kv = super().init_cache(batch_size, max_len, dtype=dtype)
    if self.indexer is None:  # IndexCache: no indexer, no indexer cache
      return kv
    k_idx, scale = index_key_cache(
      batch_size, max_len, self.indexer.head_dim, index_dtype
    )
    return DSACache(k=kv.k, v=kv.v, k_idx=k_idx, k_idx_scale=scale)

  def attend(self, q, k, v, ctx: Context):
    if self.index_role == "shared":
      o, aux = shared_indexed_attention(
        q,
        k,
        v,
        ctx,
        implementation=self.implementation,
        attention_block_sizes=self.attention_block_sizes,
        **share_options(self),
      )
      return o, aux, ctx.cache
    q_idx, k_idx, w, cache = step_indexer_inputs(self, ctx)
    o, aux = indexed_attention(
      q,
      k,
      v,
      q_idx,
      k_idx,
      w,
      ctx,
      top_k=self.top_k,
      implementation=self.implementation,
      topk_block_sizes=self.topk_block_sizes,
      attention_block_sizes=self.attention_block_sizes,
      select=index_selector(self.dsa),
      export=sharing(self.dsa),
      kl_weight=share_options(self)["kl_weight"],
    )
    return o, aux, cache


def keys_per_query(seq_len: int, params: DSAParams, **_: Any) -> np.ndarray:
  if params.hisa_block_size is not None:
    return hisa.hisa_keys_per_query(
      seq_len,
      top_k=params.top_k,
      block_size=params.hisa_block_size,
      num_blocks=params.hisa_blocks,
    )
  i = np.arange(seq_len, dtype=np.float64)
  return np.minimum(params.top_k, i + 1)


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: Any,
  *,
  q_idx: jax.Array,
  k_idx: jax.Array,
  weights: jax.Array,
  q_offset=None,
  kv_lengths=None,
  implementation=None,
  scale: float | None = None,
  **_: Any,
) -> jax.Array:
  """DSA's pure form: `dsa_attention` at params.top_k (DSAParams, or any
  params with a top_k: DSA on MLA's; with a hisa_block_size set,
  `hisa_attention`); scale None is D**-0.5."""
  if getattr(params, "hisa_block_size", None) is not None:
    return hisa.hisa_attention(
      q,
      k,
      v,
      q_idx,
      k_idx,
      weights,
      top_k=params.top_k,
      block_size=params.hisa_block_size,
      num_blocks=params.hisa_blocks,
      q_offset=q_offset,
      kv_lengths=kv_lengths,
      scale=scale,
      implementation=implementation,
    )
  return dsa_attention(
    q,
    k,
    v,
    q_idx,
    k_idx,
    weights,
    top_k=params.top_k,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    scale=scale,
    implementation=implementation,
  )


#: The DSA parameters that are ModelConfig fields of their own.
INDEXER_CONFIG_FIELDS = (
  "top_k",
  "indexer_heads",
  "indexer_dim",
  "indexer_rope_dim",
)


def dsa_kind(name: str, layer: type, params: type, reference: str):
  """The spec of DSA or of a DSA variant with DSA's pure form and budget
  (a `DSAAttention` subclass whose params extend `DSAParams`)."""
  return AttentionKind(
    name=name,
    layer=layer,
    params=params,
    keys_per_query=keys_per_query,
    attention=attention,
    budget_param="top_k",
    has_indexer=True,
    config_fields=INDEXER_CONFIG_FIELDS,
    reference=reference,
  )


KIND = dsa_kind("dsa", DSAAttention, DSAParams, "DeepSeek-V3.2-Exp, 2025")
