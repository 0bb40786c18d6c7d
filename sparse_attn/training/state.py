"""The static description of a run (`Setup`) and its training state.

State (a pytree, checkpointed whole):
  step     int32[]            training steps done
  rng      key[2]             split once per step (for dropout etc.)
  params   {indexer, main}    nnx.State of the two parameter groups
  opt      {indexer, main}    the two optimisers' states
Every leaf is created directly with its sharding on the run's mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_attn import sharding as shd
from sparse_attn.config import Config, validate
from sparse_attn.models import INDEXER, MAIN, Transformer
from sparse_attn.nn.context_parallel import ContextParallel
from sparse_attn.training.optimizer import make_optimizer, schedules


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
  # The sequence split over the mesh's context axis (None when it is 1):
  # the steps lay each batch out in its order (`ContextParallel.layout_batch`).
  context_parallel: ContextParallel | None = None


def setup(cfg: Config, devices=None) -> Setup:
  """Validates cfg and builds the mesh, graph, optimisers and shardings."""
  devices = list(jax.devices() if devices is None else devices)
  cfg = validate(cfg, num_devices=len(devices))
  mesh = shd.make_mesh(cfg.train.mesh_shape, devices)
  tx = {k: make_optimizer(s, cfg) for k, s in schedules(cfg).items()}

  def init_fn():
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))
    _, idx, main = nnx.split(model, INDEXER, MAIN)
    return {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.PRNGKey(cfg.train.seed + 1),
      "params": {"indexer": idx, "main": main},
      "opt": {
        "indexer": tx["indexer"].init(idx),
        "main": tx["main"].init(main),
      },
    }

  abstract_model = nnx.eval_shape(
    lambda: Transformer(cfg.model, rngs=nnx.Rngs(params=0))
  )
  graphdef, _, _ = nnx.split(abstract_model, INDEXER, MAIN)
  abstract_state = jax.eval_shape(init_fn)
  state_shardings = shd.tree_shardings(abstract_state, mesh)
  cp = None
  if shd.context_size(mesh) > 1:
    t = cfg.train
    cp = ContextParallel(
      mesh,
      layout=t.context_layout,
      strategy=t.context_strategy,
      dense_strategy=t.context_dense_strategy,
    )
  return Setup(
    cfg,
    mesh,
    graphdef,
    tx,
    abstract_state,
    state_shardings,
    shd.batch_sharding(mesh),
    init_fn,
    cp,
  )


def init_state(s: Setup) -> Any:
  """Fresh state, created directly with its shardings."""
  return jax.jit(s.init_fn, out_shardings=s.state_shardings)()


def state_structs(s: Setup) -> Any:
  """The state as jax.ShapeDtypeStructs carrying their shardings.

  What a checkpoint is restored into and what a step is lowered with.
  """
  return jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
    s.abstract_state,
    s.state_shardings,
  )


def merge_model(s: Setup, state) -> Transformer:
  """The Transformer holding `state`'s parameters (no copy)."""
  return nnx.merge(
    s.graphdef, state["params"]["indexer"], state["params"]["main"]
  )
