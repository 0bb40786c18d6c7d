"""The jitted training and evaluation steps of the two stages.

warmup  mode="warmup" (dense attention + dense indexer KL); gradients are
        taken w.r.t. the indexer parameters only, so the main model is
        frozen (its optimiser state is not even touched).
sparse  mode="sparse" (top-k attention + sparse KL); both groups train on
        LM + indexer_loss_scale * KL. The layers make the two gradients
        disjoint: the indexer reads a stop-gradient input and its KL
        stop-grads the main q/k (so the KL never reaches the main model),
        and the LM loss sees the indexer only through integer top-k indices
        (so it never reaches the indexer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from sparse_attn import dispatch
from sparse_attn import sharding as shd
from sparse_attn.ops.losses import lm_loss
from sparse_attn.training.optimizer import schedules
from sparse_attn.training.state import Setup

#: training stage -> the model mode its steps run.
STAGE_MODE = {"warmup": "warmup", "sparse": "sparse"}


class Step(Protocol):
  """A jitted step: called, or lowered for AOT (`.lower(*abstract_args)`)."""

  def __call__(self, *args: Any) -> Any: ...

  def lower(self, *args: Any) -> jax.stages.Lowered: ...


def _forward(graphdef, idx, main, batch, mode, kl_scale, cp=None):
  model = nnx.merge(graphdef, idx, main)
  if cp is None:
    logits, aux = model(batch["inputs"], mode=mode)
  else:
    # Tokens, targets and mask in the context layout: the loss is a mean
    # over tokens, so it equals the natural-order one.
    batch = cp.layout_batch(
      {k: batch[k] for k in ("inputs", "targets", "loss_mask")}
    )
    logits, aux = model(
      batch["inputs"],
      mode=mode,
      positions=batch["positions"],
      context_parallel=cp,
    )
  lm, count = lm_loss(logits, batch["targets"], batch["loss_mask"])
  total = lm + kl_scale * aux["indexer_kl"]
  return total, (lm, count, aux)


def make_loss_fn(s: Setup, mode: str) -> Callable[..., Any]:
  """loss(idx_params, main_params, batch) -> (total, (lm, count, aux))."""
  scale = s.cfg.train.indexer_loss_scale
  return lambda idx, main, batch: _forward(
    s.graphdef, idx, main, batch, mode, scale, s.context_parallel
  )


def make_train_step(s: Setup, stage: str) -> Step:
  """Jitted (state, batch) -> (state, metrics); the state is donated.

  metrics (replicated scalars): loss, indexer_kl, attended_fraction, tokens,
  and grad_norm_<group>, lr_<group> of each group the stage trains.
  """
  if stage not in STAGE_MODE:
    raise ValueError(
      f"stage must be one of {tuple(STAGE_MODE)}, got {stage!r}."
    )
  loss_fn = make_loss_fn(s, STAGE_MODE[stage])
  train_main = stage == "sparse"
  scheds = schedules(s.cfg)
  warm = s.cfg.train.warmup_stage_steps

  def step(state, batch):
    params, opt = state["params"], state["opt"]
    argnums = (0, 1) if train_main else 0
    grads, (lm, count, aux) = jax.grad(loss_fn, argnums=argnums, has_aux=True)(
      params["indexer"], params["main"], batch
    )
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
    metrics.update(
      loss=lm,
      indexer_kl=aux["indexer_kl"],
      attended_fraction=aux["attended_fraction"],
      tokens=count,
    )
    new_state = {
      "step": state["step"] + 1,
      "rng": rng,
      "params": new_params,
      "opt": new_opt,
    }
    return new_state, metrics

  rep = shd.replicated(s.mesh)
  return _kernel_mesh(
    s,
    jax.jit(
      step,
      in_shardings=(s.state_shardings, s.batch_sharding),
      out_shardings=(s.state_shardings, rep),
      donate_argnums=0,
    ),
  )


def make_eval_step(s: Setup, mode: str) -> Step:
  """Jitted (params, batch) -> sums for loss/KL/attended fraction."""
  loss_fn = make_loss_fn(s, mode)

  def step(params, batch):
    _, (lm, count, aux) = loss_fn(params["indexer"], params["main"], batch)
    return {
      "nll": lm * count,
      "tokens": count,
      "indexer_kl": aux["indexer_kl"],
      "attended_keys": aux["attended_keys"],
      "visible_keys": aux["visible_keys"],
    }

  return _kernel_mesh(
    s,
    jax.jit(
      step,
      in_shardings=(s.state_shardings["params"], s.batch_sharding),
      out_shardings=shd.replicated(s.mesh),
    ),
  )


def _kernel_mesh(s: Setup, jitted: Step) -> Step:
  """Traces and runs `jitted` under the run's mesh when Pallas kernels are on
  or the sequence is sharded.

  The attention functions then wrap their pallas_calls in shard_map (see
  `ops.kernel_sharding.call_kernel_sharded`); the XLA path without context
  parallelism needs no mesh context. The result can be called or lowered (`.lower(*abstract_args)`,
  for AOT).
  """
  pallas = dispatch.resolve(s.cfg.model.implementation) == "pallas"
  if not pallas and s.context_parallel is None:
    return jitted
  return _UnderMesh(jitted, s.mesh)


class _UnderMesh:
  """A jitted function that is traced, lowered and run under `mesh`."""

  def __init__(self, jitted: Step, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args: Any) -> jax.stages.Lowered:
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)
