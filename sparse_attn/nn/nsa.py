"""Native Sparse Attention layer (Yuan et al. 2025): compressed + selected +
window branches, each with its own K/V, mixed by an MLP + sigmoid gate."""

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
  nsa_attention,
  nsa_keys_per_query,
)
from sparse_attn.nn.base import AttentionLayer, Context
from sparse_attn.nn.kind import AttentionKind, pure_form
from sparse_attn.nn.params import param

COMPRESSIONS = ("mean", "mlp")


@dataclasses.dataclass(frozen=True)
class NSAParams:
  """Block sizes of the three branches, the compressor and the gate.

  cmp_block l / cmp_stride d: compression windows; select_block l' and
  num_selected n: selected blocks, of which the first num_initial and the
  num_local most recent are always kept; window w: the sliding branch.
  compress: "mlp" (the paper's phi: a learned MLP, hidden size mlp_hidden
  (default 2 * head_dim), over the block plus an intra-block position
  embedding) or "mean" (mean-pooling, no parameters). gate_hidden: hidden
  size of the gate MLP (default embed_dim // 4). independent_kv: separate
  K/V projections per branch (the paper); False shares one K/V.

  These defaults are CPU-sized; the paper's (l=32, d=16, l'=64, n=16,
  w=512) are the pure function's (`kinds.nsa.nsa_attention`).
  """

  cmp_block: int = 16
  cmp_stride: int = 8
  select_block: int = 16
  num_selected: int = 4
  window: int = 32
  compress: str = "mlp"
  mlp_hidden: int | None = None
  num_initial: int = 1
  num_local: int = 2
  gate_hidden: int | None = None
  independent_kv: bool = True

  def __post_init__(self):
    check_nsa_sizes(
      self.cmp_block,
      self.cmp_stride,
      self.select_block,
      self.num_selected,
      self.window,
      self.num_initial,
      self.num_local,
    )
    if self.compress not in COMPRESSIONS:
      raise ValueError(
        f"compress must be one of {COMPRESSIONS}, got {self.compress!r}."
      )
    for name in ("mlp_hidden", "gate_hidden"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(
          f"{name} must be a positive int or None, got {value!r}."
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
  kv_compressed: tuple[jax.Array, jax.Array] | None = None,
  kv_window: tuple[jax.Array, jax.Array] | None = None,
  q_offset=None,
  kv_lengths=None,
  implementation=None,
  block_sizes=None,
  **_: Any,
) -> tuple[jax.Array, jax.Array]:
  """(o [B, T, H, Dv], keys per query f32[B, T]) of NSA.

  k, v: the selected branch's keys/values (and the others' unless
  kv_compressed / kv_window give theirs). gates [B, T, H, 3] default to
  ones; compress_k / compress_v default to mean pooling (the layer passes
  its learned phi for "mlp").
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
    num_initial=params.num_initial,
    num_local=params.num_local,
    compress_k=compress_k,
    compress_v=compress_v,
    kv_compressed=kv_compressed,
    kv_window=kv_window,
    q_offset=q_offset,
    kv_lengths=kv_lengths,
    implementation=implementation,
    block_sizes=block_sizes,
    return_counts=True,
  )


class NSAAttention(AttentionLayer):
  """Native Sparse Attention: compressed + selected + window, gated.

  Keys and values: with independent_kv (default, the paper's sec. 3.3.3)
  `wk` / `wv` are [E, 3G, D], group-major: kv head 3g + b is branch b
  (compressed, selected, window) of group g, so a tensor-parallel split of
  the kv heads keeps each group's three branches with its query heads; the
  cache holds them as one [B, S, 3G, D] pair (a dense checkpoint fills each
  branch with its K/V: `dense_copies`). Gates g[B, T, H, 3] = sigmoid(MLP(x)) (eq. 5:
  "derived from input features via an MLP and sigmoid activation"; one
  hidden layer of gate_hidden, GELU). Compression "mlp" is phi of eq. 7:
  an MLP over the flattened block plus an intra-block position embedding,
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
    num_initial: int = NSAParams.num_initial,
    num_local: int = NSAParams.num_local,
    gate_hidden: int | None = NSAParams.gate_hidden,
    independent_kv: bool = NSAParams.independent_kv,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
    **kw: Any,
  ):
    # Set before the base constructor: init_projections reads it.
    self.params = p = NSAParams(
      cmp_block=cmp_block,
      cmp_stride=cmp_stride,
      select_block=select_block,
      num_selected=num_selected,
      window=window,
      compress=compress,
      mlp_hidden=mlp_hidden,
      num_initial=num_initial,
      num_local=num_local,
      gate_hidden=gate_hidden,
      independent_kv=independent_kv,
    )
    super().__init__(
      embed_dim,
      num_heads,
      num_kv_heads,
      head_dim,
      rngs=rngs,
      param_dtype=param_dtype,
      **kw,
    )
    hidden = p.gate_hidden or max(embed_dim // 4, 1)
    self.w_gate1 = param(
      rngs, (embed_dim, hidden), ("embed", "mlp"), param_dtype
    )
    self.w_gate2 = param(
      rngs,
      (hidden, num_heads, 3),
      ("mlp", "heads", "nsa_branches"),
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

  @property
  def kv_slots(self) -> int:
    """3G with independent_kv (one G per branch), else G: the K/V heads of
    the projections and the cache."""
    return self.num_kv_heads * (3 if self.params.independent_kv else 1)

  def compressor(self, name: str):
    """phi of eq. 7 for keys ("k") or values ("v"), or None ("mean": the
    pure function mean-pools).

    Returns fn(windows [B, N, G, l, D]) -> [B, N, G, D] for compress="mlp".
    """
    if self.params.compress != "mlp":
      return None
    pos = getattr(self, f"cmp_pos_{name}")[...].astype(self.dtype)
    w1 = getattr(self, f"cmp_w1_{name}")[...].astype(self.dtype)
    w2 = getattr(self, f"cmp_w2_{name}")[...].astype(self.dtype)

    def fn(windows):  # [B, N, G, l, D]
      flat = (windows + pos).reshape(*windows.shape[:3], -1)
      return jax.nn.gelu(flat @ w1) @ w2

    return fn

  def gates(self, x: jax.Array) -> jax.Array:
    """Branch gates f32[B, T, H, 3] = sigmoid(MLP(x))."""
    x = x.astype(self.dtype)
    h = jax.nn.gelu(x @ self.w_gate1[...].astype(self.dtype))
    g = jnp.einsum("btf,fhc->bthc", h, self.w_gate2[...].astype(self.dtype))
    return jax.nn.sigmoid(g)

  def attention_inputs(self, ctx: Context) -> dict[str, Any]:
    return {
      "gates": self.gates(ctx.x),
      "compress_k": self.compressor("k"),
      "compress_v": self.compressor("v"),
    }

  def attention_kv(self, k, v):
    if not self.params.independent_kv:
      return k, v, {}
    # k, v [B, S, 3G, D], group-major: branch b of group g is head 3g + b.
    g = self.num_kv_heads

    def split(a):
      return [a.reshape(*a.shape[:2], g, 3, -1)[..., b, :] for b in range(3)]

    (kc, ks, kw), (vc, vs, vw) = split(k), split(v)
    return ks, vs, {"kv_compressed": (kc, vc), "kv_window": (kw, vw)}


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
  dense_copies=("wk", "wv", "bk", "bv"),
)
