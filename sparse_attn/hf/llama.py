"""The Llama-family HF formats: `llama`, `mistral`, `qwen2`, `qwen3`.

One module for the four, since transformers' LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM differ only in a
few projection options: the model is this library's `Transformer` with GQA
attention (unscaled embeddings, pre-norm RMSNorm blocks, SwiGLU, rotate-half
RoPE on the whole head, tied or untied output):

  llama    attention_bias: biases on q/k/v/o; rope llama3 / linear / yarn
  mistral  no biases; `sliding_window` W: the "sliding_window" kind (window
           W, the query included, as transformers' mask); null: dense
  qwen2    biases on q/k/v (always), none on o
  qwen3    per-head RMSNorm of q and k before RoPE (q_norm / k_norm);
           attention_bias as llama

A DSA retrofit of one of these (`experiments/retrofit.py`) is saved in the
same format plus the lightning indexer: config fields `index_topk`,
`index_n_heads`, `index_head_dim` (DeepSeek-V3.2's names),
`index_rope_head_dim` (the indexer dims that get RoPE; index_head_dim // 2
when absent) and `index_layers` (the layers with an indexer; all when
absent), and per indexed layer

  model.layers.i.self_attn.indexer.wq.weight        [HI * DI, E]  attn.indexer.wq
  model.layers.i.self_attn.indexer.wk.weight        [DI, E]       attn.indexer.wk
  model.layers.i.self_attn.indexer.k_norm.weight    [DI]          attn.indexer.k_norm.scale
  model.layers.i.self_attn.indexer.k_norm.bias      [DI]          attn.indexer.k_norm.bias
  model.layers.i.self_attn.indexer.weights_proj.weight [HI, E]    attn.indexer.w_weights

(the indexer's query reads the hidden state: these models have no query
latent). transformers loads such a directory as the dense model, reporting
the indexer tensors as unused.

HF names -> parameters (HF linear weights are [out, in]):
  model.embed_tokens.weight / model.norm.weight / lm_head.weight
                                      embed / final_norm.scale / unembed
  model.layers.i.input_layernorm / post_attention_layernorm
                                      blocks.i.attn_norm / mlp_norm
  self_attn.q_proj / k_proj / v_proj / o_proj (.weight, .bias)
                                      attn.wq / wk / wv / wo (bq / bk / bv / bo)
  self_attn.q_norm / k_norm           attn.q_norm / k_norm (qwen3)
  mlp.gate_proj / up_proj / down_proj mlp.gate / up / down
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_attn import registry
from sparse_attn.config import ModelConfig
from sparse_attn.hf import mapping as M
from sparse_attn.hf.fields import require, rope_from_hf, rope_to_hf
from sparse_attn.nn.dsa import DSAParams
from sparse_attn.nn.sliding_window import SlidingWindowParams
from sparse_attn.ops.rope import RopeScaling

PROJECTIONS = "gqa"
#: The kinds these formats hold: dense, DSA (the retrofit), the window.
KINDS = ("dense", "dsa", "sliding_window")
DSA_FIELDS = (
  "index_topk",
  "index_n_heads",
  "index_head_dim",
  "index_rope_head_dim",
  "index_layers",
)


@dataclasses.dataclass(frozen=True)
class Format:
  """What one model type fixes or reads from its config.json."""

  model_type: str
  architecture: str
  qkv_bias: str | bool  # a config field name, or fixed
  out_bias: str | bool
  qk_norm: bool
  window: str  # "mistral": sliding_window; "layers": layer_types; "none"
  head_dim_field: bool  # whether config.json may set head_dim
  default_head_dim: int | None  # None: hidden_size // num_attention_heads


FORMATS = {
  f.model_type: f
  for f in (
    Format("llama", "LlamaForCausalLM", "attention_bias", "attention_bias",
           False, "none", True, None),
    Format("mistral", "MistralForCausalLM", False, False, False, "mistral",
           True, None),
    Format("qwen2", "Qwen2ForCausalLM", True, False, False, "layers", False,
           None),
    Format("qwen3", "Qwen3ForCausalLM", "attention_bias", "attention_bias",
           True, "layers", True, 128),
  )
}  # fmt: skip

#: The config.json fields load_pretrained's overrides may replace (an HF
#: field, not a ModelConfig one): sliding_window=None loads a windowed
#: checkpoint with full attention.
HF_OVERRIDES = ("sliding_window",)


def _flag(hf: dict[str, Any], rule: str | bool) -> bool:
  return bool(hf.get(rule, False)) if isinstance(rule, str) else rule


def _window(fmt: Format, hf: dict[str, Any], layers: int) -> int | None:
  """The sliding window every layer attends (None: full attention)."""
  if fmt.window == "mistral":
    w = hf.get("sliding_window", 4096)  # MistralConfig's default
    return None if w is None else int(w)
  if fmt.window != "layers":
    return None
  types = hf.get("layer_types")
  if types is None:
    use = hf.get("use_sliding_window", False) and hf.get("sliding_window")
    first = int(hf.get("max_window_layers", 28))
    types = [
      "sliding_attention" if use and i >= first else "full_attention"
      for i in range(layers)
    ]
  kinds = set(types)
  if kinds <= {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and hf.get("sliding_window"):
    return int(hf["sliding_window"])
  raise ValueError(
    f"layer_types {list(types)}: a {fmt.model_type} model with sliding "
    f"windows on some layers only is not supported (every layer must be "
    f"full_attention, or every layer sliding_attention)."
  )


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  factor = (hf.get("rope_parameters") or {}).get(
    "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)
  )
  if factor != 1.0:
    raise ValueError(
      f"partial_rotary_factor={factor} is not supported (RoPE on the whole "
      f"head only)."
    )
  return rope_from_hf(hf)


class Family:
  """The tensor names and config fields of one Llama-family model type."""

  PROJECTIONS = PROJECTIONS
  HF_OVERRIDES = HF_OVERRIDES

  def __init__(self, fmt: Format):
    self.fmt = fmt
    self.MODEL_TYPE = fmt.model_type

  def __repr__(self) -> str:
    return f"hf.llama.Family({self.MODEL_TYPE!r})"

  # -- config ----------------------------------------------------------------

  def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a config.json dict (float32 parameters)."""
    fmt = self.fmt
    require(
      fmt.model_type,
      hf,
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
    )
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(
        f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')."
      )
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported.")
    heads = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    embed = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") if fmt.head_dim_field else None
    if head_dim is None:
      head_dim = fmt.default_head_dim or embed // heads
    layers = int(hf["num_hidden_layers"])
    theta, scaling = _rope(hf)
    window = _window(fmt, hf, layers)
    cfg = ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      embed_dim=embed,
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=kv,
      head_dim=int(head_dim),
      mlp_dim=int(hf["intermediate_size"]),
      attention="dense",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      rope_base=theta,
      rope_scaling={} if scaling is None else scaling.to_dict(),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      scale_embeddings=False,
      qkv_bias=_flag(hf, fmt.qkv_bias),
      out_bias=_flag(hf, fmt.out_bias),
      qk_norm=fmt.qk_norm,
    )
    if hf.get("index_topk") is not None:
      if window is not None:
        raise ValueError(
          f"config.json sets both a sliding window ({window}) and DSA "
          f"(index_topk): not supported."
        )
      require(fmt.model_type, hf, "index_n_heads", "index_head_dim")
      layers_idx = hf.get("index_layers")
      return dataclasses.replace(
        cfg,
        attention="dsa",
        top_k=int(hf["index_topk"]),
        indexer_heads=int(hf["index_n_heads"]),
        indexer_dim=int(hf["index_head_dim"]),
        indexer_rope_dim=hf.get("index_rope_head_dim"),
        sparse_layers=None if layers_idx is None else tuple(layers_idx),
      )
    if window is not None:
      return cfg.with_attention("sliding_window", window=window)
    return cfg

  def check_save(self, cfg: ModelConfig) -> None:
    """ValueError naming what this format cannot hold of `cfg`."""
    fmt, problems = self.fmt, []
    if cfg.attention not in KINDS:
      problems.append(f"attention {cfg.attention!r} (it holds {list(KINDS)})")
    if cfg.attention == "sliding_window" and fmt.window == "none":
      problems.append("a sliding window")
    if cfg.sparse_layers is not None and cfg.attention != "dsa":
      problems.append("sparse_layers of a kind other than dsa")
    if cfg.moe:
      problems.append("experts (moe)")
    if cfg.scale_embeddings:
      problems.append("scaled embeddings (scale_embeddings=True)")
    for option in ("qkv_bias", "out_bias"):
      rule = getattr(fmt, option)
      if isinstance(rule, bool) and getattr(cfg, option) != rule:
        problems.append(f"{option}={getattr(cfg, option)}")
    if isinstance(fmt.qkv_bias, str) and cfg.qkv_bias != cfg.out_bias:
      problems.append(
        f"qkv_bias={cfg.qkv_bias} with out_bias={cfg.out_bias} "
        f"({fmt.qkv_bias} sets both)"
      )
    if cfg.qk_norm != fmt.qk_norm:
      problems.append(f"qk_norm={cfg.qk_norm}")
    if not fmt.head_dim_field and cfg.head_dim * cfg.num_heads != cfg.embed_dim:
      problems.append(
        f"head_dim={cfg.head_dim} != embed_dim / num_heads (it has no "
        f"head_dim field)"
      )
    if cfg.attention == "dsa":
      params = registry.get("dsa").params_from_config(cfg)
      if params.indexer_layers is not None or params.indexer_every != 1:
        problems.append(
          "top-k reuse across layers (indexer_layers / indexer_every: the "
          "format has an indexer in every DSA layer)"
        )
      if params.indexer_precision != "float32":
        problems.append(
          f"indexer_precision={params.indexer_precision!r} (an inference "
          f"option with no config.json field)"
        )
      if params.indexer_rope_interleaved or not params.detach_indexer_input:
        problems.append("non-default indexer_rope_interleaved / detach")
    if problems:
      raise ValueError(
        f"the {fmt.model_type} format cannot hold this model: "
        + "; ".join(problems)
        + "."
      )

  def config_to_hf(
    self, cfg: ModelConfig, base: dict[str, Any] | None = None
  ) -> dict[str, Any]:
    """The config.json dict of `cfg` (fields of `base` not derived from cfg,
    e.g. token ids, max_position_embeddings, are kept)."""
    self.check_save(cfg)
    fmt = self.fmt
    drop = {"rope_scaling", "rope_theta", "quantization_config", *DSA_FIELDS}
    if fmt.window != "none":
      drop |= {"sliding_window", "use_sliding_window", "layer_types"}
    out = {k: v for k, v in dict(base or {}).items() if k not in drop}
    out.update(
      architectures=[fmt.architecture],
      model_type=fmt.model_type,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.embed_dim,
      intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings,
      rope_parameters=rope_to_hf(cfg),
      hidden_act="silu",
    )
    if fmt.head_dim_field:
      out["head_dim"] = cfg.head_dim
    if isinstance(fmt.qkv_bias, str):
      out[fmt.qkv_bias] = cfg.qkv_bias
    if fmt.model_type == "llama":
      out["mlp_bias"] = False
    window = None
    if cfg.attention == "sliding_window":
      window = registry.get("sliding_window").params_from_config(cfg).window
    if fmt.window == "mistral":
      out["sliding_window"] = window
    elif fmt.window == "layers":
      out["use_sliding_window"] = window is not None
      out["sliding_window"] = window
      out["max_window_layers"] = 0
      kind = "full_attention" if window is None else "sliding_attention"
      out["layer_types"] = [kind] * cfg.num_layers
    if cfg.attention == "dsa":
      out.update(
        index_topk=cfg.top_k,
        index_n_heads=cfg.indexer_heads,
        index_head_dim=cfg.indexer_dim,
      )
      if cfg.indexer_rope_dim is not None:  # absent: index_head_dim // 2
        out["index_rope_head_dim"] = cfg.indexer_rope_dim
      if cfg.sparse_layers is not None:
        out["index_layers"] = list(cfg.sparse_layers)
    out.setdefault("max_position_embeddings", 4096)
    return out

  # -- tensors ---------------------------------------------------------------

  def rules(
    self, cfg: ModelConfig, available: set[str] | None = None
  ) -> list[M.Rule]:
    """The tensor rules of a model in this format."""
    del available
    h, g = cfg.num_heads, cfg.num_kv_heads
    out = [
      M.same(("embed",), "model.embed_tokens.weight"),
      M.same(("final_norm", "scale"), "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
      out.append(M.linear(("unembed",), "lm_head.weight"))
    for i in range(cfg.num_layers):
      b, p = ("blocks", i), f"model.layers.{i}."
      a, attn = p + "self_attn.", b + ("attn",)
      out += [
        M.same(b + ("attn_norm", "scale"), p + "input_layernorm.weight"),
        M.same(
          b + ("mlp_norm", "scale"), p + "post_attention_layernorm.weight"
        ),
        M.heads_out(attn + ("wq",), a + "q_proj.weight", h),
        M.heads_out(attn + ("wk",), a + "k_proj.weight", g),
        M.heads_out(attn + ("wv",), a + "v_proj.weight", g),
        M.heads_in(attn + ("wo",), a + "o_proj.weight", h),
      ]
      if cfg.qkv_bias:
        out += [
          M.heads_bias(attn + (f"b{w}",), a + f"{w}_proj.bias", n)
          for w, n in (("q", h), ("k", g), ("v", g))
        ]
      if cfg.out_bias:
        out.append(M.same(attn + ("bo",), a + "o_proj.bias"))
      if cfg.qk_norm:
        out += [
          M.same(attn + (f"{w}_norm", "scale"), a + f"{w}_norm.weight")
          for w in ("q", "k")
        ]
      if registry.has_indexer(cfg.layer_attention(i)):
        ix, idx = a + "indexer.", attn + ("indexer",)
        out += [
          M.heads_out(idx + ("wq",), ix + "wq.weight", cfg.indexer_heads),
          M.linear(idx + ("wk",), ix + "wk.weight"),
          M.same(idx + ("k_norm", "scale"), ix + "k_norm.weight"),
          M.same(idx + ("k_norm", "bias"), ix + "k_norm.bias"),
          M.linear(idx + ("w_weights",), ix + "weights_proj.weight"),
        ]
      m, mlp = p + "mlp.", b + ("mlp",)
      out += [
        M.linear(mlp + (w,), m + f"{w}_proj.weight")
        for w in ("gate", "up", "down")
      ]
    return out

  def ignorable(self, name: str, cfg: ModelConfig, size: int = 1) -> bool:
    """Tensors a checkpoint may hold that the model does not use: rotary
    caches, a tied model's lm_head, empty tensors."""
    if name.endswith("rotary_emb.inv_freq") or size == 0:
      return True
    return name == "lm_head.weight" and cfg.tie_embeddings

  def f32_tensor(self, name: str) -> bool:
    """Tensors kept in f32 whatever the model dtype (the indexer's head
    weights, as DeepSeek keeps them)."""
    return name.endswith("indexer.weights_proj.weight")

  def attention_param_names(self) -> tuple[str, ...]:
    """Parameters of the kinds (overrides of load_pretrained may set them)."""
    return tuple(
      f.name
      for cls in (DSAParams, SlidingWindowParams)
      for f in dataclasses.fields(cls)
    )


FAMILIES = {t: Family(f) for t, f in FORMATS.items()}


def family_for(cfg: ModelConfig) -> Family:
  """The format save_pretrained writes a GQA model in when none is given:
  qwen3 with qk_norm, qwen2 with q/k/v biases only, mistral for a sliding
  window, llama otherwise."""
  if cfg.qk_norm:
    return FAMILIES["qwen3"]
  if cfg.qkv_bias and not cfg.out_bias:
    return FAMILIES["qwen2"]
  if cfg.attention == "sliding_window":
    return FAMILIES["mistral"]
  return FAMILIES["llama"]
