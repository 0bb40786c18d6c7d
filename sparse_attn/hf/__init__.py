"""HF-format checkpoints in and out: `load_pretrained`, `save_pretrained`.

    model, cfg = sparse_attn.hf.load_pretrained("path/to/checkpoint")
    logits, aux = model(tokens)                  # f32[B, T, V]
    sparse_attn.hf.save_pretrained(model, "path/to/copy")

A checkpoint directory is what transformers' `save_pretrained` writes:
config.json + model.safetensors (or shards + model.safetensors.index.json).
Supported model types: `deepseek_v32` (transformers' DeepseekV32ForCausalLM
and DeepSeek's own V3.2 release: per-expert tensors, FP8 weights with
128 x 128 `weight_scale_inv` blocks, dequantised at load; the MTP layer is
skipped) and the Llama family, `llama`, `mistral`, `qwen2`, `qwen3`
(`sparse_attn.hf.llama`; GQA, tied or untied, q/k/v/o biases, Qwen3's q/k
norms, Mistral's sliding window, llama3 / linear / YaRN RoPE scaling, and
DSA retrofits of them with their indexer tensors). Tensors are read with
the `safetensors` package; torch is never imported. The model is this
library's `Transformer`, so every training, decoding and kernel path
applies to it. `retrofit_from(path, top_k=...)` adds a fresh lightning
indexer to a dense checkpoint (DeepSeek's V3.1 -> V3.2-Exp move).

Missing tensors, tensors of the wrong shape, and tensors the model does not
use raise ValueError naming them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_attn import registry
from sparse_attn.config import ModelConfig
from sparse_attn.hf import deepseek_v32, llama
from sparse_attn.hf.mapping import apply_load, apply_save, tensor_names
from sparse_attn.hf.safetensors_io import (
  CheckpointTensors,
  dequantize_blocks,
  write_checkpoint,
)
from sparse_attn.models import Transformer
from sparse_attn.models.transfer import transfer_params

CONFIG_FILE = "config.json"
#: model_type -> the module that knows its config fields and tensor names.
FAMILIES: dict[str, Any] = {
  deepseek_v32.MODEL_TYPE: deepseek_v32,
  **llama.FAMILIES,
}
#: attention kind -> the model_type save_pretrained writes by default (GQA
#: kinds: `llama.family_for`, from the model's projection options).
FORMAT_OF_KIND = {
  deepseek_v32.KIND: deepseek_v32.MODEL_TYPE,
  **{kind: "llama" for kind in llama.KINDS},
}
_SCALE_SUFFIX = "_scale_inv"


def read_config(path: str) -> dict[str, Any]:
  """The config.json dict of checkpoint directory `path`."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise ValueError(f"{path!r} has no {CONFIG_FILE}.")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def family_of(hf: dict[str, Any]):
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(
      f"model_type {model_type!r} is not supported; supported: "
      f"{sorted(FAMILIES)}."
    )
  return FAMILIES[model_type]


def config_from_pretrained(path: str, **overrides: Any) -> ModelConfig:
  """The ModelConfig load_pretrained(path, **overrides) builds (no tensors)."""
  return _read(path, overrides)[2]


def _read(path: str, overrides: dict[str, Any]):
  """(config.json dict, its family module, the ModelConfig with overrides)."""
  hf = read_config(path)
  family = family_of(hf)
  overrides = dict(overrides)
  hf_fields = {
    k: overrides.pop(k) for k in family.HF_OVERRIDES if k in overrides
  }
  base = family.config_from_hf({**hf, **hf_fields})
  return hf, family, _override(base, overrides, family)


def _override(
  cfg: ModelConfig, overrides: dict[str, Any], family
) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kind_params = set(family.attention_param_names())
  wanted = overrides.get("attention", cfg.attention)
  if wanted in registry.names():  # the requested kind's own parameters
    kind_params |= set(registry.get(wanted).param_names)
  unknown = sorted(set(overrides) - fields - kind_params)
  if unknown:
    raise ValueError(
      f"unknown overrides {unknown}: give ModelConfig fields "
      f"({sorted(fields)}), attention parameters ({sorted(kind_params)})"
      f" or config.json fields ({sorted(family.HF_OVERRIDES)})."
    )
  base_kind = cfg.attention
  direct = {k: v for k, v in overrides.items() if k in fields}
  params = {k: v for k, v in overrides.items() if k not in fields}
  if params:
    direct["attention_params"] = {**cfg.attention_kwargs, **params}
  cfg = dataclasses.replace(cfg, **direct)
  spec = registry.get(cfg.attention)
  if spec.projections != family.PROJECTIONS:
    raise ValueError(
      f"a {family.MODEL_TYPE} checkpoint holds {family.PROJECTIONS.upper()} "
      f"weights; attention {cfg.attention!r} has {spec.projections} "
      f"projections."
    )
  base = registry.get(base_kind)
  if (
    cfg.attention != base_kind
    and not base.has_indexer  # its dense twin drops only the indexer
    and base.param_names
  ):
    # The checkpoint's own attention pattern (Mistral's window) would be
    # lost: only the config.json field that sets it may drop it.
    kept = {k: v for k, v in cfg.attention_kwargs.items() if k in base.defaults}
    raise ValueError(
      f"this {family.MODEL_TYPE} checkpoint attends with {base_kind!r} "
      f"{kept}; attention={cfg.attention!r} would not keep that. Override "
      f"the config.json field that sets it instead (one of "
      f"{list(family.HF_OVERRIDES)}; e.g. sliding_window=None loads full "
      f"attention, the same model on sequences up to the window)."
    )
  keep = set(spec.param_names)
  cfg = dataclasses.replace(  # e.g. the dense twin takes no DSA fields
    cfg,
    attention_params={
      k: v for k, v in cfg.attention_kwargs.items() if k in keep
    },
  )
  if not spec.has_indexer and "sparse_layers" not in overrides:
    cfg = dataclasses.replace(cfg, sparse_layers=None)
  spec.params_from_config(cfg)  # validates
  return cfg


