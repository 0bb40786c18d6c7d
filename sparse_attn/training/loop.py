"""`train`: a whole run of both stages, logged, evaluated, checkpointed.

Run directory layout:
  <run_dir>/config.json          the resolved Config
  <run_dir>/checkpoints/<step>/  orbax checkpoints (keep-last-N, async)
  <run_dir>/metrics.jsonl        one JSON object per log/eval event
  <run_dir>/tensorboard/         if tensorboardX (or torch) is installed
Data is a pure function of the step, so resuming from the latest checkpoint
continues a killed run exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_attn import registry
from sparse_attn import sharding as shd
from sparse_attn.config import Config
from sparse_attn.training.checkpoints import (
  check_saved_config,
  checkpoint_manager,
  restore_state,
  save_state,
)
from sparse_attn.training.evaluation import evaluate
from sparse_attn.training.loader import make_datasets
from sparse_attn.training.metrics import MetricsLogger, fmt_tokens, host_metrics
from sparse_attn.training.stages import StageRunner, stage_of
from sparse_attn.training.state import Setup, init_state, setup
from sparse_attn.training.steps import STAGE_MODE, make_eval_step
from sparse_attn.training.transfer import init_from


@dataclasses.dataclass
class TrainResult:
  setup: Setup
  state: Any
  final_eval: Mapping[str, float | str] | None  # None: no evaluation ran
  history: list[dict[str, Any]]  # the train records logged by this process
  resumed_from: int | None


def _open_run_dir(
  run_dir: str, cfg: Config, resume: bool, lead: bool
) -> ocp.CheckpointManager:
  """Checkpoint manager of run_dir, after checking or starting it over.

  resume: a run_dir with checkpoints must hold the same model. Not resume:
  its checkpoints and metrics are dropped. The config is (re)written last,
  atomically, by process 0.
  """
  os.makedirs(run_dir, exist_ok=True)
  cfg_path = os.path.join(run_dir, "config.json")
  mngr = checkpoint_manager(run_dir, cfg)
  if resume and mngr.latest_step() is not None and os.path.exists(cfg_path):
    check_saved_config(run_dir, cfg)
  if not resume:
    for old_step in mngr.all_steps():
      mngr.delete(old_step)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if lead and os.path.exists(metrics_path):
      os.remove(metrics_path)
  if lead:
    tmp = cfg_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(cfg.to_json())
    os.replace(tmp, cfg_path)
  return mngr


def _log_start(logger: MetricsLogger, s: Setup, has_idx: bool) -> None:
  cfg, t = s.cfg, s.cfg.train
  counts = {
    k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
    for k, v in s.abstract_state["params"].items()
  }
  logger.write(
    {
      "event": "start",
      "name": cfg.name,
      "attention": cfg.model.attention,
      "top_k": cfg.model.top_k,
      "params": counts,
      "mesh": dict(s.mesh.shape),
      "processes": jax.process_count(),
      "warmup_stage_steps": t.warmup_stage_steps,
      "sparse_stage_steps": t.sparse_stage_steps,
    },
    f"{cfg.name}: attention={cfg.model.attention}"
    f"{f' top_k={cfg.model.top_k}' if has_idx else ''} params="
    f"{counts['main'] + counts['indexer']:,} (indexer "
    f"{counts['indexer']:,}) mesh={dict(s.mesh.shape)} steps="
    f"{t.warmup_stage_steps} warm-up + {t.sparse_stage_steps} "
    f"sparse",
  )


def _eta(timed_from: tuple[int, float], done: int, now: float, end: int):
  """' eta 1m05s' to step `end` (the end of the current stage: the stages
  differ in step time) from the mean step time since the last compile."""
  step0, t0 = timed_from
  if done <= step0 or done >= end:
    return ""
  left = (now - t0) / (done - step0) * (end - done)
  return f" eta {int(left // 60)}m{int(left % 60):02d}s"


def train(
  cfg: Config,
  run_dir: str | None = None,
  *,
  resume: bool = True,
  devices=None,
  echo: Callable[[str], None] | None = print,
  final_eval: bool = True,
  init_params: Mapping[str, Any] | None = None,
) -> TrainResult:
  """Runs (or resumes) both stages; returns the final state and evaluation.

  run_dir None: no checkpoints and no files (metrics only in the result).
  resume: continue from the latest checkpoint in run_dir if there is one.
  init_params: {"main": ..., "indexer": ...} (either or both), the starting
    parameters of a fresh run (e.g. a pretrained model's, split with
    `models.MAIN` / `models.INDEXER`); every leaf of a given group must
    match the model's (ValueError naming those that do not). A resumed run
    ignores them: its checkpoint holds the state.
  """
  s = setup(cfg, devices)
  cfg, t = s.cfg, s.cfg.train
  lead = jax.process_index() == 0
  train_ds, eval_ds = make_datasets(cfg)  # bad data options fail first
  mngr = None if run_dir is None else _open_run_dir(run_dir, cfg, resume, lead)
  logger = MetricsLogger(run_dir, lead, echo)

  resumed_from = mngr.latest_step() if resume and mngr is not None else None
  if mngr is not None and resumed_from is not None:
    state = restore_state(mngr, s, resumed_from)
    logger.write(
      {"event": "resume", "step": resumed_from},
      f"resumed from checkpoint at step {resumed_from}",
    )
  else:
    state = init_state(s)
    for group, params in (init_params or {}).items():
      state, moved = init_from(
        state,
        params,
        group,
        repeat=registry.get(cfg.model.attention).dense_copies,
      )
      if moved.kept:
        raise ValueError(
          f"init_params[{group!r}] has no leaf of the model's path, shape "
          f"and dtype for {list(moved.kept)[:8]} ({len(moved.kept)} leaves)."
        )
  start = int(shd.to_host(state["step"]))

  has_idx = registry.has_indexer(cfg.model.attention)
  if start == 0:
    _log_start(logger, s, has_idx)

  evals: dict[str, Any] = {}
  history = []
  total = t.total_steps
  tick, tokens = time.perf_counter(), 0.0
  timed_from = (start, tick)  # (step, time) after the last compile

  def label(stage):  # kinds without an indexer have a single plain stage
    return stage if has_idx else "train"

  def run_eval(step_done, stage):
    mode = STAGE_MODE[stage]
    if mode not in evals:
      evals[mode] = make_eval_step(s, mode)
    ev = evaluate(s, state, eval_ds, mode, eval_step=evals[mode])
    rec = {"event": "eval", "step": step_done, "stage": label(stage), **ev}
    kl = f" kl {ev['indexer_kl']:.4f}" if has_idx else ""
    logger.write(
      rec,
      f"  eval @ {step_done}: loss {ev['loss']:.4f}{kl}"
      f" attended {ev['attended_fraction']:.3f}",
    )
    return ev

  last_eval = None
  prev_stage = None
  try:
    for r in StageRunner(s, train_ds).steps(state, start, total):
      state, done, stage = r.state, r.step, r.stage
      tokens += t.batch_size * t.seq_len
      # The first step of each stage after (re)start compiles its step
      # function: it is logged without a rate and the rate and the ETA
      # restart after it, so compile time never counts as training time.
      compiled = stage != prev_stage
      prev_stage = stage
      stage_end = done == total or (
        stage == "warmup" and done == t.warmup_stage_steps
      )
      if done % t.log_every == 0 or stage_end or compiled:
        m = host_metrics(r.metrics)
        now = time.perf_counter()
        tps = None if compiled else tokens / max(now - tick, 1e-9)
        tick, tokens = now, 0.0
        if compiled:
          timed_from = (done, now)
        eta = _eta(
          timed_from,
          done,
          now,
          t.warmup_stage_steps if stage == "warmup" else total,
        )
        rec = {
          "event": "train",
          "step": done,
          "stage": label(stage),
          "attention": cfg.model.attention,
          "top_k": cfg.model.top_k,
          "tokens_per_s": tps,
          **m,
        }
        history.append(rec)
        lr = m.get("lr_main", m.get("lr_indexer", 0.0))
        kl = f" kl {m['indexer_kl']:.4f}" if has_idx else ""
        logger.write(
          rec,
          f"[{cfg.model.attention}:{label(stage)}] {done}/{total} "
          f"loss {m['loss']:.4f}{kl}"
          f" attended {m['attended_fraction']:.3f} lr {lr:.2e}"
          f"{f' {fmt_tokens(tps)} tok/s' if tps else ' (compiled)'}"
          f"{eta}",
        )
      if t.eval_every and done % t.eval_every == 0 and done != total:
        jax.block_until_ready(r.metrics)  # queued steps are training time
        paused = time.perf_counter()
        last_eval = run_eval(done, stage)
        # Evaluation time is not training time: the rate and ETA skip it.
        paused = time.perf_counter() - paused
        tick += paused
        timed_from = (timed_from[0], timed_from[1] + paused)
      if (
        mngr is not None
        and t.checkpoint_every
        and (done % t.checkpoint_every == 0)
        and done != total
      ):
        save_state(mngr, done, state)
    if mngr is not None and total > start:
      save_state(mngr, total, state, force=True)
    if final_eval:
      last_eval = run_eval(total, stage_of(cfg, total - 1))
  finally:
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
    logger.close()
  return TrainResult(s, state, last_eval, history, resumed_from)
