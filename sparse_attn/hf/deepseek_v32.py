"""The `deepseek_v32` HF format: config.json fields and tensor names.

What transformers' `DeepseekV32ForCausalLM.save_pretrained` writes, and the
layout of DeepSeek's own V3.2 release (the same tensor names, per-expert
tensors, FP8 linear weights with 128 x 128 `weight_scale_inv` blocks, the
multi-token-prediction layer after the last one, `rope_scaling` instead of
`rope_parameters`). The model is this library's `Transformer` with the
"mla_dsa" kind (MLA + the lightning indexer on MLA's query latent), the
first `first_k_dense_replace` blocks with a dense SwiGLU and DeepSeek's MoE
after, unscaled embeddings.

HF names -> parameters (HF linear weights are [out, in]):
  model.embed_tokens.weight                    embed [V, E]
  lm_head.weight                               unembed [E, V]
  model.norm.weight                            final_norm.scale
  model.layers.i.input_layernorm.weight        blocks.i.attn_norm.scale
  model.layers.i.post_attention_layernorm.weight   blocks.i.mlp_norm.scale
  self_attn.q_a_proj / q_a_layernorm / q_b_proj    attn.wq_a / q_norm / wq_b
  self_attn.q_proj (no q LoRA)                 attn.wq
  self_attn.kv_a_proj_with_mqa / kv_a_layernorm    attn.wkv_a / kv_norm
  self_attn.kv_b_proj                          attn.w_uk, attn.w_uv (split)
  self_attn.o_proj                             attn.wo
  self_attn.indexer.wq_b / wk / k_norm / weights_proj
                                               attn.indexer.wq / wk / k_norm / w_weights
  mlp.gate_proj / up_proj / down_proj          mlp.gate / up / down (dense)
  mlp.gate.weight / gate.e_score_correction_bias   mlp.router / router_bias
  mlp.experts.{e}.gate_proj / up_proj / down_proj  mlp.gate / up / down [NE, ...]
    (or packed mlp.experts.gate_up_proj, mlp.experts.down_proj)
  mlp.shared_experts.*                         mlp.shared.*
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attn import registry
from sparse_attn.config import ModelConfig
from sparse_attn.hf import mapping as M
from sparse_attn.hf.fields import require, rope_from_hf, rope_to_hf
from sparse_attn.nn.mla_dsa import MLADSAParams

MODEL_TYPE = "deepseek_v32"
PROJECTIONS = "mla"
#: config.json fields load_pretrained's overrides may replace: none.
HF_OVERRIDES: tuple[str, ...] = ()
ARCHITECTURE = "DeepseekV32ForCausalLM"
KIND = "mla_dsa"
MLA_FIELDS = (
  "q_lora_rank",
  "kv_lora_rank",
  "qk_nope_head_dim",
  "qk_rope_head_dim",
  "v_head_dim",
)


#: DeepseekV32Config's defaults (transformers 5.24) of the fields a
#: config.json may leave out: a missing field means what transformers
#: would build.
HF_DEFAULTS: dict[str, Any] = {
  "q_lora_rank": 1536,
  "first_k_dense_replace": 3,
  "n_routed_experts": 256,
  "num_experts_per_tok": 8,
  "moe_intermediate_size": 2048,
  "n_shared_experts": 1,
  "n_group": 8,
  "topk_group": 4,
  "routed_scaling_factor": 2.5,
  "norm_topk_prob": True,
  "rms_norm_eps": 1e-6,
  "tie_word_embeddings": False,
  "hidden_act": "silu",
}
#: The eps of MLA's latent norms in transformers (not a config field).
LATENT_NORM_EPS = 1e-6


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """The ModelConfig of an HF deepseek_v32 config.json dict (float32).

  Fields left out take DeepseekV32Config's defaults (`HF_DEFAULTS`).
  """
  hf = {**HF_DEFAULTS, **hf}
  require(
    MODEL_TYPE,
    hf,
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "index_topk",
    "index_n_heads",
    "index_head_dim",
  )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(
      f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')."
    )
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError("attention_bias / mlp_bias are not supported.")
  if hf.get("scoring_func", "sigmoid") != "sigmoid":
    raise ValueError(
      f"scoring_func={hf['scoring_func']!r}: transformers' {MODEL_TYPE} "
      f"routes with sigmoid only."
    )
  if hf.get("moe_layer_freq", 1) != 1:
    raise ValueError(
      f"moe_layer_freq={hf['moe_layer_freq']} is not supported (only 1)."
    )
  layers = int(hf["num_hidden_layers"])
  theta, scaling = rope_from_hf(hf)
  first_dense = min(int(hf["first_k_dense_replace"] or 0), layers)
  types = hf.get("mlp_layer_types")
  experts = hf.get("n_routed_experts")
  if types is not None:
    want = ["dense"] * first_dense + ["sparse"] * (layers - first_dense)
    if not experts:
      want = ["dense"] * layers
    if list(types) != want:
      raise ValueError(
        f"mlp_layer_types {list(types)} is not first_k_dense_replace="
        f"{first_dense} dense layers then MoE ({want}); other patterns are "
        f"not supported."
      )
  moe: dict[str, Any] = {}
  if experts and first_dense < layers:  # else every layer is dense
    moe = {
      "num_experts": int(experts),
      "experts_per_token": int(hf["num_experts_per_tok"]),
      "expert_dim": int(hf["moe_intermediate_size"]),
      "num_shared_experts": int(hf["n_shared_experts"] or 0),
      "num_groups": int(hf["n_group"] or 1),
      "groups_per_token": int(hf["topk_group"] or 1),
      "routed_scaling_factor": float(hf["routed_scaling_factor"]),
      "norm_topk_prob": bool(hf["norm_topk_prob"]),
      "first_dense_layers": first_dense,
    }
  rope_dim = int(hf["qk_rope_head_dim"])
  heads = int(hf["num_attention_heads"])
  return ModelConfig(
    vocab_size=int(hf["vocab_size"]),
    embed_dim=int(hf["hidden_size"]),
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=heads,
    head_dim=int(hf["qk_nope_head_dim"]) + rope_dim,
    mlp_dim=int(hf["intermediate_size"]),
    attention=KIND,
    top_k=int(hf["index_topk"]),
    indexer_heads=int(hf["index_n_heads"]),
    indexer_dim=int(hf["index_head_dim"]),
    indexer_rope_dim=rope_dim,
    attention_params={
      "q_lora_rank": hf["q_lora_rank"],
      "kv_lora_rank": int(hf["kv_lora_rank"]),
      "qk_nope_head_dim": int(hf["qk_nope_head_dim"]),
      "qk_rope_head_dim": rope_dim,
      "v_head_dim": int(hf["v_head_dim"]),
    },
    tie_embeddings=bool(hf["tie_word_embeddings"]),
    rope_base=theta,
    rope_scaling={} if scaling is None else scaling.to_dict(),
    norm_eps=float(hf["rms_norm_eps"]),
    scale_embeddings=False,
    moe=moe,
  )


def config_to_hf(
  cfg: ModelConfig, base: dict[str, Any] | None = None
) -> dict[str, Any]:
  """The config.json dict of `cfg` (fields of `base` not derived from cfg,
  e.g. token ids, max_position_embeddings, are kept)."""
  if cfg.attention != KIND:
    raise ValueError(
      f"the {MODEL_TYPE} format holds attention kind {KIND!r}, this model "
      f"has {cfg.attention!r}."
    )
  if cfg.scale_embeddings:
    raise ValueError(
      f"{MODEL_TYPE} embeddings are not scaled: the model must have "
      f"scale_embeddings=False."
    )
  params = registry.get(KIND).params_from_config(cfg)
  mla = {k: getattr(params, k) for k in MLA_FIELDS}
  rope_dim = mla["qk_rope_head_dim"]
  indexer_rope = params.indexer_rope_dim
  if indexer_rope is not None and indexer_rope != rope_dim:
    raise ValueError(
      f"{MODEL_TYPE} rotates qk_rope_head_dim={rope_dim} indexer dims; this "
      f"model rotates indexer_rope_dim={indexer_rope}."
    )
  if params.indexer_precision != "float32":
    raise ValueError(
      f"indexer_precision={params.indexer_precision!r} is an inference "
      f"option with no config.json field; save a float32-indexer model."
    )
  if params.latent_norm_eps != LATENT_NORM_EPS:
    raise ValueError(
      f"{MODEL_TYPE} fixes the latent norms' eps at {LATENT_NORM_EPS}; this "
      f"model has latent_norm_eps={params.latent_norm_eps}."
    )
  if params.indexer_rope_interleaved:
    raise ValueError(
      f"{MODEL_TYPE} rotates the indexer's RoPE dims rotate-half; this model "
      f"has indexer_rope_interleaved=True."
    )
  if params.indexer_layers is not None or params.indexer_every != 1:
    raise ValueError(
      f"{MODEL_TYPE} has an indexer in every layer; this model reuses top-k "
      f"across layers (indexer_layers={params.indexer_layers}, "
      f"indexer_every={params.indexer_every}): save the model before "
      f"sharing, or every layer's indexer."
    )
  out = {
    k: v
    for k, v in dict(base or {}).items()
    if k not in ("rope_scaling", "rope_theta", "quantization_config")
  }
  moe = cfg.moe_config
  layers = cfg.num_layers
  first_dense = layers if moe is None else moe.first_dense_layers
  out.update(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.embed_dim,
    intermediate_size=cfg.mlp_dim,
    num_hidden_layers=layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_heads,
    head_dim=rope_dim,
    qk_head_dim=mla["qk_nope_head_dim"] + rope_dim,
    index_topk=cfg.top_k,
    index_n_heads=cfg.indexer_heads,
    index_head_dim=cfg.indexer_dim,
    rms_norm_eps=cfg.norm_eps,
    tie_word_embeddings=cfg.tie_embeddings,
    rope_parameters=rope_to_hf(cfg),
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    first_k_dense_replace=first_dense,
    mlp_layer_types=["dense"] * first_dense
    + ["sparse"] * (layers - first_dense),
    layer_types=["indexed_attention"] * layers,
    **mla,
  )
  out.setdefault("max_position_embeddings", 4096)
  out.setdefault("dtype", cfg.param_dtype)
  if moe is not None:
    out.update(
      n_routed_experts=moe.num_experts,
      num_experts_per_tok=moe.experts_per_token,
      moe_intermediate_size=moe.expert_dim,
      n_shared_experts=moe.num_shared_experts,
      n_group=moe.num_groups,
      topk_group=moe.groups_per_token,
      routed_scaling_factor=moe.routed_scaling_factor,
      norm_topk_prob=moe.norm_topk_prob,
    )
    if moe.score_func != "sigmoid":
      raise ValueError(
        f"transformers' {MODEL_TYPE} routes with sigmoid; this model's MoE "
        f"has score_func={moe.score_func!r}."
      )
  else:
    # Every layer dense (mlp_layer_types says so); transformers still checks
    # the MoE fields: valid, unused sizes.
    out.update(
      n_routed_experts=1,
      num_experts_per_tok=1,
      moe_intermediate_size=cfg.mlp_dim,
      n_shared_experts=0,
      n_group=1,
      topk_group=1,
    )
  return out


def rules(cfg: ModelConfig, available: set[str] | None = None) -> list[M.Rule]:
  """The tensor rules of a deepseek_v32 model.

  available: the checkpoint's tensor names on load (packed or per-expert
  experts are taken from what is there); None when saving (per-expert, as
  transformers writes).
  """
  spec = registry.get(cfg.attention)
  params = spec.params_from_config(cfg)
  h, hi = cfg.num_heads, cfg.indexer_heads
  dn = params.qk_nope_head_dim
  out = [
    M.same(("embed",), "model.embed_tokens.weight"),
    M.same(("final_norm", "scale"), "model.norm.weight"),
  ]
  if not cfg.tie_embeddings:
    out.append(M.linear(("unembed",), "lm_head.weight"))
  moe = cfg.moe_config
  for i in range(cfg.num_layers):
    b, p = ("blocks", i), f"model.layers.{i}."
    a, attn = p + "self_attn.", ("blocks", i, "attn")
    out += [
      M.same(b + ("attn_norm", "scale"), p + "input_layernorm.weight"),
      M.same(b + ("mlp_norm", "scale"), p + "post_attention_layernorm.weight"),
      M.linear(attn + ("wkv_a",), a + "kv_a_proj_with_mqa.weight"),
      M.same(attn + ("kv_norm", "scale"), a + "kv_a_layernorm.weight"),
      M.split_heads_out(
        [attn + ("w_uk",), attn + ("w_uv",)],
        a + "kv_b_proj.weight",
        h,
        [dn, params.v_head_dim],
      ),
      M.heads_in(attn + ("wo",), a + "o_proj.weight", h),
    ]
    if params.q_lora_rank is None:
      out.append(M.heads_out(attn + ("wq",), a + "q_proj.weight", h))
    else:
      out += [
        M.linear(attn + ("wq_a",), a + "q_a_proj.weight"),
        M.same(attn + ("q_norm", "scale"), a + "q_a_layernorm.weight"),
        M.heads_out(attn + ("wq_b",), a + "q_b_proj.weight", h),
      ]
    ix, idx = a + "indexer.", attn + ("indexer",)
    out += (
      []
      if not spec.has_indexer
      else [
        M.heads_out(idx + ("wq",), ix + "wq_b.weight", hi),
        M.linear(idx + ("wk",), ix + "wk.weight"),
        M.same(idx + ("k_norm", "scale"), ix + "k_norm.weight"),
        M.same(idx + ("k_norm", "bias"), ix + "k_norm.bias"),
        M.linear(idx + ("w_weights",), ix + "weights_proj.weight"),
      ]
    )
    m, mlp = p + "mlp.", b + ("mlp",)
    if moe is None or i < moe.first_dense_layers:
      out += [
        M.linear(mlp + (w,), m + f"{w}_proj.weight")
        for w in ("gate", "up", "down")
      ]
      continue
    out += [
      M.linear(mlp + ("router",), m + "gate.weight"),
      M.same(mlp + ("router_bias",), m + "gate.e_score_correction_bias"),
    ]
    packed = m + "experts.gate_up_proj"
    if available is not None and packed in available:
      out += [
        M.packed_gate_up(mlp + ("gate",), mlp + ("up",), packed),
        M.transposed_stack(mlp + ("down",), m + "experts.down_proj"),
      ]
    else:
      out += [
        M.stacked_linear(
          mlp + (w,),
          [m + f"experts.{e}.{w}_proj.weight" for e in range(moe.num_experts)],
        )
        for w in ("gate", "up", "down")
      ]
    if moe.num_shared_experts:
      out += [
        M.linear(mlp + ("shared", w), m + f"shared_experts.{w}_proj.weight")
        for w in ("gate", "up", "down")
      ]
  return out


def ignorable(name: str, cfg: ModelConfig, size: int = 1) -> bool:
  """Tensors a checkpoint may hold that the model does not use: DeepSeek's
  multi-token-prediction layers (model.layers.N and above, as HF ignores
  them), rotary caches, a tied model's lm_head, empty tensors (transformers
  writes zero-size shared experts when n_shared_experts is 0)."""
  if name.endswith("rotary_emb.inv_freq") or size == 0:
    return True
  if name == "lm_head.weight" and cfg.tie_embeddings:
    return True
  if name.startswith("model.layers."):
    index = name.split(".")[2]
    return index.isdigit() and int(index) >= cfg.num_layers
  return False


def f32_tensor(name: str) -> bool:
  """Tensors transformers and DeepSeek keep in f32 whatever the model dtype
  (the router, its correction bias, the indexer's head weights)."""
  return name.endswith(
    (
      "mlp.gate.weight",
      "e_score_correction_bias",
      "indexer.weights_proj.weight",
    )
  )


def attention_param_names() -> tuple[str, ...]:
  """Parameters of the kind (overrides of load_pretrained may set them)."""
  return tuple(f.name for f in dataclasses.fields(MLADSAParams))
