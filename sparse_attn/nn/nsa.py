"""Native Sparse Attention layer (Yuan et al. 2025): compressed + selected + window."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attn.kinds.nsa import (
  check_nsa_sizes,
  mean_compress,
  nsa_attention,
  nsa_keys_per_query,
)
from sparse_attn.nn.base import AttentionLayer, Context
from sparse_attn.nn.kind import AttentionKind, pure_form
from sparse_attn.nn.params import param

COMPRESSIONS = ("mean", "mlp")


@dataclasses.dataclass(frozen=True)
class NSAParams:
  """Block sizes of the three branches and the compressor.

  cmp_block l / cmp_stride d: compression windows; select_block l' and
  num_selected n: selected blocks; window w: the sliding branch. compress:
  "mean" pools each block, "mlp" adds a learned MLP (hidden size
  mlp_hidden, default 2 * head_dim) with intra-block positions to the mean.
  """

  cmp_block: int = 16
  cmp_stride: int = 8
  select_block: int = 16
  num_selected: int = 4
  window: int = 32
  compress: str = "mean"
  mlp_hidden: int | None = None

  def __post_init__(self):
    check_nsa_sizes(
      self.cmp_block,
      self.cmp_stride,
      self.select_block,
      self.num_selected,
      self.window,
    )
    if self.compress not in COMPRESSIONS:
      raise ValueError(
        f"compress must be one of {COMPRESSIONS}, got {self.compress!r}."
      )


def counted_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  params: NSAParams,
  *,
  gates: jax.Array | None = None,
  compress_k: Callable | None = None,
  compress_v: Callable | None = None,
  q_offset=None,
  kv_lengths=None,
  implementation=None,
  block_sizes=None,
  **_: Any,
) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, H, Dv], keys per query f32[B, T]) of NSA.

  gates [B, T, H, 3] default to ones; compress_k / compress_v default to
  mean pooling (the layer passes its learned compressors for "mlp").
  """
  if gates is None:
    gates = jnp.ones(q.shape[:3] + (3,), q.dtype)
  return nsa_attention(
    q,
    k,
    v,
    gates,
    cmp_block=params.cmp_block,
    cmp_stride=params.cmp_stride,
    select_block=params.select_block,
    num_selected=params.num_selected,
    window=params.window,
    compress_k=compress_k,
    compress_v=compress_v,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    implementation=implementation,
    block_sizes=block_sizes,
    return_counts=True,
  )


class NSAAttention(AttentionLayer):
  """Native Sparse Attention: compressed + selected + window, sigmoid-gated.

  Gates g[B, T, H, 3] = sigmoid(x @ w_gate). Compression "mean" mean-pools
  each block; "mlp" adds a learned MLP over the flattened block (with an
  intra-block position embedding) to the mean: summary = mean + MLP(block),
  separately for keys and values, shared by the kv heads.
  """

  counted_attention = staticmethod(counted_attention)

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    cmp_block: int = NSAParams.cmp_block,
    cmp_stride: int = NSAParams.cmp_stride,
    select_block: int = NSAParams.select_block,
    num_selected: int = NSAParams.num_selected,
    window: int = NSAParams.window,
    compress: str = NSAParams.compress,
    mlp_hidden: int | None = NSAParams.mlp_hidden,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
    **kw: Any,
  ):
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      rngs=rngs,
      param_dtype=param_dtype,
      **kw,
    )
    self.params = p = NSAParams(
      cmp_block,
      cmp_stride,
      select_block,
      num_selected,
      window,
      compress,
      mlp_hidden,
    )
    self.w_gate = param(
      rngs,
      (embed_dim, num_heads, 3),
      ("embed", "heads", "nsa_branches"),
      param_dtype,
    )
    if p.compress == "mlp":
      hidden = p.mlp_hidden or 2 * head_dim
      l, d = p.cmp_block, head_dim
      zeros = nnx.initializers.zeros_init()
      for name in ("k", "v"):
        setattr(
          self,
          f"cmp_pos_{name}",
          param(
            rngs, (l, d), ("nsa_block", "head_dim"), param_dtype, init=zeros
          ),
        )
        setattr(
          self,
          f"cmp_w1_{name}",
          param(rngs, (l * d, hidden), ("nsa_block_dim", "mlp"), param_dtype),
        )
        setattr(
          self,
          f"cmp_w2_{name}",
          param(rngs, (hidden, d), ("mlp", "head_dim"), param_dtype),
        )

  def compressor(self, name: str):
    """The learned block compressor of keys ("k") or values ("v"), or None.

    Returns fn(windows [B, N, G, l, D]) -> [B, N, G, D] for compress="mlp"
    (None for "mean": the pure function mean-pools).
    """
    if self.params.compress != "mlp":
      return None
    pos = getattr(self, f"cmp_pos_{name}")[...].astype(self.dtype)
    w1 = getattr(self, f"cmp_w1_{name}")[...].astype(self.dtype)
    w2 = getattr(self, f"cmp_w2_{name}")[...].astype(self.dtype)

    def fn(windows):  # [B, N, G, l, D]
      flat = (windows + pos).reshape(*windows.shape[:3], -1)
      return mean_compress(windows) + jax.nn.gelu(flat @ w1) @ w2

    return fn

  def gates(self, x: jax.Array) -> jax.Array:
    """Branch gates f32[B, T, H, 3] = sigmoid(x @ w_gate)."""
    g = jnp.einsum(
      "bte,ehc->bthc", x.astype(self.dtype), self.w_gate[...].astype(self.dtype)
    )
    return jax.nn.sigmoid(g)

  def attention_inputs(self, ctx: Context) -> dict[str, Any]:
    return {
      "gates": self.gates(ctx.x),
      "compress_k": self.compressor("k"),
      "compress_v": self.compressor("v"),
    }


def keys_per_query(seq_len: int, params: NSAParams, **_: Any) -> np.ndarray:
  return nsa_keys_per_query(
    seq_len,
    cmp_block=params.cmp_block,
    cmp_stride=params.cmp_stride,
    select_block=params.select_block,
    num_selected=params.num_selected,
    window=params.window,
  )


KIND = AttentionKind(
  name="nsa",
  layer=NSAAttention,
  params=NSAParams,
  keys_per_query=keys_per_query,
  attention=pure_form(counted_attention),
  budget_param="num_selected",
  reference="Yuan et al. 2025 (NSA)",
)
