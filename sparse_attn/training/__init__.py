"""Two-stage DSA training: jit over a (data, fsdp, tensor) mesh, optax, orbax.

Stages (DeepSeek-V3.2-Exp):
  1. dense warm-up (`warmup_stage_steps`): the model runs mode="warmup"
     (dense attention + dense indexer KL) and only the indexer trains.
  2. sparse stage (`sparse_stage_steps`): mode="sparse" (top-k attention +
     sparse KL); both parameter groups train on LM + scale * KL.
Kinds without an indexer ("dense", ...) run stage 2 only (Config.resolved).

  optimizer     lr_schedule, schedules, make_optimizer (one AdamW per group)
  state         Setup, setup, init_state, merge_model, state_structs
  steps         STAGE_MODE, make_loss_fn, make_train_step, make_eval_step
  loader        make_datasets, global_batch, BatchLoader (global batches)
  stages        StageRunner, run_stages, stage_of: the loop over both stages
  transfer      transfer_params, init_from: a dense model's parameters into
                a new kind's state
  evaluation    evaluate
  checkpoints   checkpoint_manager, save_state, restore_state,
                saved_metadata, load_checkpoint
  metrics       MetricsLogger (JSONL + TensorBoard), read_metrics
  loop          train, TrainResult: a whole run (logging, eval, checkpoints,
                resumption)
  distributed   init_distributed
"""

from sparse_attn.training.checkpoints import (
  check_saved_config,
  checkpoint_manager,
  load_checkpoint,
  read_config,
  restore_state,
  save_state,
  saved_metadata,
)
from sparse_attn.training.distributed import init_distributed
from sparse_attn.training.evaluation import evaluate
from sparse_attn.training.loader import BatchLoader, global_batch, make_datasets
from sparse_attn.training.loop import TrainResult, train
from sparse_attn.training.metrics import (
  MetricsLogger,
  host_metrics,
  read_metrics,
)
from sparse_attn.training.optimizer import (
  lr_schedule,
  make_optimizer,
  schedules,
)
from sparse_attn.training.stages import (
  StageRunner,
  StepResult,
  run_stages,
  stage_of,
)
from sparse_attn.training.state import (
  Setup,
  init_state,
  merge_model,
  setup,
  state_structs,
)
from sparse_attn.training.steps import (
  STAGE_MODE,
  make_eval_step,
  make_loss_fn,
  make_train_step,
)
from sparse_attn.training.transfer import Transfer, init_from, transfer_params

__all__ = [
  "BatchLoader",
  "MetricsLogger",
  "STAGE_MODE",
  "Setup",
  "StageRunner",
  "StepResult",
  "TrainResult",
  "Transfer",
  "check_saved_config",
  "checkpoint_manager",
  "evaluate",
  "global_batch",
  "host_metrics",
  "init_distributed",
  "init_from",
  "init_state",
  "load_checkpoint",
  "lr_schedule",
  "make_datasets",
  "make_eval_step",
  "make_loss_fn",
  "make_optimizer",
  "make_train_step",
  "merge_model",
  "read_config",
  "read_metrics",
  "restore_state",
  "run_stages",
  "save_state",
  "saved_metadata",
  "schedules",
  "setup",
  "stage_of",
  "state_structs",
  "train",
  "transfer_params",
]
