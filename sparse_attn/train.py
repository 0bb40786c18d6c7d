"""Two-stage DSA training: jit over a (data, fsdp, tensor) mesh, optax, orbax.

Stages (DeepSeek-V3.2-Exp):
  1. dense warm-up (`warmup_stage_steps`): model called with mode="warmup"
     (dense attention + dense indexer KL); gradients are taken w.r.t. the
     indexer parameters only, so the main model is frozen (its optimiser
     state is not even touched).
  2. sparse stage (`sparse_stage_steps`): mode="sparse" (top-k attention +
     sparse KL); both parameter groups train on loss = LM + scale * KL.
     The layers make the two gradients disjoint: the indexer reads a
     stop-gradient input and its KL stop-grads the main q/k (so the KL never
     reaches the main model), and the LM loss sees the indexer only through
     integer top-k indices (so it never reaches the indexer).
Kinds without an indexer ("dense", ...) run stage 2 only (Config.resolved).

State (a pytree, checkpointed whole): step, rng, params {indexer, main}
(nnx.State), opt {indexer, main} (separate AdamW + warmup-cosine + clipping
per group). Data is a pure function of the step, so resuming from the latest
checkpoint continues a killed run exactly.

Run directory layout:
  <run_dir>/config.json          the resolved Config
  <run_dir>/checkpoints/<step>/  orbax checkpoints (keep-last-N, async)
  <run_dir>/metrics.jsonl        one JSON object per log/eval event
  <run_dir>/tensorboard/         if tensorboardX (or TF) is installed
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from sparse_attn import dispatch
from sparse_attn import sharding as shd
from sparse_attn.config import Config, validate
from sparse_attn.data import make_dataset
from sparse_attn.ops.losses import lm_loss
from sparse_attn import registry
from sparse_attn.models import INDEXER, MAIN, Transformer

STAGE_MODE = {"warmup": "warmup", "sparse": "sparse"}


# ---------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------

def lr_schedule(peak: float, total_steps: int, cfg_train) -> optax.Schedule:
  """Linear warm-up to `peak`, then cosine decay to peak * min_lr_ratio.

  Update n (0-based) uses the value at n + 1, so the first update already
  moves the parameters (peak / lr_warmup_steps) and the last ends the decay.
  """
  total = max(int(total_steps), 1)
  warm = min(cfg_train.lr_warmup_steps, max(total - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warm else peak, peak_value=peak, warmup_steps=warm,
      decay_steps=total, end_value=peak * cfg_train.min_lr_ratio)
  return lambda count: base(count + 1)


def schedules(cfg: Config) -> dict[str, optax.Schedule]:
  """Per-group schedules, indexed by that group's own update count.

  The indexer updates in both stages (total_steps updates); the main model
  only in the sparse stage (sparse_stage_steps updates).
  """
  t = cfg.train
  return {"indexer": lr_schedule(t.indexer_lr, t.total_steps, t),
          "main": lr_schedule(t.lr, t.sparse_stage_steps, t)}


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(schedule: optax.Schedule, cfg: Config):
  t = cfg.train
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))


# ---------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
  """Everything static about a run: config, mesh, model graph, shardings."""
  cfg: Config
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: dict[str, Any]
  abstract_state: Any
  state_shardings: Any
  batch_sharding: Any
  init_fn: Callable[[], Any]


def setup(cfg: Config, devices=None) -> Setup:
  """Validates cfg and builds the mesh, graph, optimisers and shardings."""
  devices = list(jax.devices() if devices is None else devices)
  cfg = validate(cfg, num_devices=len(devices))
  mesh = shd.make_mesh(cfg.train.mesh_shape, devices)
  scheds = schedules(cfg)
  tx = {k: make_optimizer(s, cfg) for k, s in scheds.items()}

  def init_fn():
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))
    _, idx, main = nnx.split(model, INDEXER, MAIN)
    return {"step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(cfg.train.seed + 1),
            "params": {"indexer": idx, "main": main},
            "opt": {"indexer": tx["indexer"].init(idx),
                    "main": tx["main"].init(main)}}

  abstract_model = nnx.eval_shape(
      lambda: Transformer(cfg.model, rngs=nnx.Rngs(params=0)))
  graphdef, _, _ = nnx.split(abstract_model, INDEXER, MAIN)
  abstract_state = jax.eval_shape(init_fn)
  state_shardings = shd.tree_shardings(abstract_state, mesh)
  return Setup(cfg, mesh, graphdef, tx, abstract_state, state_shardings,
               shd.batch_sharding(mesh), init_fn)


def init_state(s: Setup):
  """Fresh state, created directly with its shardings."""
  return jax.jit(s.init_fn, out_shardings=s.state_shardings)()


def merge_model(s: Setup, state) -> Transformer:
  return nnx.merge(s.graphdef, state["params"]["indexer"],
                   state["params"]["main"])


# ---------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------

def _forward(graphdef, idx, main, batch, mode, kl_scale):
  model = nnx.merge(graphdef, idx, main)
  logits, aux = model(batch["inputs"], mode=mode)
  lm, count = lm_loss(logits, batch["targets"], batch["loss_mask"])
  total = lm + kl_scale * aux["indexer_kl"]
  return total, (lm, count, aux)


def make_loss_fn(s: Setup, mode: str):
  """loss(idx_params, main_params, batch) -> (total, (lm, count, aux))."""
  scale = s.cfg.train.indexer_loss_scale
  return lambda idx, main, batch: _forward(s.graphdef, idx, main, batch, mode,
                                           scale)


def make_train_step(s: Setup, stage: str):
  """Jitted (state, batch) -> (state, metrics); the state is donated."""
  if stage not in STAGE_MODE:
    raise ValueError(f"stage must be one of {tuple(STAGE_MODE)}, got {stage!r}.")
  loss_fn = make_loss_fn(s, STAGE_MODE[stage])
  train_main = stage == "sparse"
  scheds = schedules(s.cfg)
  warm = s.cfg.train.warmup_stage_steps

  def step(state, batch):
    params, opt = state["params"], state["opt"]
    argnums = (0, 1) if train_main else 0
    grads, (lm, count, aux) = jax.grad(loss_fn, argnums=argnums, has_aux=True)(
        params["indexer"], params["main"], batch)
    if not train_main:
      grads = (grads, None)
    new_params, new_opt, metrics = dict(params), dict(opt), {}
    for name, g in zip(("indexer", "main"), grads):
      if g is None:
        continue
      upd, new_opt[name] = s.tx[name].update(g, opt[name], params[name])
      new_params[name] = optax.apply_updates(params[name], upd)
      metrics[f"grad_norm_{name}"] = optax.tree.norm(g)
      count_ = state["step"] - (0 if name == "indexer" else warm)
      metrics[f"lr_{name}"] = scheds[name](count_)
    rng, _ = jax.random.split(state["rng"])  # per-step key (for dropout etc.)
    metrics.update(loss=lm, indexer_kl=aux["indexer_kl"],
                   attended_fraction=aux["attended_fraction"], tokens=count)
    new_state = {"step": state["step"] + 1, "rng": rng, "params": new_params,
                 "opt": new_opt}
    return new_state, metrics

  rep = shd.replicated(s.mesh)
  return _kernel_mesh(s, jax.jit(
      step, in_shardings=(s.state_shardings, s.batch_sharding),
      out_shardings=(s.state_shardings, rep), donate_argnums=0))


def _kernel_mesh(s: Setup, jitted):
  """Traces and runs `jitted` under the run's mesh when Pallas kernels are on.

  The attention functions then wrap their pallas_calls in shard_map (see
  `ops.kernel_sharding.call_kernel_sharded`); the XLA path needs no mesh context.
  The result can be called or lowered (`.lower(*abstract_args)`, for AOT).
  """
  if dispatch.resolve(s.cfg.model.implementation) != "pallas":
    return jitted
  return _UnderMesh(jitted, s.mesh)


class _UnderMesh:
  """A jitted function that is traced, lowered and run under `mesh`."""

  def __init__(self, jitted, mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def make_eval_step(s: Setup, mode: str):
  """Jitted (params, batch) -> sums for loss/KL/attended fraction."""
  loss_fn = make_loss_fn(s, mode)

  def step(params, batch):
    _, (lm, count, aux) = loss_fn(params["indexer"], params["main"], batch)
    return {"nll": lm * count, "tokens": count, "indexer_kl": aux["indexer_kl"],
            "attended_keys": aux["attended_keys"],
            "visible_keys": aux["visible_keys"]}

  return _kernel_mesh(s, jax.jit(
      step, in_shardings=(s.state_shardings["params"], s.batch_sharding),
      out_shardings=shd.replicated(s.mesh)))


class _Loader:
  """Global batches for a step: each process loads only its own rows."""

  def __init__(self, dataset, s: Setup):
    self.dataset, self.s = dataset, s
    self.bsz = s.cfg.train.batch_size
    self.shard, self.num_shards = shd.local_batch_rows(s.batch_sharding,
                                                       self.bsz)

  def _put(self, b):
    local = {"inputs": b.inputs, "targets": b.targets,
             "loss_mask": b.loss_mask}
    return shd.make_global_batch(local, self.s.batch_sharding, self.bsz)

  def train(self, step: int):
    return self._put(self.dataset.batch(step, self.bsz, shard_index=self.shard,
                                        num_shards=self.num_shards))

  def eval(self, index: int):
    return self._put(self.dataset.eval_batch(index, self.bsz,
                                             shard_index=self.shard,
                                             num_shards=self.num_shards))


def make_datasets(cfg: Config):
  t = cfg.train
  kw: dict[str, Any] = {}
  if t.dataset == "text":
    kw = dict(path=t.data_path)
  train_ds = make_dataset(t.dataset, seq_len=t.seq_len, split="train",
                          seed=t.seed, max_bytes=t.max_bytes
                          if t.dataset == "text" else None, **kw)
  eval_ds = make_dataset(t.dataset, seq_len=t.seq_len, split="validation",
                         seed=t.seed, max_bytes=t.eval_max_bytes
                         if t.dataset == "text" else None, **kw)
  return train_ds, eval_ds


def evaluate(s: Setup, state, eval_ds, mode: str, num_batches: int | None = None,
             eval_step=None) -> dict[str, float]:
  """Held-out LM loss, indexer KL (per batch, summed over layers), fraction attended."""
  eval_step = eval_step or make_eval_step(s, mode)
  loader = _Loader(eval_ds, s)
  n = s.cfg.train.eval_batches if num_batches is None else num_batches
  tot = None
  for i in range(n):
    out = {k: float(shd.to_host(v))
           for k, v in eval_step(state["params"], loader.eval(i)).items()}
    tot = out if tot is None else {k: tot[k] + out[k] for k in tot}
  return {"loss": tot["nll"] / max(tot["tokens"], 1.0),
          "indexer_kl": tot["indexer_kl"] / n,
          "attended_fraction": tot["attended_keys"] / max(tot["visible_keys"],
                                                          1.0),
          "mode": mode}


# ---------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------

class _Logger:
  """Terminal line + JSONL (+ TensorBoard if importable), process 0 only."""

  def __init__(self, run_dir: str | None, enabled: bool, echo: Callable | None):
    self.enabled = enabled
    self.echo = echo
    self.file = None
    self.tb = None
    if enabled and run_dir:
      self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a",
                       encoding="utf-8")
      self.tb = _tensorboard(os.path.join(run_dir, "tensorboard"))

  def write(self, record: dict[str, Any], line: str | None = None):
    if not self.enabled:
      return
    if self.file:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()
    if self.tb is not None and "step" in record:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self.tb.add_scalar(f"{record.get('event', 'train')}/{k}", v,
                             record["step"])
    if line and self.echo:
      self.echo(line)

  def close(self):
    if self.file:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def _tensorboard(logdir: str):
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter(logdir)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    from torch.utils.tensorboard import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter(logdir)
  except Exception:  # pylint: disable=broad-except
    return None


def _fmt_tokens(x: float) -> str:
  return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
  setup: Setup
  state: Any
  final_eval: dict[str, float]
  history: list[dict[str, Any]]     # the train records logged by this process
  resumed_from: int | None


def _checkpoint_manager(run_dir: str, cfg: Config):
  t = cfg.train
  options = ocp.CheckpointManagerOptions(
      max_to_keep=t.keep_checkpoints, create=True,
      enable_async_checkpointing=t.async_checkpointing,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options)


def _check_saved_config(path: str, cfg: Config):
  with open(path, encoding="utf-8") as f:
    saved = Config.from_json(f.read())
  if saved.model != cfg.model:
    diff = {k: (getattr(saved.model, k), getattr(cfg.model, k))
            for k in cfg.model.__dataclass_fields__
            if getattr(saved.model, k) != getattr(cfg.model, k)}
    raise ValueError(f"run directory {os.path.dirname(path)!r} holds "
                     f"checkpoints of a different model (saved vs now: "
                     f"{diff}); use a new run directory or --no-resume.")


def train(cfg: Config, run_dir: str | None = None, *, resume: bool = True,
          devices=None, echo: Callable[[str], None] | None = print,
          final_eval: bool = True) -> TrainResult:
  """Runs (or resumes) both stages; returns the final state and evaluation.

  run_dir None: no checkpoints and no files (metrics only in the result).
  resume: continue from the latest checkpoint in run_dir if there is one.
  """
  s = setup(cfg, devices)
  cfg, t = s.cfg, s.cfg.train
  lead = jax.process_index() == 0
  mngr = None
  if run_dir is not None:
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = os.path.join(run_dir, "config.json")
    mngr = _checkpoint_manager(run_dir, cfg)
    if resume and mngr.latest_step() is not None and os.path.exists(cfg_path):
      _check_saved_config(cfg_path, cfg)
    if not resume:  # start over: drop old checkpoints and metrics
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
  logger = _Logger(run_dir, lead, echo)
  train_ds, eval_ds = make_datasets(cfg)
  loader = _Loader(train_ds, s)

  resumed_from = None
  if resume and mngr is not None and mngr.latest_step() is not None:
    resumed_from = mngr.latest_step()
    target = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        s.abstract_state, s.state_shardings)
    state = mngr.restore(resumed_from, args=ocp.args.StandardRestore(target))
    logger.write({"event": "resume", "step": resumed_from},
                 f"resumed from checkpoint at step {resumed_from}")
  else:
    state = init_state(s)
  start = int(shd.to_host(state["step"]))

  has_idx = registry.has_indexer(cfg.model.attention)
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
            for k, v in s.abstract_state["params"].items()}
  if start == 0:
    logger.write({"event": "start", "name": cfg.name,
                  "attention": cfg.model.attention, "top_k": cfg.model.top_k,
                  "params": counts, "mesh": dict(s.mesh.shape),
                  "processes": jax.process_count(),
                  "warmup_stage_steps": t.warmup_stage_steps,
                  "sparse_stage_steps": t.sparse_stage_steps},
                 f"{cfg.name}: attention={cfg.model.attention}"
                 f"{f' top_k={cfg.model.top_k}' if has_idx else ''} params="
                 f"{counts['main'] + counts['indexer']:,} (indexer "
                 f"{counts['indexer']:,}) mesh={dict(s.mesh.shape)} steps="
                 f"{t.warmup_stage_steps} warm-up + {t.sparse_stage_steps} "
                 f"sparse")

  steps: dict[str, Any] = {}
  evals: dict[str, Any] = {}
  history = []
  total = t.total_steps
  tick, tokens = time.perf_counter(), 0.0

  def stage_of(i):
    return "warmup" if i < t.warmup_stage_steps else "sparse"

  def label(stage):  # kinds without an indexer have a single plain stage
    return stage if has_idx else "train"

  def run_eval(step_done, stage):
    mode = STAGE_MODE[stage]
    if mode not in evals:
      evals[mode] = make_eval_step(s, mode)
    ev = evaluate(s, state, eval_ds, mode, eval_step=evals[mode])
    rec = {"event": "eval", "step": step_done, "stage": label(stage), **ev}
    kl = f" kl {ev['indexer_kl']:.4f}" if has_idx else ""
    logger.write(rec, f"  eval @ {step_done}: loss {ev['loss']:.4f}{kl}"
                      f" attended {ev['attended_fraction']:.3f}")
    return ev

  last_eval = None
  try:
    for i in range(start, total):
      stage = stage_of(i)
      if stage not in steps:
        steps[stage] = make_train_step(s, stage)
      state, metrics = steps[stage](state, loader.train(i))
      tokens += t.batch_size * t.seq_len
      done = i + 1
      if done % t.log_every == 0 or done == total or done == start + 1:
        m = {k: float(shd.to_host(v)) for k, v in metrics.items()}
        now = time.perf_counter()
        # The first step after (re)start includes compilation: no rate.
        tps = tokens / max(now - tick, 1e-9) if done > start + 1 else None
        tick, tokens = now, 0.0
        rec = {"event": "train", "step": done, "stage": label(stage),
               "attention": cfg.model.attention, "top_k": cfg.model.top_k,
               "tokens_per_s": tps, **m}
        history.append(rec)
        lr = m.get("lr_main", m.get("lr_indexer", 0.0))
        kl = f" kl {m['indexer_kl']:.4f}" if has_idx else ""
        logger.write(
            rec,
            f"[{cfg.model.attention}:{label(stage)}] {done}/{total} "
            f"loss {m['loss']:.4f}{kl}"
            f" attended {m['attended_fraction']:.3f} lr {lr:.2e}"
            f"{f' {_fmt_tokens(tps)} tok/s' if tps else ' (compiled)'}")
      if t.eval_every and done % t.eval_every == 0 and done != total:
        last_eval = run_eval(done, stage)
      if mngr is not None and t.checkpoint_every and (
          done % t.checkpoint_every == 0) and done != total:
        mngr.save(done, args=ocp.args.StandardSave(state))
    if mngr is not None and total > start:
      mngr.save(total, args=ocp.args.StandardSave(state), force=True)
    if final_eval:
      last_eval = run_eval(total, stage_of(total - 1))
  finally:
    if mngr is not None:
      mngr.wait_until_finished()
      mngr.close()
    logger.close()
  return TrainResult(s, state, last_eval, history, resumed_from)


def load_checkpoint(run_dir: str, step: int | None = None, devices=None):
  """(Setup, state) restored from run_dir (latest step by default)."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    cfg = Config.from_json(f.read())
  s = setup(cfg, devices)
  mngr = _checkpoint_manager(run_dir, cfg)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {run_dir!r}.")
    target = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        s.abstract_state, s.state_shardings)
    state = mngr.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    mngr.close()
  return s, state


def read_metrics(run_dir: str, event: str = "train") -> dict[int, dict]:
  """The last record per step of `event` in run_dir/metrics.jsonl."""
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("event") == event:
        out[rec["step"]] = rec
  return out


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None, *, cpu_collectives: str = "gloo"):
  """jax.distributed.initialize when process coordinates are given.

  On CPU, cross-process collectives need an implementation (gloo); set it
  before initialising. A no-op when coordinator is None.
  """
  if coordinator is None:
    return
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator needs --num-processes and --process-id.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} not in [0, {num_processes}).")
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes, process_id=process_id)
