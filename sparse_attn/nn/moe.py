"""DeepSeek's mixture of experts: sigmoid router with a correction bias,
group-limited top-k, normalised weights x routed_scaling_factor, shared
experts (DeepSeek-V3; HF's `DeepseekV32MoE`).

Routing, per token (x in f32):
    s = sigmoid(x @ W_router)                        [NE] (or softmax)
    c = s + e_score_correction_bias                  (selection only)
    groups: c viewed [G, NE/G]; a group's score = sum of its top-2 c;
    keep the top `groups_per_token` groups, mask the other experts' c
    experts: top `experts_per_token` of the masked c
    weights = s at those experts, / their sum (norm_topk_prob),
              x routed_scaling_factor
    y = sum_k weights_k * expert_k(x) + shared(x)
Each expert and the shared block is a SwiGLU. The dispatch is plain: every
expert runs on every token and unselected experts get weight 0 (exact, and
cheap at the sizes this library trains on a CPU; expert weights carry the
logical axis "experts", which the mesh splits over "tensor").

The correction bias only changes which experts are selected, so it gets no
gradient; DeepSeek adjusts it between steps by the load-balancing rule of
its report (not implemented here: it stays as loaded or initialised).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn.nn.mlp import SwiGLU
from sparse_attn.nn.params import param
from sparse_attn.ops import checks

SCORE_FUNCS = ("sigmoid", "softmax")


@dataclasses.dataclass(frozen=True)
class MoEParams:
  """The MoE fields of a model (HF DeepseekV32Config names in brackets).

  num_experts [n_routed_experts], experts_per_token [num_experts_per_tok],
  expert_dim [moe_intermediate_size], num_shared_experts [n_shared_experts],
  num_groups [n_group], groups_per_token [topk_group],
  routed_scaling_factor, norm_topk_prob, score_func ("sigmoid" in V3/V3.2),
  first_dense_layers [first_k_dense_replace]: the first layers keep a dense
  SwiGLU of the model's mlp_dim.
  """

  num_experts: int = 8
  experts_per_token: int = 2
  expert_dim: int = 64
  num_shared_experts: int = 1
  num_groups: int = 1
  groups_per_token: int = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = True
  score_func: str = "sigmoid"
  first_dense_layers: int = 1

  def __post_init__(self):
    for name in (
      "num_experts",
      "experts_per_token",
      "expert_dim",
      "num_groups",
      "groups_per_token",
    ):
      checks.check_positive_int(name, getattr(self, name))
    for name in ("num_shared_experts", "first_dense_layers"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}.")
    if self.num_experts % self.num_groups:
      raise ValueError(
        f"num_experts={self.num_experts} must be divisible by "
        f"num_groups={self.num_groups}."
      )
    per_group = self.num_experts // self.num_groups
    if self.num_groups > 1 and per_group < 2:
      raise ValueError(
        f"group scores sum each group's top-2 experts: num_experts / "
        f"num_groups must be >= 2, got {per_group}."
      )
    if self.groups_per_token > self.num_groups:
      raise ValueError(
        f"groups_per_token={self.groups_per_token} exceeds num_groups="
        f"{self.num_groups}."
      )
    if self.experts_per_token > self.groups_per_token * per_group:
      raise ValueError(
        f"experts_per_token={self.experts_per_token} exceeds the "
        f"{self.groups_per_token * per_group} experts of the kept groups."
      )
    if self.score_func not in SCORE_FUNCS:
      raise ValueError(
        f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}."
      )
    if not self.routed_scaling_factor > 0:
      raise ValueError(
        f"routed_scaling_factor must be > 0, got "
        f"{self.routed_scaling_factor!r}."
      )


def route(
  x: jax.Array, router: jax.Array, bias: jax.Array, p: MoEParams
) -> tuple[jax.Array, jax.Array]:
  """x [N, E] -> (expert ids int32[N, K], weights f32[N, K]) (module doc)."""
  logits = jnp.einsum(
    "ne,ex->nx", x.astype(jnp.float32), router.astype(jnp.float32)
  )
  if p.score_func == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  else:
    scores = jax.nn.softmax(logits, axis=-1)
  choice = scores + bias.astype(jnp.float32)
  if p.num_groups > 1 and p.groups_per_token < p.num_groups:
    grouped = choice.reshape(choice.shape[0], p.num_groups, -1)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, keep = jax.lax.top_k(group_scores, p.groups_per_token)
    kept = jnp.any(
      keep[:, :, None] == jnp.arange(p.num_groups)[None, None, :], axis=1
    )
    grouped = jnp.where(kept[:, :, None], grouped, -jnp.inf)
    choice = grouped.reshape(choice.shape)
  _, experts = jax.lax.top_k(choice, p.experts_per_token)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if p.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return experts.astype(jnp.int32), weights * p.routed_scaling_factor


class MoE(nnx.Module):
  """DeepSeek MoE block: x [B, T, E] -> [B, T, E] (see the module doc)."""

  def __init__(
    self,
    embed_dim: int,
    params: MoEParams,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.params, self.dtype = params, dtype
    ne, e, i = params.num_experts, embed_dim, params.expert_dim
    # HF keeps the router in f32 whatever the model dtype.
    self.router = param(
      rngs,
      (e, ne),
      ("embed", "experts"),
      jnp.float32,
      init=nnx.initializers.normal(0.02),
    )
    self.router_bias = nnx.Param(
      jnp.zeros((ne,), jnp.float32), logical_axes=("experts",)
    )
    axes_in, axes_out = (
      ("experts", "embed", "expert_mlp"),
      ("experts", "expert_mlp", "embed"),
    )
    # lecun_normal per expert: fan-in is dim 1, the experts a batch axis.
    init = nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=(0,)
    )
    self.gate = param(rngs, (ne, e, i), axes_in, param_dtype, init=init)
    self.up = param(rngs, (ne, e, i), axes_in, param_dtype, init=init)
    self.down = param(rngs, (ne, i, e), axes_out, param_dtype, init=init)
    self.shared = (
      SwiGLU(
        e,
        i * params.num_shared_experts,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      if params.num_shared_experts
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, e = x.shape
    x = x.astype(self.dtype)
    experts, weights = route(
      x.reshape(-1, e), self.router[...], self.router_bias[...], self.params
    )
    # [N, NE] combine weights: the selected experts' weights, 0 elsewhere.
    combine = jnp.sum(
      jax.nn.one_hot(experts, self.params.num_experts, dtype=jnp.float32)
      * weights[..., None],
      axis=1,
    ).reshape(batch, length, -1)
    w = lambda name: getattr(self, name)[...].astype(self.dtype)
    g = jnp.einsum("bte,xei->btxi", x, w("gate"))
    u = jnp.einsum("bte,xei->btxi", x, w("up"))
    y = jnp.einsum(
      "btxi,xie,btx->bte",
      jax.nn.silu(g) * u,
      w("down"),
      combine.astype(self.dtype),
    )
    if self.shared is not None:
      y = y + self.shared(x)
    return y
