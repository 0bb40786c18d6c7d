"""The stage loop: the training steps of both stages, picked by step index.

Step i (0-based) of a run is in the dense warm-up stage while
i < cfg.train.warmup_stage_steps and in the sparse stage after it (kinds
without an indexer have no warm-up: `Config.resolved`). A `StageRunner` runs
any range of steps of a run: it picks each step's stage, compiles each
stage's step once (on first use) and feeds it the global batch of that step,
so a loop may be split into segments (to analyse or checkpoint between them)
and resumed at any step with the same data.

    runner = StageRunner(s, train_ds)
    state = runner.run(state)                          # every step
    state = run_stages(s, state, ds, on_step=print)    # the same, in one call
    for r in runner.steps(state, start=10, stop=20):   # step by step
      state = r.state
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

from sparse_attn.config import Config
from sparse_attn.data import Dataset
from sparse_attn.training.loader import BatchLoader
from sparse_attn.training.state import Setup
from sparse_attn.training.steps import make_train_step


def stage_of(cfg: Config, step: int) -> str:
  """The stage of step `step` (0-based): "warmup" or "sparse"."""
  return "warmup" if step < cfg.train.warmup_stage_steps else "sparse"


class StepResult(NamedTuple):
  """What one training step produced."""

  step: int  # steps done, this one included (1-based)
  stage: str  # "warmup" or "sparse"
  state: Any  # the state after the step
  metrics: dict[str, jax.Array]  # device scalars (see make_train_step)


class StageRunner:
  """Runs training steps of a run, each in its stage, on a dataset's batches.

  first_step: the dataset step that training step 0 reads (a run that
    continues another on the same data stream, e.g. a sparse model converted
    from a dense checkpoint, starts where that one stopped).
  The jitted step of each stage is built on first use and kept, so calls for
  successive ranges of steps compile each stage once.
  """

  def __init__(self, s: Setup, dataset: Dataset, *, first_step: int = 0):
    self.s = s
    self.loader = BatchLoader(dataset, s)
    self.first_step = first_step
    self._steps: dict[str, Callable[..., Any]] = {}

  def train_step(self, stage: str) -> Callable[..., Any]:
    """The jitted (state, batch) -> (state, metrics) step of `stage`."""
    if stage not in self._steps:
      self._steps[stage] = make_train_step(self.s, stage)
    return self._steps[stage]

  def steps(
    self, state, start: int = 0, stop: int | None = None
  ) -> Iterator[StepResult]:
    """Runs steps start .. stop - 1 (stop: cfg.train.total_steps), lazily.

    Yields after each step; the state a result holds is donated to the next
    step, so keep the latest one only.
    """
    stop = self.s.cfg.train.total_steps if stop is None else stop
    for i in range(start, stop):
      stage = stage_of(self.s.cfg, i)
      batch = self.loader.train(self.first_step + i)
      state, metrics = self.train_step(stage)(state, batch)
      yield StepResult(i + 1, stage, state, metrics)

  def run(
    self,
    state,
    start: int = 0,
    stop: int | None = None,
    on_step: Callable[[StepResult], None] | None = None,
  ) -> Any:
    """Runs steps start .. stop - 1; returns the final state.

    on_step(result) is called after every step (to log, evaluate or save).
    """
    for result in self.steps(state, start, stop):
      state = result.state
      if on_step is not None:
        on_step(result)
    return state


def run_stages(
  s: Setup,
  state,
  dataset: Dataset,
  *,
  first_step: int = 0,
  start: int = 0,
  stop: int | None = None,
  on_step: Callable[[StepResult], None] | None = None,
) -> Any:
  """Runs steps start .. stop - 1 of both stages on `dataset`; the state.

  One-call form of `StageRunner(s, dataset, first_step=first_step).run(...)`
  (which keeps the compiled steps for further calls).
  """
  runner = StageRunner(s, dataset, first_step=first_step)
  return runner.run(state, start, stop, on_step)
