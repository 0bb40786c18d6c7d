"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3): low-rank q and kv latents.

Projections (DeepSeek's names; Dn = qk_nope_head_dim, Dr = qk_rope_head_dim,
Dv = v_head_dim, Rq = q_lora_rank, R = kv_lora_rank):

    q path:   c_q = RMSNorm(x @ wq_a) [B, T, Rq];  q = c_q @ wq_b [B, T, H, Dn+Dr]
              (or q = x @ wq when q_lora_rank is None)
    kv path:  [c_kv ; k_pe] = x @ wkv_a [B, T, R + Dr];  c_kv = RMSNorm(c_kv)
              k_nope = c_kv @ w_uk [B, S, H, Dn];  v = c_kv @ w_uv [B, S, H, Dv]
    RoPE:     decoupled, on q's last Dr dims and on the shared k_pe, in
              DeepSeek's interleaved layout (pairs 2i, 2i+1)
    scale:    (Dn + Dr) ** -0.5, times mscale**2 under YaRN with
              mscale_all_dim (`RopeScaling.softmax_mscale`)

(HF's kv_b_proj is [w_uk ; w_uv] per head, split here so the absorbed form
can fold them.)

Two execution forms give the same attention:
  - "mha": per-head keys [k_nope ; k_pe] and values, H kv heads (the cheap
    form for dense training and prefill: D = Dn + Dr);
  - "absorbed": W_UK folded into the query, q_abs = [q_nope @ w_uk^T ; q_pe]
    [B, T, H, R + Dr], one kv head whose key is the latent [c_kv ; k_pe]
    [B, S, 1, R + Dr] and whose value is c_kv [B, S, 1, R]; W_UV applied
    to the [B, T, H, R] output. Keys are R + Dr wide (576 at DeepSeek-V3's
    sizes), values R (512): MQA, which is what the gathered-attention
    kernels run for DSA, and what decoding reads from the latent cache.
`form="auto"` picks "absorbed" for the sparse stage and single-token decode
steps, "mha" otherwise.

The cache holds per token only the latent [c_kv ; k_pe] (R + Dr values,
`MLACache`), never per-head K/V.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sparse_attn.nn import dense
from sparse_attn.nn.base import AttentionLayer, Context, counts_aux, write_rows
from sparse_attn.nn.kind import AttentionKind
from sparse_attn.nn.norm import RMSNorm
from sparse_attn.nn.params import param
from sparse_attn.ops import checks
from sparse_attn.ops.attention import dense_attention

FORMS = ("auto", "mha", "absorbed")


@dataclasses.dataclass(frozen=True)
class MLAParams:
  """MLA's sizes (defaults sized for a CPU; DeepSeek-V3: 1536, 512, 128,
  64, 128).

  q_lora_rank: Rq, or None for a single wq (no query latent).
  kv_lora_rank: R, the kv latent (what the cache stores, + Dr).
  qk_nope_head_dim / qk_rope_head_dim / v_head_dim: Dn / Dr / Dv.
  form: "auto", "mha" or "absorbed" (see the module docstring).
  latent_norm_eps: eps of the q and kv latent RMSNorms (1e-6 in DeepSeek's
  code and HF's, whatever the model's rms_norm_eps).
  """

  q_lora_rank: int | None = 48
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 16
  qk_rope_head_dim: int = 8
  v_head_dim: int = 16
  form: str = "auto"
  latent_norm_eps: float = 1e-6

  def __post_init__(self):
    check_mla_params(self)


def check_mla_params(p: Any) -> None:
  """Validates the MLA fields of a params dataclass."""
  if p.q_lora_rank is not None:
    checks.check_positive_int("q_lora_rank", p.q_lora_rank)
  for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
    checks.check_positive_int(name, getattr(p, name))
  checks.check_positive_int("qk_rope_head_dim", p.qk_rope_head_dim)
  if p.qk_rope_head_dim % 2:
    raise ValueError(
      f"qk_rope_head_dim must be even (RoPE pairs), got {p.qk_rope_head_dim}."
    )
  if p.form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {p.form!r}.")
  if not p.latent_norm_eps > 0:
    raise ValueError(f"latent_norm_eps must be > 0, got {p.latent_norm_eps!r}.")


@struct.dataclass
class MLACache:
  """The latent cache: kv [B, S_max, R + Dr] = [c_kv (normed) ; k_pe (RoPE-d)]."""

  kv: jax.Array

  axes: ClassVar[dict[str, tuple[str, ...]]] = {
    "kv": ("batch", "length", "kv_latent"),
  }


