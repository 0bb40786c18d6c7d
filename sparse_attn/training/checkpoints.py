"""Orbax checkpoints of a run and the config they belong to.

<run_dir>/config.json          the resolved Config
<run_dir>/checkpoints/<step>/  the whole state (keep-last-N, optionally async)
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from sparse_attn.config import Config
from sparse_attn.training.state import Setup, setup, state_structs


def checkpoint_manager(run_dir: str, cfg: Config) -> ocp.CheckpointManager:
  """The manager of <run_dir>/checkpoints (created if missing); close it."""
  t = cfg.train
  options = ocp.CheckpointManagerOptions(
    max_to_keep=t.keep_checkpoints,
    create=True,
    enable_async_checkpointing=t.async_checkpointing,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options
  )


def save_state(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  *,
  force: bool = False,
  metadata: dict[str, Any] | None = None,
) -> None:
  """Saves the whole state as `step` (asynchronously if mngr is); metadata:
  JSON-able values kept with the step (`saved_metadata` reads them)."""
  mngr.save(
    step,
    args=ocp.args.StandardSave(state),
    force=force,
    custom_metadata=metadata,
  )


def saved_metadata(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The metadata save_state kept with `step` ({} if none)."""
  return dict(mngr.metadata(step).custom_metadata or {})


def restore_state(mngr: ocp.CheckpointManager, s: Setup, step: int) -> Any:
  """The state saved at `step`, restored straight into s's shardings."""
  return mngr.restore(step, args=ocp.args.StandardRestore(state_structs(s)))


def read_config(run_dir: str) -> Config:
  """The Config saved in <run_dir>/config.json."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    return Config.from_json(f.read())


def check_saved_config(run_dir: str, cfg: Config) -> None:
  """ValueError if run_dir's config.json describes another model than cfg's."""
  saved = read_config(run_dir)
  if saved.model != cfg.model:
    diff = {
      k: (getattr(saved.model, k), getattr(cfg.model, k))
      for k in cfg.model.__dataclass_fields__
      if getattr(saved.model, k) != getattr(cfg.model, k)
    }
    raise ValueError(
      f"run directory {run_dir!r} holds checkpoints of a "
      f"different model (saved vs now: {diff}); use a new run "
      f"directory or --no-resume."
    )


def load_checkpoint(
  run_dir: str, step: int | None = None, devices=None
) -> tuple[Setup, Any]:
  """(Setup, state) restored from run_dir (latest step by default)."""
  cfg = read_config(run_dir)
  s = setup(cfg, devices)
  mngr = checkpoint_manager(run_dir, cfg)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {run_dir!r}.")
    state = restore_state(mngr, s, step)
  finally:
    mngr.close()
  return s, state
