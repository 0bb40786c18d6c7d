"""Run configuration: frozen dataclasses, presets, JSON round trip, validation.

A run is described by one `Config` = `ModelConfig` (sizes, attention kind)
+ `TrainConfig` (data, the two DSA stages, optimiser, mesh, checkpoints,
logging). Presets are functions of nothing; override fields with
`override(cfg, "model.top_k=32", "train.lr=1e-3")` (values parsed as JSON,
falling back to the raw string), which is what the CLI's `--set` does.

Stages (DeepSeek-V3.2-Exp): `warmup_stage_steps` of dense warm-up (main
model frozen, dense attention, only the indexer trains on the dense KL), then
`sparse_stage_steps` of sparse training (top-k attention, everything trains:
the main model on the LM loss, the indexer on the sparse KL). Either may be
0. Attention kinds without an indexer ("dense", ...) have no warm-up stage:
`resolved()` folds its steps into the main stage so the total is unchanged
(a dense twin trains the same number of steps as its DSA counterpart).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from sparse_attn import dispatch, registry
from sparse_attn.data.dataset import check_dataset
from sparse_attn.data.mixture import canonical
from sparse_attn.nn.base import KERNELS
from sparse_attn.nn.moe import MoEParams
from sparse_attn.ops.rope import RopeScaling, as_rope_scaling

_DTYPES = ("float32", "bfloat16", "float16")


def _sorted_pairs(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
  """A dict (or pairs) as sorted (key, value) pairs, so configs stay hashable.

  Nested lists (JSON) become tuples.
  """
  if isinstance(value, dict):
    value = value.items()
  try:
    return tuple(sorted((str(k), _frozen(v)) for k, v in value))
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"model.{name} must be a dict of named values, got {value!r}."
    ) from e


def _nested_pairs(name: str, value: Any, what: str) -> tuple:
  """{outer: {inner: value}} as sorted pairs of sorted pairs (hashable);
  inner values are scalars or lists of them."""
  items = value.items() if isinstance(value, dict) else value
  try:
    out = tuple(
      sorted(
        (
          str(k),
          tuple(sorted((str(a), _frozen(b)) for a, b in dict(v).items())),
        )
        for k, v in items
      )
    )
    hash(out)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"{name} must be a dict {what} (values: numbers, strings, bools or "
      f"lists of them), got {value!r}."
    ) from e
  return out


def _frozen(v: Any) -> Any:
  return tuple(_frozen(x) for x in v) if isinstance(v, list) else v


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer sizes and attention kind."""

  vocab_size: int = 256
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2  # GQA (1 = MQA, num_heads = MHA)
  head_dim: int = 32
  mlp_dim: int = 384  # SwiGLU hidden size
  attention: str = "dsa"  # a kind of sparse_attn.registry
  top_k: int = 32  # DSA keys per query
  indexer_heads: int = 4
  indexer_dim: int = 32
  indexer_rope_dim: int | None = None  # None: indexer_dim // 2
  implementation: str | None = None  # None (platform default), "xla", "pallas"
  # Kind-specific constructor arguments of the baseline kinds (window, stride,
  # n_hashes, ...): a dict in JSON, stored as sorted (name, value) pairs so
  # the config stays hashable.
  attention_params: Any = ()
  # Pallas kernel tile sizes: {"topk": {...}, "gathered_attention": {...}}
  # with fields of kernels_pallas.<kernel>.BlockSizes (missing: per-platform
  # defaults); stored as sorted pairs like attention_params.
  kernel_block_sizes: Any = ()
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  # RoPE frequency scaling, HF-style dict ({"rope_type": "yarn", "factor":
  # 40, "original_max_position_embeddings": 4096, ...}; sparse_attn.ops.rope.
  # RopeScaling), stored as sorted pairs; empty: plain RoPE.
  rope_scaling: Any = ()
  norm_eps: float = 1e-6
  # Token embeddings times sqrt(embed_dim) (this library's models); False
  # for the HF families (DeepSeek, Llama, Qwen), whose embeddings are not
  # scaled.
  scale_embeddings: bool = True
  # Mixture of experts (sparse_attn.nn.moe.MoEParams fields, a dict stored as
  # sorted pairs); empty: a dense SwiGLU of mlp_dim in every block.
  moe: Any = ()
  # GQA projection options of the HF families: biases on q/k/v (Qwen2,
  # attention_bias), a bias on the output projection (attention_bias), and
  # per-head RMSNorm of q and k before RoPE (Qwen3).
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  # The layers that use `attention` (a list of layer indices); the others
  # use its dense twin (`registry.dense_twin`: "dense" for GQA kinds, "mla"
  # for MLA kinds). None: every layer. E.g. a DSA retrofit of some layers.
  sparse_layers: Any = None
  dtype: str = "float32"  # activation dtype
  param_dtype: str = "float32"

  def __post_init__(self):
    for name in ("attention_params", "rope_scaling", "moe"):
      object.__setattr__(self, name, _sorted_pairs(name, getattr(self, name)))
    if self.sparse_layers is not None:
      try:
        layers = tuple(sorted({int(i) for i in self.sparse_layers}))
      except (TypeError, ValueError) as e:
        raise ValueError(
          f"model.sparse_layers must be a list of layer indices or None, "
          f"got {self.sparse_layers!r}."
        ) from e
      object.__setattr__(self, "sparse_layers", layers)
    object.__setattr__(
      self,
      "kernel_block_sizes",
      _nested_pairs(
        "model.kernel_block_sizes",
        self.kernel_block_sizes,
        "kernel -> dict of BlockSizes fields",
      ),
    )

  @property
  def attention_kwargs(self) -> dict[str, Any]:
    return dict(self.attention_params)

  @property
  def rope_scaling_config(self) -> RopeScaling | None:
    """rope_scaling as a RopeScaling (None: plain RoPE)."""
    return (
      as_rope_scaling(dict(self.rope_scaling)) if self.rope_scaling else None
    )

  @property
  def moe_config(self) -> MoEParams | None:
    """moe as MoEParams (None: no experts)."""
    return MoEParams(**dict(self.moe)) if self.moe else None

  @property
  def kernel_block_sizes_dict(self) -> dict[str, dict[str, Any]]:
    """kernel_block_sizes as {kernel: {field: value}}."""
    return {name: dict(fields) for name, fields in self.kernel_block_sizes}

  def layer_attention(self, layer_index: int) -> str:
    """The attention kind of layer `layer_index` (see sparse_layers)."""
    if self.sparse_layers is None or layer_index in self.sparse_layers:
      return self.attention
    return registry.dense_twin(self.attention)

  def for_layer(self, layer_index: int) -> ModelConfig:
    """The config a layer is built from: this one, or for a layer outside
    sparse_layers its dense twin's (attention_params it takes, kept)."""
    kind = self.layer_attention(layer_index)
    if kind == self.attention:
      return self
    keep = set(registry.get(kind).param_names)
    return dataclasses.replace(
      self,
      attention=kind,
      attention_params={
        k: v for k, v in self.attention_kwargs.items() if k in keep
      },
      sparse_layers=None,
    )

  def with_attention(self, kind: str, **params: Any) -> ModelConfig:
    """This config with attention `kind` and its parameters `params`.

    Parameters that are config fields of the kind (DSA: top_k, indexer_heads,
    indexer_dim, indexer_rope_dim) set those fields; parameters equal to the
    kind's defaults are dropped; the rest go to attention_params. Accepts
    the dicts `sparse_attn.budgets.match_budget` returns.
    """
    spec = registry.get(kind)
    spec.make_params(**params)  # validates names and values
    fields = {k: v for k, v in params.items() if k in spec.config_fields}
    defaults = spec.defaults
    extra = {
      k: v
      for k, v in params.items()
      if k not in spec.config_fields and (k not in defaults or defaults[k] != v)
    }
    return dataclasses.replace(
      self, attention=kind, attention_params=extra, **fields
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Data, stages, optimiser, mesh, checkpointing and logging."""

  # "text", a synthetic task of sparse_attn.data ("mqar", "passkey", ...),
  # or a mixture of them: "text+passkey" / "text:2+passkey:1" (per row).
  dataset: str = "text"
  # Task options per dataset name, {"passkey": {"num_digits": 5}} (a dict
  # in JSON, stored as sorted pairs); tasks not named use their defaults.
  dataset_options: Any = ()
  data_path: str | None = None  # text only; None = Python stdlib sources
  max_bytes: int | None = 4_000_000  # text train split prefix
  eval_max_bytes: int | None = 1_000_000  # text validation split prefix
  seq_len: int = 128
  batch_size: int = 16  # global batch
  seed: int = 0
  warmup_stage_steps: int = 30  # stage 1: dense warm-up, indexer only
  sparse_stage_steps: int = 200  # stage 2: sparse, everything trains
  lr: float = 3e-3  # main model peak learning rate
  indexer_lr: float = 3e-3  # indexer peak learning rate (both stages)
  lr_warmup_steps: int = 20  # linear LR warm-up of each schedule
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
  weight_decay: float = 0.1  # AdamW, matrices only
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0  # global-norm clipping (per parameter group)
  indexer_loss_scale: float = 1.0
  # (data, fsdp, tensor) or (data, fsdp, tensor, context); None: pure data
  # parallelism. context > 1 shards the sequence (context parallelism,
  # docs/context_parallel.md) with the three context_* choices below.
  mesh_shape: tuple[int, ...] | None = None
  context_layout: str = "zigzag"  # or "contiguous"
  context_strategy: str = "fetch"  # sparse attention: or "all_gather"
  context_dense_strategy: str = "ring"  # dense / warm-up: or "all_gather"
  checkpoint_every: int = 100  # 0 disables periodic checkpoints
  keep_checkpoints: int = 2
  async_checkpointing: bool = True
  eval_every: int = 100  # 0: evaluate only at the end
  eval_batches: int = 4
  log_every: int = 10

  def __post_init__(self):
    try:  # one spelling per spec (validate reports a bad one)
      object.__setattr__(self, "dataset", canonical(self.dataset))
    except ValueError:
      pass
    object.__setattr__(
      self,
      "dataset_options",
      _nested_pairs(
        "train.dataset_options",
        self.dataset_options,
        "dataset name -> dict of task options",
      ),
    )

  @property
  def dataset_options_dict(self) -> dict[str, dict[str, Any]]:
    """dataset_options as {dataset name: {option: value}}."""
    return {name: dict(opts) for name, opts in self.dataset_options}

  @property
  def total_steps(self) -> int:
    return self.warmup_stage_steps + self.sparse_stage_steps


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  name: str = "tiny"

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["model"]["attention_params"] = self.model.attention_kwargs
    d["model"]["rope_scaling"] = dict(self.model.rope_scaling)
    d["model"]["moe"] = dict(self.model.moe)
    d["model"]["kernel_block_sizes"] = self.model.kernel_block_sizes_dict
    d["train"]["dataset_options"] = self.train.dataset_options_dict
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Config:
    d = dict(d)
    unknown = set(d) - {"model", "train", "name"}
    if unknown:
      raise ValueError(f"unknown config sections {sorted(unknown)}.")
    return cls(
      model=_build(ModelConfig, d.get("model", {}), "model"),
      train=_build(TrainConfig, d.get("train", {}), "train"),
      name=d.get("name", "run"),
    )

  @classmethod
  def from_json(cls, text: str) -> Config:
    return cls.from_dict(json.loads(text))

  def replace(self, **changes) -> Config:
    return override(self, **changes)

  def resolved(self) -> Config:
    """Folds the warm-up stage into the main stage for kinds without an indexer."""
    t = self.train
    if t.warmup_stage_steps and not registry.has_indexer(self.model.attention):
      t = dataclasses.replace(
        t, warmup_stage_steps=0, sparse_stage_steps=t.total_steps
      )
    return dataclasses.replace(self, train=t)


def _dataset_errors(t: TrainConfig) -> list[str]:
  try:
    names = [
      n
      for n, _ in check_dataset(
        t.dataset,
        seq_len=t.seq_len,
        options=t.dataset_options_dict,
        has_path=t.data_path is not None,
      )
    ]
  except (ValueError, TypeError) as e:
    return [f"train.dataset: {e}"]
  if "text" in names and t.data_path is not None:
    if not os.path.exists(t.data_path):
      return [f"train.data_path {t.data_path!r} does not exist"]
  return []


def _build(cls, d: dict[str, Any], section: str):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ValueError(
      f"unknown {section} config fields {sorted(unknown)}; "
      f"known: {sorted(names)}."
    )
  d = dict(d)
  if d.get("mesh_shape") is not None:
    d["mesh_shape"] = tuple(d["mesh_shape"])
  return cls(**d)


def override(cfg: Config, *assignments: str, **changes: Any) -> Config:
  """Returns cfg with "section.field=value" assignments / keyword changes.

  Keys are "model.<field>", "train.<field>" or "name"; string values are
  parsed as JSON when possible ("3e-4" -> 3e-4, "null" -> None,
  "[2,2,2]" -> (2, 2, 2)), else kept as strings.
  """
  items = dict(changes)
  for a in assignments:
    if "=" not in a:
      raise ValueError(f"override {a!r} must look like section.field=value.")
    key, value = a.split("=", 1)
    try:
      items[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      items[key.strip()] = value
  d = cfg.to_dict()
  for key, value in items.items():
    if key == "name":
      d["name"] = value
      continue
    section, _, field = key.partition(".")
    if section not in ("model", "train") or field not in d[section]:
      raise ValueError(f"unknown config field {key!r}.")
    d[section][field] = value
  return Config.from_dict(d)


def _positive(errors, where, **values):
  for k, v in values.items():
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      errors.append(f"{where}.{k} must be a positive integer, got {v!r}")


def _context_errors(cfg: Config, context: int) -> list[str]:
  """What context parallelism over `context` shards needs of the config."""
  t, errors = cfg.train, []
  choices = (
    ("context_layout", ("zigzag", "contiguous")),
    ("context_strategy", ("fetch", "all_gather")),
    ("context_dense_strategy", ("ring", "all_gather")),
  )
  for k, allowed in choices:
    if getattr(t, k) not in allowed:
      errors.append(
        f"train.{k} must be one of {allowed}, got {getattr(t, k)!r}"
      )
  if context == 1 or errors:
    return errors
  chunks = context * (2 if t.context_layout == "zigzag" else 1)
  if isinstance(t.seq_len, int) and t.seq_len % chunks:
    errors.append(
      f"train.seq_len={t.seq_len} must be divisible by {chunks} (context="
      f"{context} shards x {chunks // context} chunks of the "
      f"{t.context_layout!r} layout)"
    )
  m = cfg.model
  if m.attention in registry.names():
    for i in range(m.num_layers if isinstance(m.num_layers, int) else 0):
      kind = m.layer_attention(i)
      layer = registry.get(kind).layer
      if not getattr(layer, "supports_context_parallel", False):
        errors.append(
          f"model.attention={kind!r} (layer {i}) does not support context "
          f"parallelism (mesh context={context}); supported: dense, dsa, "
          f"mla, mla_dsa"
        )
        break
      kw = m.attention_kwargs
      if (
        kw.get("indexer_layers") is not None or kw.get("indexer_every", 1) != 1
      ):
        errors.append(
          f"top-k reuse across layers (attention={kind!r}, indexer_layers / "
          f"indexer_every) does not run with context parallelism (mesh "
          f"context={context}): use context=1"
        )
        break
      if m.attention_kwargs.get("hisa_block_size") is not None:
        errors.append(
          f"model.attention_params hisa_block_size (HISA's hierarchical "
          f"top-k) does not run with context parallelism (mesh context="
          f"{context}): leave it unset or use context=1"
        )
        break
  return errors


def validate(cfg: Config, num_devices: int | None = None) -> Config:
  """Raises ValueError listing every problem found; returns cfg.resolved().

  num_devices: devices the run will use (default: all of jax.devices()),
  checked against train.mesh_shape and the batch size.
  """
  m, t = cfg.model, cfg.train
  errors: list[str] = []
  _positive(
    errors,
    "model",
    vocab_size=m.vocab_size,
    embed_dim=m.embed_dim,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads,
    head_dim=m.head_dim,
    mlp_dim=m.mlp_dim,
    indexer_heads=m.indexer_heads,
    indexer_dim=m.indexer_dim,
  )
  if m.attention not in registry.names():
    errors.append(
      f"model.attention must be one of {list(registry.names())}, "
      f"got {m.attention!r}"
    )
  else:
    try:
      registry.get(m.attention).params_from_config(m)
    except ValueError as e:
      errors.append(f"model.attention_params: {e}")
  if m.sparse_layers is not None and isinstance(m.num_layers, int):
    outside = [i for i in m.sparse_layers if not 0 <= i < m.num_layers]
    if outside:
      errors.append(
        f"model.sparse_layers {outside} are not layers of a "
        f"{m.num_layers}-layer model"
      )
    if m.attention in registry.names():
      try:
        registry.dense_twin(m.attention)
      except ValueError as e:
        errors.append(f"model.sparse_layers: {e}")
  try:
    _ = m.rope_scaling_config
  except ValueError as e:
    errors.append(f"model.rope_scaling: {e}")
  try:
    moe = m.moe_config
  except (TypeError, ValueError) as e:
    errors.append(f"model.moe: {e}")
  else:
    if moe is not None and moe.first_dense_layers > m.num_layers:
      errors.append(
        f"model.moe first_dense_layers={moe.first_dense_layers} exceeds "
        f"model.num_layers={m.num_layers}"
      )
  for name, fields in m.kernel_block_sizes_dict.items():
    if name not in KERNELS:
      errors.append(
        f"model.kernel_block_sizes: unknown kernel {name!r}; "
        f"known: {list(KERNELS)}"
      )
      continue
    try:
      dispatch.block_sizes(name, fields, f"model.kernel_block_sizes[{name!r}]")
    except ValueError as e:
      errors.append(str(e))
  if not isinstance(m.top_k, int) or m.top_k < 1:
    errors.append(f"model.top_k must be >= 1, got {m.top_k!r}")
  if (
    isinstance(m.num_kv_heads, int)
    and m.num_kv_heads >= 1
    and isinstance(m.num_heads, int)
    and m.num_heads % m.num_kv_heads
  ):
    errors.append(
      f"model.num_heads={m.num_heads} must be divisible by "
      f"model.num_kv_heads={m.num_kv_heads}"
    )
  if isinstance(m.head_dim, int) and m.head_dim % 2:
    errors.append(f"model.head_dim must be even (RoPE), got {m.head_dim}")
  if m.indexer_rope_dim is not None and (
    m.indexer_rope_dim % 2 or not 0 <= m.indexer_rope_dim <= m.indexer_dim
  ):
    errors.append(
      f"model.indexer_rope_dim must be even and in [0, "
      f"indexer_dim={m.indexer_dim}], got {m.indexer_rope_dim}"
    )
  if m.implementation not in (None, "xla", "pallas"):
    errors.append(
      f"model.implementation must be None, 'xla' or 'pallas', got "
      f"{m.implementation!r}"
    )
  for k in ("dtype", "param_dtype"):
    if getattr(m, k) not in _DTYPES:
      errors.append(
        f"model.{k} must be one of {_DTYPES}, got {getattr(m, k)!r}"
      )
  _positive(
    errors,
    "train",
    seq_len=t.seq_len,
    batch_size=t.batch_size,
    eval_batches=t.eval_batches,
    log_every=t.log_every,
    keep_checkpoints=t.keep_checkpoints,
  )
  for k in (
    "warmup_stage_steps",
    "sparse_stage_steps",
    "lr_warmup_steps",
    "checkpoint_every",
    "eval_every",
    "seed",
  ):
    v = getattr(t, k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      errors.append(f"train.{k} must be an integer >= 0, got {v!r}")
  if not errors and t.total_steps < 1:
    errors.append(
      "train.warmup_stage_steps + train.sparse_stage_steps must be "
      ">= 1 (both stages are empty)"
    )
  for k in ("lr", "indexer_lr"):
    if not getattr(t, k) > 0:
      errors.append(f"train.{k} must be > 0, got {getattr(t, k)!r}")
  if not 0 <= t.min_lr_ratio <= 1:
    errors.append(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
  errors += _dataset_errors(t)
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top

    num_devices = jax.device_count()
  mesh = t.mesh_shape if t.mesh_shape is not None else (num_devices, 1, 1)
  if len(mesh) not in (3, 4) or any(
    not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in mesh
  ):
    errors.append(
      f"train.mesh_shape must be 3 or 4 positive ints (data, fsdp, "
      f"tensor[, context]), got {mesh!r}"
    )
  else:
    n = math.prod(mesh)
    if n != num_devices:
      errors.append(
        f"train.mesh_shape {tuple(mesh)} has {n} devices but "
        f"{num_devices} are available"
      )
    if isinstance(t.batch_size, int) and t.batch_size % (mesh[0] * mesh[1]):
      errors.append(
        f"train.batch_size={t.batch_size} must be divisible by "
        f"data*fsdp={mesh[0] * mesh[1]} of mesh {tuple(mesh)}"
      )
    errors += _context_errors(cfg, mesh[3] if len(mesh) == 4 else 1)
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))
  return cfg.resolved()


# ---------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------


def tiny() -> Config:
  """0.47M params (0.43M main + 42K indexer), T=128, top-k 32: a 2-core CPU."""
  return Config(name="tiny")


def small() -> Config:
  """26.7M params (24.3M main + 2.4M indexer), T=2048, top-k 256: one accelerator."""
  return Config(
    name="small",
    model=ModelConfig(
      embed_dim=512,
      num_layers=8,
      num_heads=8,
      num_kv_heads=2,
      head_dim=64,
      mlp_dim=1536,
      top_k=256,
      indexer_heads=8,
      indexer_dim=64,
    ),
    train=TrainConfig(
      seq_len=2048,
      batch_size=32,
      max_bytes=None,
      eval_max_bytes=None,
      warmup_stage_steps=500,
      sparse_stage_steps=20_000,
      lr=1e-3,
      indexer_lr=1e-3,
      lr_warmup_steps=500,
      checkpoint_every=1000,
      eval_every=1000,
      eval_batches=16,
      log_every=50,
    ),
  )


def base() -> Config:
  """85.9M params (75.7M main + 10.2M indexer), T=4096, top-k 512: e.g. 8 chips."""
  return Config(
    name="base",
    model=ModelConfig(
      embed_dim=768,
      num_layers=12,
      num_heads=12,
      num_kv_heads=4,
      head_dim=64,
      mlp_dim=2048,
      top_k=512,
      indexer_heads=16,
      indexer_dim=64,
      dtype="bfloat16",
    ),
    train=TrainConfig(
      seq_len=4096,
      batch_size=64,
      max_bytes=None,
      eval_max_bytes=None,
      warmup_stage_steps=1000,
      sparse_stage_steps=50_000,
      lr=6e-4,
      indexer_lr=1e-3,
      lr_warmup_steps=1000,
      checkpoint_every=2000,
      eval_every=2000,
      eval_batches=32,
      log_every=100,
    ),
  )


PRESETS = {"tiny": tiny, "small": small, "base": base}


# ---------------------------------------------------------------------------
# the deepseek_v32 family: MLA + DSA on the query latent, DeepSeek MoE
# ---------------------------------------------------------------------------


def _deepseek_v32_model(**changes: Any) -> ModelConfig:
  """DeepSeek-V3.2's architecture (HF DeepseekV32Config) at a given size."""
  d: dict[str, Any] = dict(
    attention="mla_dsa",
    num_kv_heads=4,
    num_heads=4,
    head_dim=32,  # qk_nope + qk_rope (MLA's own sizes are attention_params)
    scale_embeddings=False,
    tie_embeddings=False,
    indexer_rope_dim=16,
  )
  d.update(changes)
  return ModelConfig(**d)


def deepseek_v32_tiny() -> Config:
  """0.48M params (0.46M main + 26K indexer), T=128, top-k 32: a 2-core CPU.

  2 blocks (a dense SwiGLU, then MoE: 8 experts of 64 in 2 groups, top-2
  from 1 group, a shared expert), MLA with q LoRA 64, kv LoRA 32, 16 + 16
  qk dims, 16 v dims; the indexer (4 heads of 32) reads the q latent.
  """
  return Config(
    name="deepseek_v32_tiny",
    model=_deepseek_v32_model(
      embed_dim=128,
      num_layers=2,
      mlp_dim=256,
      top_k=32,
      indexer_heads=4,
      indexer_dim=32,
      attention_params={
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
      },
      moe={
        "num_experts": 8,
        "experts_per_token": 2,
        "expert_dim": 64,
        "num_shared_experts": 1,
        "num_groups": 2,
        "groups_per_token": 1,
        "routed_scaling_factor": 1.0,
        "first_dense_layers": 1,
      },
    ),
  )


def deepseek_v32_small() -> Config:
  """99.3M params (97.9M main + 1.3M indexer), T=2048, top-k 256: one accelerator.

  8 blocks (1 dense, 7 MoE: 32 experts of 256 in 4 groups, top-4 from 2
  groups, a shared expert, routed_scaling_factor 2.5), MLA with q LoRA 256,
  kv LoRA 128, 32 + 32 qk dims, 32 v dims, 8 heads; the indexer has 8 heads
  of 64 (32 with RoPE), YaRN x4 over a 512-token original context.
  """
  cfg = small()
  return Config(
    name="deepseek_v32_small",
    model=_deepseek_v32_model(
      embed_dim=512,
      num_layers=8,
      num_heads=8,
      num_kv_heads=8,
      head_dim=64,
      mlp_dim=1536,
      top_k=256,
      indexer_heads=8,
      indexer_dim=64,
      indexer_rope_dim=32,
      attention_params={
        "q_lora_rank": 256,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 32,
        "v_head_dim": 32,
      },
      moe={
        "num_experts": 32,
        "experts_per_token": 4,
        "expert_dim": 256,
        "num_shared_experts": 1,
        "num_groups": 4,
        "groups_per_token": 2,
        "routed_scaling_factor": 2.5,
        "first_dense_layers": 1,
      },
      rope_scaling={
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
      },
    ),
    train=cfg.train,
  )


DEEPSEEK_V32_PRESETS = {"tiny": deepseek_v32_tiny, "small": deepseek_v32_small}
#: model family -> its presets (`experiments/train.py --model ... --preset ...`).
MODELS = {"transformer": PRESETS, "deepseek_v32": DEEPSEEK_V32_PRESETS}


def preset(name: str, model: str = "transformer") -> Config:
  """Preset `name` of model family `model` ("transformer", "deepseek_v32")."""
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}.")
  table = MODELS[model]
  if name not in table:
    raise ValueError(
      f"unknown preset {name!r} of model {model!r}; known: {sorted(table)}."
    )
  return table[name]()