def load_pretrained(
  path: str, **overrides: Any
) -> tuple[Transformer, ModelConfig]:
  """(model, config) of the HF checkpoint in directory `path`.

  overrides: ModelConfig fields (e.g. dtype="bfloat16",
  param_dtype="bfloat16", implementation="pallas", top_k=512,
  attention="mla" / "dense" for the dense twin, whose indexer tensors are
  then skipped), attention parameters (form="absorbed",
  indexer_precision="fp8", indexer_scale_fmt="ue8m0"), or the config.json
  fields a family lets them replace (Llama family: sliding_window=None to
  drop Mistral's window). Weights load in float32 unless param_dtype says
  otherwise.

  A model with parameters the checkpoint lacks (e.g. attention="dsa" on a
  dense checkpoint: the indexer) is refused here; build it with
  `retrofit_from` (or `experiments/retrofit.py`), which loads the dense
  weights and initialises the rest.
  """
  hf, family, cfg = _read(path, overrides)
  tensors = CheckpointTensors(path)
  names = set(tensors)
  rules = family.rules(cfg, available=names)
  needed = tensor_names(rules)
  missing = sorted(needed - names)
  if missing:
    hint = ""
    if all(_is_indexer(n) for n in missing):
      hint = (
        " They are all indexer tensors: to add a fresh indexer to a dense "
        "checkpoint use sparse_attn.hf.retrofit_from(path, ...)."
      )
    raise ValueError(
      f"checkpoint {path!r} lacks {len(missing)} tensors the model needs: "
      f"{_listing(missing)}.{hint}"
    )
  scales = {n for n in names if n.endswith(_SCALE_SUFFIX)}
  unexpected = sorted(
    n
    for n in names - needed - scales
    if not family.ignorable(n, cfg, int(np.prod(tensors.shape(n))))
    and not (_is_indexer(n) and not registry.has_indexer(cfg.attention))
  )
  if unexpected:
    raise ValueError(
      f"checkpoint {path!r} has {len(unexpected)} tensors the model does "
      f"not use: {_listing(unexpected)}."
    )

  def read(name: str) -> np.ndarray:
    arr = tensors[name]
    scale = name + _SCALE_SUFFIX
    if scale in names:
      return dequantize_blocks(arr, tensors[scale])
    if arr.dtype.itemsize == 1 and jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"tensor {name!r} is float8 but has no {scale!r}.")
    return np.asarray(arr, np.float32)

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  params = {p: v for p, v in flat if isinstance(v, nnx.Param)}
  # Each converted tensor becomes its parameter (in the parameter's dtype)
  # at once, so the host holds the model once plus one f32 tensor.
  loaded = apply_load(
    rules,
    read,
    {p: v.shape for p, v in params.items()},
    convert=lambda p, arr: jnp.asarray(arr, params[p].dtype),
  )
  unset = sorted(".".join(map(str, p)) for p in set(params) - set(loaded))
  if unset:
    raise ValueError(
      f"no checkpoint tensor maps to the parameters {_listing(unset)}."
    )
  values = [
    (p, v.replace(loaded[p]) if isinstance(v, nnx.Param) else v)
    for p, v in flat
  ]
  model = nnx.merge(graphdef, nnx.from_flat_state(values))
  model.hf_config_json = json.dumps(hf, sort_keys=True)
  return model, cfg