@dataclasses.dataclass(frozen=True)
class Forms:
  """q, k, v of one execution form + the map of its output to [B, T, H, Dv]."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  finish: Callable[[jax.Array], jax.Array]


class MLAAttention(AttentionLayer):
  """Multi-head Latent Attention, dense (DeepSeek-V2/V3).

  Constructed like every kind, layer(E, H, G, D, **MLAParams fields, ...);
  G and D are ignored (MLA's heads are H in the MHA form, 1 in the absorbed
  form; its head dims are the params). `project` returns q [B, T, H,
  Dn+Dr] (RoPE-d), the latent [B, T, 1, R+Dr] as k and c_kv [B, T, 1, R]
  (its first R dims: the absorbed form's values) as v; `attend` sees them
  for all S keys (from the cache when decoding).
  """

  supports_context_parallel = True

  projection_options = False

  def __init__(
    self,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    q_lora_rank: int | None = MLAParams.q_lora_rank,
    kv_lora_rank: int = MLAParams.kv_lora_rank,
    qk_nope_head_dim: int = MLAParams.qk_nope_head_dim,
    qk_rope_head_dim: int = MLAParams.qk_rope_head_dim,
    v_head_dim: int = MLAParams.v_head_dim,
    form: str = MLAParams.form,
    latent_norm_eps: float = MLAParams.latent_norm_eps,
    **kw: Any,
  ):
    del num_kv_heads, head_dim  # MLA's head dims are its own
    self.mla = MLAParams(
      q_lora_rank=q_lora_rank,
      kv_lora_rank=kv_lora_rank,
      qk_nope_head_dim=qk_nope_head_dim,
      qk_rope_head_dim=qk_rope_head_dim,
      v_head_dim=v_head_dim,
      form=form,
      latent_norm_eps=latent_norm_eps,
    )
    super().__init__(
      embed_dim,
      num_heads,
      num_heads,
      qk_nope_head_dim + qk_rope_head_dim,
      **kw,
    )
    mscale = (
      1.0 if self.rope_scaling is None else (self.rope_scaling.softmax_mscale())
    )
    self.scale = float(self.head_dim**-0.5 * mscale)

  def init_projections(self, rngs: nnx.Rngs, param_dtype: Any) -> None:
    m, e, h = self.mla, self.embed_dim, self.num_heads
    dq = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank is None:
      self.wq = param(
        rngs, (e, h, dq), ("embed", "heads", "head_dim"), param_dtype
      )
    else:
      self.wq_a = param(
        rngs, (e, m.q_lora_rank), ("embed", "q_latent"), param_dtype
      )
      self.q_norm = RMSNorm(
        m.q_lora_rank,
        eps=m.latent_norm_eps,
        param_dtype=param_dtype,
        axis_name="q_latent",
      )
      self.wq_b = param(
        rngs,
        (m.q_lora_rank, h, dq),
        ("q_latent", "heads", "head_dim"),
        param_dtype,
      )
    self.wkv_a = param(
      rngs,
      (e, m.kv_lora_rank + m.qk_rope_head_dim),
      ("embed", "kv_latent"),
      param_dtype,
    )
    self.kv_norm = RMSNorm(
      m.kv_lora_rank,
      eps=m.latent_norm_eps,
      param_dtype=param_dtype,
      axis_name="kv_latent",
    )
    self.w_uk = param(
      rngs,
      (m.kv_lora_rank, h, m.qk_nope_head_dim),
      ("kv_latent", "heads", "head_dim"),
      param_dtype,
    )
    self.w_uv = param(
      rngs,
      (m.kv_lora_rank, h, m.v_head_dim),
      ("kv_latent", "heads", "head_dim"),
      param_dtype,
    )
    self.wo = param(
      rngs, (h, m.v_head_dim, e), ("heads", "head_dim", "embed"), param_dtype
    )

  # -- projections -----------------------------------------------------------

  def weight(self, name: str) -> jax.Array:
    return getattr(self, name)[...].astype(self.dtype)

  def query_latent(self, x: jax.Array) -> jax.Array | None:
    """c_q = RMSNorm(x @ wq_a) [B, T, Rq] (None without a q latent)."""
    if self.mla.q_lora_rank is None:
      return None
    x = x.astype(self.dtype)
    return self.q_norm(jnp.einsum("bte,el->btl", x, self.weight("wq_a")))

  def project(
    self, x: jax.Array, positions: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, E] -> (q [B, T, H, Dn+Dr], latent [B, T, 1, R+Dr],
    c_kv [B, T, 1, R])."""
    m = self.mla
    x = x.astype(self.dtype)
    c_q = self.query_latent(x)
    if c_q is None:
      q = jnp.einsum("bte,ehd->bthd", x, self.weight("wq"))
    else:
      q = jnp.einsum("btl,lhd->bthd", c_q, self.weight("wq_b"))
    q_nope, q_pe = jnp.split(q, [m.qk_nope_head_dim], axis=-1)
    q = jnp.concatenate(
      [q_nope, self.rope(q_pe, positions, interleaved=True)], axis=-1
    )
    kv = jnp.einsum("bte,er->btr", x, self.weight("wkv_a"))
    c_kv, k_pe = jnp.split(kv, [m.kv_lora_rank], axis=-1)
    k_pe = self.rope(k_pe[:, :, None, :], positions, interleaved=True)
    latent = jnp.concatenate([self.kv_norm(c_kv)[:, :, None, :], k_pe], -1)
    return q, latent, latent[..., : m.kv_lora_rank]

  def resolve_form(self, ctx: Context) -> str:
    """The form `attend` runs: the params' form, or auto's choice."""
    if self.mla.form != "auto":
      return self.mla.form
    if ctx.mode == "sparse" or (ctx.decoding and ctx.x.shape[1] == 1):
      return "absorbed"
    return "mha"

  def forms(self, q: jax.Array, latent: jax.Array, form: str) -> Forms:
    """q [B, T, H, Dn+Dr], latent [B, S, 1, R+Dr] -> the form's q, k, v."""
    m, h = self.mla, self.num_heads
    c_kv = latent[:, :, 0, : m.kv_lora_rank]  # [B, S, R]
    if form == "mha":
      k_nope = jnp.einsum("bsr,rhd->bshd", c_kv, self.weight("w_uk"))
      v = jnp.einsum("bsr,rhv->bshv", c_kv, self.weight("w_uv"))
      k_pe = latent[:, :, :, m.kv_lora_rank :]
      k_pe = jnp.broadcast_to(k_pe, (*k_pe.shape[:2], h, k_pe.shape[-1]))
      k = jnp.concatenate([k_nope, k_pe], axis=-1)
      return Forms(q, k, v, lambda o: o)
    if form != "absorbed":
      raise ValueError(f"form must be 'mha' or 'absorbed', got {form!r}.")
    q_nope, q_pe = jnp.split(q, [m.qk_nope_head_dim], axis=-1)
    q_abs = jnp.einsum("bthd,rhd->bthr", q_nope, self.weight("w_uk"))
    w_uv = self.weight("w_uv")
    return Forms(
      jnp.concatenate([q_abs, q_pe], axis=-1),
      latent,
      latent[..., : m.kv_lora_rank],
      lambda o: jnp.einsum("bthr,rhv->bthv", o, w_uv),
    )

  # -- cache -----------------------------------------------------------------

  def init_cache(
    self,
    batch_size: int,
    max_len: int,
    *,
    dtype: Any = None,
    index_dtype: Any = "float32",
  ) -> Any:
    del index_dtype
    dt = self.dtype if dtype is None else dtype
    width = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
    return MLACache(kv=jnp.zeros((batch_size, max_len, width), dt))

  def write_cache(self, cache, q, k, v, start):
    del q, v
    assert k is not None  # project always returns the latent
    return cache.replace(kv=write_rows(cache.kv, k[:, :, 0], start))

  def read_cache(self, cache, view: int) -> tuple[jax.Array, jax.Array]:
    latent = cache.kv[:, :view, None, :]
    return latent, latent[..., : self.mla.kv_lora_rank]

  # -- attention -------------------------------------------------------------

  def attend(self, q, k, v, ctx: Context):
    del v  # the values are the latent k's first R dims
    f = self.forms(q, k, self.resolve_form(ctx))
    if ctx.context_parallel is not None:
      o = ctx.context_parallel.dense_attention(
        f.q,
        f.k,
        f.v,
        scale=self.scale,
        q_offset=ctx.q_offset,
        kv_lengths=ctx.kv_lengths,
      )
    else:
      o = dense_attention(
        f.q,
        f.k,
        f.v,
        q_offset=ctx.q_offset,
        kv_lengths=ctx.kv_lengths,
        scale=self.scale,
      )
    aux = counts_aux(None, ctx.positions, k.shape[1], ctx.kv_lengths)
    return f.finish(o), aux, ctx.cache


def mla_scale(params: Any) -> float:
  """MLA's logit scale without RoPE scaling: (Dn + Dr) ** -0.5."""
  return (params.qk_nope_head_dim + params.qk_rope_head_dim) ** -0.5


def attention(
  q: jax.Array, k: jax.Array, v: jax.Array, params: MLAParams, **kw: Any
) -> jax.Array:
  """Dense MLA on q, k, v of either form, at MLA's scale (no YaRN mscale)."""
  return dense.attention(
    q, k, v, dense.DenseParams(), **kw, scale=mla_scale(params)
  )


KIND = AttentionKind(
  name="mla",
  layer=MLAAttention,
  params=MLAParams,
  keys_per_query=dense.keys_per_query,  # ignores its params
  attention=attention,
  projections="mla",
  reference="DeepSeek-V2 (MLA), 2024",
)
