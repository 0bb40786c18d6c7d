"""DeepSeek-V3.2's attention: DSA on MLA, the indexer fed by MLA's query latent.

As DeepSeek builds it (V3.2-Exp report; its inference code; HF's
`DeepseekV32Attention`):
  - the main attention is MLA (`sparse_attn.nn.mla`); the sparse stage runs
    in MLA's absorbed MQA form, so one index set per query serves all H
    heads over one latent kv head (keys R + Dr = 576, values R = 512 at
    DeepSeek's sizes) through the same `gathered_attention` / kernels;
  - the indexer query comes from MLA's query latent c_q = RMSNorm(x @ wq_a)
    (`query_input_dim=q_lora_rank`), its key from x (LayerNorm), its head
    weights from x; partial non-interleaved RoPE on its first
    `indexer_rope_dim` dims (default: qk_rope_head_dim, DeepSeek's 64 of
    128), with the model's RoPE scaling (YaRN);
  - the indexer reads stop-gradient copies of x and of c_q, so its KL never
    reaches the trunk, wq_a or the q latent norm;
  - optionally DeepSeek's FP8 indexer (`indexer_precision="fp8"`).
Stages and losses are DSA's (`sparse_attn.nn.dsa.indexed_attention`). The
decode cache holds the latent (R + Dr per token) and the indexer keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sparse_attn.nn import dsa
from sparse_attn.nn.base import Context
from sparse_attn.nn.dsa import (
  INDEXER_CONFIG_FIELDS,
  DSAParams,
  build_indexer,
  check_has_indexer,
  check_indexer_params,
  index_key_cache,
  index_role,
  index_selector,
  indexed_attention,
  share_options,
  shared_indexed_attention,
  sharing,
  step_indexer_inputs,
)
from sparse_attn.nn.kind import AttentionKind
from sparse_attn.nn.mla import (
  MLAAttention,
  MLACache,
  MLAParams,
  check_mla_params,
  mla_scale,
)


@dataclasses.dataclass(frozen=True)
class MLADSAParams(MLAParams, DSAParams):
  """MLA's sizes + DSA's fields (see `MLAParams`, `sparse_attn.nn.dsa.DSAParams`).

  indexer_rope_dim None: qk_rope_head_dim (DeepSeek's choice).
  """

  def __post_init__(self):
    check_mla_params(self)
    check_indexer_params(self)
    rope = self.qk_rope_head_dim
    if self.indexer_rope_dim is None and rope > self.indexer_dim:
      raise ValueError(
        f"indexer_rope_dim defaults to qk_rope_head_dim={rope}, more than "
        f"indexer_dim={self.indexer_dim}: set indexer_rope_dim."
      )


@struct.dataclass
class MLADSACache(MLACache):
  """The latent cache + the indexer key cache (see `DSACache`)."""

  k_idx: jax.Array
  k_idx_scale: jax.Array | None = None

  axes: ClassVar[dict[str, tuple[str, ...]]] = {
    **MLACache.axes,
    "k_idx": ("batch", "length", "indexer_dim"),
    "k_idx_scale": ("batch", "length"),
  }


class MLADSAAttention(MLAAttention):
  """DeepSeek Sparse Attention on MLA (DeepSeek-V3.2)."""

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    top_k: int = DSAParams.top_k,
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
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    **kw: Any,
  ):
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      param_dtype=param_dtype,
      rngs=rngs,
      **kw,
    )
    m = self.mla
    self.dsa = MLADSAParams(
      **{f.name: getattr(m, f.name) for f in dataclasses.fields(m)},
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
        rope_dim=m.qk_rope_head_dim
        if indexer_rope_dim is None
        else indexer_rope_dim,
        query_input_dim=m.q_lora_rank,
        rope_base=self.rope_base,
        rope_scaling=self.rope_scaling,
        dtype=self.dtype,
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
    """Indexer inputs from x and MLA's query latent (both detached)."""
    check_has_indexer(self)
    assert self.indexer is not None
    if self.detach_indexer_input:
      x = jax.lax.stop_gradient(x)
    c_q = self.query_latent(x)
    if c_q is not None and self.detach_indexer_input:
      c_q = jax.lax.stop_gradient(c_q)  # no KL gradient into wq_a / q_norm
    return self.indexer(
      x, positions, q_latent=c_q, return_key_codes=return_key_codes
    )

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> MLADSACache | MLACache:
    latent = super().init_cache(batch_size, max_len, dtype=dtype)
    if self.indexer is None:  # IndexCache: no indexer, no indexer cache
      return latent
    k_idx, scale = index_key_cache(
      batch_size, max_len, self.indexer.head_dim, index_dtype
    )
    return MLADSACache(kv=latent.kv, k_idx=k_idx, k_idx_scale=scale)

  def attend(self, q, k, v, ctx: Context):
    del v  # the values are the latent k's first R dims
    f = self.forms(q, k, self.resolve_form(ctx))
    if self.index_role == "shared":
      o, aux = shared_indexed_attention(
        f.q,
        f.k,
        f.v,
        ctx,
        scale=self.scale,
        implementation=self.implementation,
        attention_block_sizes=self.attention_block_sizes,
        **share_options(self),
      )
      return f.finish(o), aux, ctx.cache
    q_idx, k_idx, w, cache = step_indexer_inputs(self, ctx)
    o, aux = indexed_attention(
      f.q,
      f.k,
      f.v,
      q_idx,
      k_idx,
      w,
      ctx,
      top_k=self.top_k,
      scale=self.scale,
      implementation=self.implementation,
      topk_block_sizes=self.topk_block_sizes,
      attention_block_sizes=self.attention_block_sizes,
      select=index_selector(self.dsa),
      export=sharing(self.dsa),
      kl_weight=share_options(self)["kl_weight"],
    )
    return f.finish(o), aux, cache


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, params: MLADSAParams, **kw: Any
) -> jax.Array:
  """DSA on q, k, v of either MLA form, at MLA's scale (no YaRN mscale)."""
  return dsa.attention(q, k, v, params, **kw, scale=mla_scale(params))


KIND = AttentionKind(
  name="mla_dsa",
  layer=MLADSAAttention,
  params=MLADSAParams,
  keys_per_query=dsa.keys_per_query,
  attention=attention,
  budget_param="top_k",
  has_indexer=True,
  config_fields=INDEXER_CONFIG_FIELDS,
  projections="mla",
  reference="DeepSeek-V3.2-Exp (DSA on MLA), 2025",
)