def retrofit_from(
  path: str, *, attention: str = "dsa", seed: int = 0, **overrides: Any
) -> tuple[Transformer, ModelConfig]:
  """(model of kind `attention`, config) from a checkpoint without its
  parameters: DeepSeek's move from V3.1 to V3.2-Exp.

  Every parameter the checkpoint has (embeddings, projections, MLPs,
  norms) is loaded; what only `attention` has (the lightning indexer on
  the layers of `sparse_layers`, all by default) is freshly initialised
  from `seed`. overrides: as load_pretrained's (top_k=, indexer_heads=,
  indexer_dim=, sparse_layers=[...], dtype, ...). Train the new parameters
  with the dense warm-up (`experiments/retrofit.py`).
  """
  cfg = config_from_pretrained(path, attention=attention, **overrides)
  twin = registry.dense_twin(attention)
  kind_only = set(registry.get(attention).param_names) - set(
    registry.get(twin).param_names
  )
  dense_overrides = {
    k: v
    for k, v in overrides.items()
    if k not in kind_only and k != "sparse_layers"
  }
  dense, _ = load_pretrained(path, attention=twin, **dense_overrides)
  model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
  moved = transfer_params(
    nnx.state(dense, nnx.Param),
    nnx.state(model, nnx.Param),
    repeat=registry.get(attention).dense_copies,
  )
  nnx.update(model, moved.params)
  if not moved.kept:
    raise ValueError(
      f"attention={attention!r} adds no parameters to this checkpoint: use "
      f"load_pretrained(path, attention={attention!r})."
    )
  model.hf_config_json = dense.hf_config_json
  return model, cfg


def source_config(model: Transformer) -> dict[str, Any] | None:
  """The config.json dict a model was loaded from (None if it was not)."""
  text = getattr(model, "hf_config_json", None)
  return None if text is None else json.loads(text)


def format_of(model: Transformer, model_type: str | None = None) -> Any:
  """The family module save_pretrained writes `model` with: `model_type`
  if given, else the model_type the model was loaded from, else the
  default of its kind (`FORMAT_OF_KIND`; GQA kinds: `llama.family_for`)."""
  cfg = model.cfg
  if model_type is not None:
    if model_type not in FAMILIES:
      raise ValueError(
        f"model_type {model_type!r} is not supported; supported: "
        f"{sorted(FAMILIES)}."
      )
    return FAMILIES[model_type]
  source = (source_config(model) or {}).get("model_type")
  if source in FAMILIES and cfg.attention in FORMAT_OF_KIND:
    family = FAMILIES[source]
    if family.PROJECTIONS == registry.get(cfg.attention).projections:
      return family
  if cfg.attention not in FORMAT_OF_KIND:
    raise ValueError(
      f"no HF format holds attention kind {cfg.attention!r}; supported: "
      f"{sorted(FORMAT_OF_KIND)}."
    )
  if registry.get(cfg.attention).projections == llama.PROJECTIONS:
    return llama.family_for(cfg)
  return FAMILIES[FORMAT_OF_KIND[cfg.attention]]


def save_pretrained(
  model: Transformer,
  path: str,
  *,
  config: dict[str, Any] | None = None,
  dtype: Any = None,
  max_shard_size: int | None = None,
  model_type: str | None = None,
) -> list[str]:
  """Writes `model` as an HF checkpoint directory; returns the files written.

  config: a config.json dict whose fields not derived from the model (token
  ids, max_position_embeddings, ...) are kept; default: the one the model
  was loaded from. dtype: tensor dtype (default: the parameters' own).
  max_shard_size: bytes per shard (None: one model.safetensors).
  model_type: the HF format (default: `format_of`); ValueError when it
  cannot hold the model (e.g. qwen2 for a model with q/k norms).
  """
  cfg = model.cfg
  family = format_of(model, model_type)
  base = config or source_config(model)
  if base is not None and base.get("model_type") != family.MODEL_TYPE:
    # Another format's fields do not carry over; token ids and lengths do.
    base = {k: v for k, v in base.items() if k in _PORTABLE_FIELDS}
  hf = family.config_to_hf(cfg, base)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  params = {p: np.asarray(v.get_value()) for p, v in flat}
  tensors = apply_save(family.rules(cfg), params)
  if dtype is not None:
    dt = jnp.dtype(dtype)
    tensors = {
      k: np.asarray(v).astype(np.float32 if family.f32_tensor(k) else dt)
      for k, v in tensors.items()
    }
    hf["dtype"] = dt.name
  else:
    hf["dtype"] = jnp.dtype(cfg.param_dtype).name
  files = write_checkpoint(path, tensors, max_shard_bytes=max_shard_size)
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return files + [CONFIG_FILE]


#: config.json fields kept when a model is saved in another format than
#: the one it was loaded from.
_PORTABLE_FIELDS = (
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "max_position_embeddings",
  "initializer_range",
)


def _is_indexer(name: str) -> bool:
  return ".self_attn.indexer." in name


def _listing(names: list[str], limit: int = 12) -> str:
  shown = ", ".join(names[:limit])
  return shown + (
    f", ... ({len(names) - limit} more)" if len(names) > limit else ""
  )


__all__ = [
  "FAMILIES",
  "config_from_pretrained",
  "format_of",
  "load_pretrained",
  "read_config",
  "retrofit_from",
  "save_pretrained",
  "source_config",
]
