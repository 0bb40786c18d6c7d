"""HF-format checkpoints in and out: `load_pretrained`, `save_pretrained`.

    model, cfg = sparse_attn.hf.load_pretrained("path/to/checkpoint")
    logits, aux = model(tokens)                  # f32[B, T, V]
    sparse_attn.hf.save_pretrained(model, "path/to/copy")

A checkpoint directory is what transformers' `save_pretrained` writes:
config.json + model.safetensors (or shards + model.safetensors.index.json).
Supported model types: `deepseek_v32` (transformers' DeepseekV32ForCausalLM
and DeepSeek's own V3.2 release: per-expert tensors, FP8 weights with
128 x 128 `weight_scale_inv` blocks, dequantised at load; the MTP layer is
skipped). Tensors are read with the `safetensors` package; torch is never
imported. The model is this library's `Transformer`, so every training,
decoding and kernel path applies to it.

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
from sparse_attn.hf import deepseek_v32
from sparse_attn.hf.mapping import apply_load, apply_save, tensor_names
from sparse_attn.hf.safetensors_io import (
  CheckpointTensors,
  dequantize_blocks,
  write_checkpoint,
)
from sparse_attn.models import Transformer

CONFIG_FILE = "config.json"
#: model_type -> the module that knows its config fields and tensor names.
FAMILIES = {deepseek_v32.MODEL_TYPE: deepseek_v32}
#: attention kind -> the model_type save_pretrained writes.
FORMAT_OF_KIND = {deepseek_v32.KIND: deepseek_v32.MODEL_TYPE}
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
  return hf, family, _override(family.config_from_hf(hf), overrides, family)


def _override(
  cfg: ModelConfig, overrides: dict[str, Any], family
) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kind_params = set(family.attention_param_names())
  unknown = sorted(set(overrides) - fields - kind_params)
  if unknown:
    raise ValueError(
      f"unknown overrides {unknown}: give ModelConfig fields "
      f"({sorted(fields)}) or attention parameters ({sorted(kind_params)})."
    )
  direct = {k: v for k, v in overrides.items() if k in fields}
  params = {k: v for k, v in overrides.items() if k not in fields}
  if params:
    direct["attention_params"] = {**cfg.attention_kwargs, **params}
  cfg = dataclasses.replace(cfg, **direct)
  spec = registry.get(cfg.attention)
  if spec.projections != "mla":
    raise ValueError(
      f"a {family.MODEL_TYPE} checkpoint holds MLA weights; attention "
      f"{cfg.attention!r} is not an MLA kind."
    )
  if not spec.has_indexer:  # the dense twin: its kind takes no DSA fields
    keep = set(spec.param_names)
    cfg = dataclasses.replace(
      cfg,
      attention_params={
        k: v for k, v in cfg.attention_kwargs.items() if k in keep
      },
    )
  spec.params_from_config(cfg)  # validates
  return cfg


def load_pretrained(
  path: str, **overrides: Any
) -> tuple[Transformer, ModelConfig]:
  """(model, config) of the HF checkpoint in directory `path`.

  overrides: ModelConfig fields (e.g. dtype="bfloat16",
  param_dtype="bfloat16", implementation="pallas", top_k=512,
  attention="mla" for the dense twin, whose indexer tensors are then
  skipped) or attention parameters (form="absorbed",
  indexer_precision="fp8", indexer_scale_fmt="ue8m0"). Weights load in
  float32 unless param_dtype says otherwise.
  """
  hf, family, cfg = _read(path, overrides)
  tensors = CheckpointTensors(path)
  names = set(tensors)
  rules = family.rules(cfg, available=names)
  needed = tensor_names(rules)
  missing = sorted(needed - names)
  if missing:
    raise ValueError(
      f"checkpoint {path!r} lacks {len(missing)} tensors the model needs: "
      f"{_listing(missing)}."
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


def source_config(model: Transformer) -> dict[str, Any] | None:
  """The config.json dict a model was loaded from (None if it was not)."""
  text = getattr(model, "hf_config_json", None)
  return None if text is None else json.loads(text)


def save_pretrained(
  model: Transformer,
  path: str,
  *,
  config: dict[str, Any] | None = None,
  dtype: Any = None,
  max_shard_size: int | None = None,
) -> list[str]:
  """Writes `model` as an HF checkpoint directory; returns the files written.

  config: a config.json dict whose fields not derived from the model (token
  ids, max_position_embeddings, ...) are kept; default: the one the model
  was loaded from. dtype: tensor dtype (default: the parameters' own).
  max_shard_size: bytes per shard (None: one model.safetensors).
  """
  cfg = model.cfg
  if cfg.attention not in FORMAT_OF_KIND:
    raise ValueError(
      f"no HF format holds attention kind {cfg.attention!r}; supported: "
      f"{sorted(FORMAT_OF_KIND)}."
    )
  family = FAMILIES[FORMAT_OF_KIND[cfg.attention]]
  hf = family.config_to_hf(cfg, config or source_config(model))
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
  "load_pretrained",
  "read_config",
  "save_pretrained",
  "source_config",
]
