"""config.json fields every HF format spells the same way.

RoPE: transformers 5 writes `rope_parameters` ({"rope_theta", "rope_type",
and the scaling's own fields}); older files and DeepSeek's release write
`rope_theta` + `rope_scaling`. Both are read; `rope_parameters` is written.
"""

from __future__ import annotations

from typing import Any

from sparse_attn.config import ModelConfig
from sparse_attn.ops.rope import RopeScaling


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) of a config.json dict (theta default 10000)."""
  params = hf.get("rope_parameters") or {}
  legacy = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = RopeScaling.from_dict(
    params or legacy, max_position_embeddings=hf.get("max_position_embeddings")
  )
  return float(theta), scaling


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The `rope_parameters` dict of cfg's RoPE base and scaling."""
  rope: dict[str, Any] = {"rope_theta": cfg.rope_base, "rope_type": "default"}
  scaling = cfg.rope_scaling_config
  if scaling is not None:
    rope.update(scaling.to_dict())
  return rope


def require(model_type: str, hf: dict[str, Any], *names: str) -> None:
  """ValueError naming the fields of `names` that config.json lacks."""
  missing = [n for n in names if hf.get(n) is None]
  if missing:
    raise ValueError(f"config.json of {model_type} lacks the fields {missing}.")
