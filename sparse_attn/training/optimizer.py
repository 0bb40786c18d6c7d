"""The optimisers: one AdamW per parameter group (indexer, main model).

Each has its own peak learning rate and warm-up + cosine schedule, indexed by
that group's own update count, and clips its gradients by global norm.
"""

from __future__ import annotations

import jax
import optax

from sparse_attn.config import Config, TrainConfig


def lr_schedule(
  peak: float, total_steps: int, cfg_train: TrainConfig
) -> optax.Schedule:
  """Linear warm-up to `peak`, then cosine decay to peak * min_lr_ratio.

  Update n (0-based) uses the value at n + 1, so the first update already
  moves the parameters (peak / lr_warmup_steps) and the last ends the decay.
  """
  total = max(int(total_steps), 1)
  warm = min(cfg_train.lr_warmup_steps, max(total - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warm else peak,
    peak_value=peak,
    warmup_steps=warm,
    decay_steps=total,
    end_value=peak * cfg_train.min_lr_ratio,
  )
  return lambda count: base(count + 1)


def schedules(cfg: Config) -> dict[str, optax.Schedule]:
  """Per-group schedules, indexed by that group's own update count.

  The indexer updates in both stages (total_steps updates); the main model
  only in the sparse stage (sparse_stage_steps updates).
  """
  t = cfg.train
  return {
    "indexer": lr_schedule(t.indexer_lr, t.total_steps, t),
    "main": lr_schedule(t.lr, t.sparse_stage_steps, t),
  }


def _decay_mask(params):
  # Weight decay on matrices only: norms' scales and biases stay undecayed.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(
  schedule: optax.Schedule, cfg: Config
) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW at `schedule` (cfg.train's settings)."""
  t = cfg.train
  return optax.chain(
    optax.clip_by_global_norm(t.grad_clip),
    optax.adamw(
      schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=_decay_mask
    ),
  )
