"""The retrieval study at longer context: DSA against every kind, with seeds.

Where retrieval.py runs one grid (one length, one seed, one protocol), this
script runs the study whose figures docs/experiments.md and README report:

  main     trained at L = 512 and 1024 on MQAR, passkey and variable
           tracking (multi-hop), the convert protocol (DeepSeek-V3.2-Exp's
           recipe: dense pretraining, dense warm-up of the indexer, sparse
           training), every kind: DSA at three top_k <= 3% of L, every
           other kind at DSA's middle budget (NSA at the block sizes that
           bring it closest: `scaled_nsa`); evaluation at 1x / 2x / 4x L
  scratch  the same models trained from scratch (no dense checkpoint) at
           L = 512 on MQAR
  warmup   DSA's accuracy against the number of dense warm-up steps
           (0 .. 300) at a fixed sparse stage, L = 512 and 1024 on MQAR
           and passkey

each over 3 seeds (the seed draws the training data and the initialisation;
the evaluation examples are the same for every seed), reported as mean and
spread (min - max).
Every model is one retrieval.train_and_evaluate call (the library's
training API); the models share their task's dense pretraining per seed.

Resumable: every finished model is one line of <out-dir>/runs.jsonl and
every dense pretraining one file under <out-dir>/pretrained/, keyed by all of
the settings that define it; a rerun (after a kill, or with more parts or
seeds) trains only what is missing, so the study can be run in pieces. A
dense pretraining in progress saves its state every 10 minutes (orbax
checkpoints under pretrained/<key>.partial/) and a rerun continues it from
there, to the model an uninterrupted run gives.


  python experiments/retrieval_study.py                    # everything (CPU hours)
  python experiments/retrieval_study.py --parts main --tasks mqar --lens 512
  python experiments/retrieval_study.py --parts main --kinds csa,hca --seeds 1
  python experiments/retrieval_study.py --report-only      # tables + plots so far
  python experiments/retrieval_study.py --merge results/a results/b  # pieces
  python experiments/retrieval_study.py --list             # what it would train
  python experiments/retrieval_study.py --smoke --out-dir /tmp/s   # CI

Writes <out-dir>/study.md (the tables, the dense models' scores first and
each kind's exact match per seed last),
study_length.png (per cell: exact match vs evaluation length per kind
above, exact match vs keys per query at L below), study_warmup.png (DSA vs
warm-up steps) and study.csv (every row). A convert cell whose dense model
scores below Study.min_dense_exact at L is not converted (logged; its
score is in study.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import retrieval as R  # noqa: E402

from sparse_attn import training as T  # noqa: E402
from sparse_attn.budgets import key_budget  # noqa: E402
from sparse_attn.data import TASKS  # noqa: E402

PARTS = ("main", "scratch", "warmup")

# Bump when a change of the code changes what a model of the same settings
# learns, so that runs.jsonl entries of the old code are not reused (version
# 1 keys carry no version field).
STUDY_VERSION = 1

# Column order of study.csv: retrieval's columns plus the study's own.
COLUMNS = R.COLUMNS + ("part", "seed", "warmup_steps", "adapt_steps")


@dataclasses.dataclass(frozen=True)
class TaskRecipe:
  """What one task changes of the study's defaults; only that task's keys
  change (a field left at its default keeps them as they were)."""

  # Model sizes replacing Study.model's.
  model: dict[str, int] = dataclasses.field(default_factory=dict)
  # Generator options over _common.TASK_OPTIONS'.
  options: dict[str, int] = dataclasses.field(default_factory=dict)
  # The dense pretraining's first phase at a short length, (length, steps,
  # peak lr) (retrieval.Preset.pretrain_short), at every training length.
  pretrain_short: tuple[int, int, float] | None = None
  # Per training length: a first phase replacing pretrain_short's there
  # (other lengths keep theirs, and so their keys).
  pretrain_short_at: dict[int, tuple[int, int, float]] = dataclasses.field(
    default_factory=dict
  )
  # Per training length L: a shorter training length whose dense model (the
  # same task and seed, saved by the study) the dense pretraining at L
  # starts from, in place of a first phase (pretrain_short). Its pretraining
  # seconds count in L's.
  pretrain_from: dict[int, int] = dataclasses.field(default_factory=dict)
  # Per training length: (steps, peak lr) replacing Study.pretrain_steps[L]
  # and Study.lr, i.e. the convert protocol's dense pretraining at L and the
  # scratch protocol's training.
  pretrain: dict[int, tuple[int, float]] = dataclasses.field(
    default_factory=dict
  )


@dataclasses.dataclass(frozen=True)
class Study:
  """The study's grid. Steps and sizes are per training length."""

  tasks: tuple[str, ...]
  lens: tuple[int, ...]
  seeds: tuple[int, ...]
  kinds: tuple[str, ...]
  # DSA top_k per training length; the middle one sets the baselines' budget.
  dsa_top_k: dict[int, tuple[int, ...]]
  pretrain_steps: dict[int, int]
  warmup_steps: int
  adapt_steps: int
  warmup_sweep: tuple[int, ...]
  scratch_lens: tuple[int, ...]
  scratch_tasks: tuple[str, ...]
  sweep_tasks: tuple[str, ...]
  batch_size: dict[int, int]
  eval_examples: int
  eval_multiples: tuple[int, ...]
  model: dict
  lr: float
  adapt_lr: float
  lr_warmup_steps: int
  # Per task: what it changes of the defaults above.
  recipes: dict[str, TaskRecipe] = dataclasses.field(default_factory=dict)
  # The convert protocol converts only a dense model that has learned the
  # task: its exact match at L (the study's evaluation examples) must reach
  # this, else the cell's conversions are refused (they would measure
  # learning the task under sparse attention, not keeping it).
  min_dense_exact: float = 0.0

  def __post_init__(self):
    unknown = sorted(set(self.recipes) - set(TASKS))
    if unknown:
      raise ValueError(
        f"Study.recipes: unknown tasks {unknown}; known: {sorted(TASKS)}"
      )
    for task, r in self.recipes.items():
      for L, base in r.pretrain_from.items():
        # A base in the grid: its model is trained, saved and merged as one.
        if not (base < L and base in self.lens):
          raise ValueError(
            f"Study.recipes[{task!r}].pretrain_from[{L}] = {base}: must be "
            f"a training length of the study shorter than {L} "
            f"(lens {self.lens})"
          )
        if L in r.pretrain_short_at:
          raise ValueError(
            f"Study.recipes[{task!r}]: L={L} has both pretrain_from and "
            "pretrain_short_at; give one"
          )

  def recipe(self, task: str) -> TaskRecipe:
    return self.recipes.get(task, TaskRecipe())

  def converts(self, dense_exact: float) -> bool:
    """Whether a dense model of this exact match at L is converted."""
    return dense_exact >= self.min_dense_exact


CPU = Study(
  tasks=("mqar", "passkey", "vartrack"),
  lens=(512, 1024),
  seeds=(0, 1, 2),
  kinds=R.ALL_KINDS,
  dsa_top_k={512: (4, 8, 15), 1024: (8, 16, 30)},
  pretrain_steps={512: 400, 1024: 400},
  warmup_steps=100,
  adapt_steps=150,
  warmup_sweep=(0, 10, 30, 100, 300),
  scratch_lens=(512,),
  scratch_tasks=("mqar",),
  # Passkey is where DSA loses at 100 warm-up steps; its sweep tests whether
  # a longer warm-up closes the gap.
  sweep_tasks=("mqar", "passkey"),
  batch_size={512: 32, 1024: 16},
  eval_examples=64,
  eval_multiples=(1, 2, 4),
  # The --quick preset's model: the size the L=64 table was measured at.
  model=dict(R.PRESETS["quick"].model),
  lr=1e-3,
  adapt_lr=1e-3,
  lr_warmup_steps=20,
  recipes={
    # 400 steps at L alone leave the dense model at chance on passkey (0.02
    # exact at L=512 after 400 + 250 steps at lr 1e-3); at L=128 and lr
    # 3e-3 it is learned in 300-450 steps (docs/experiments.md).
    # At L=1024 the model starts from its L=512 dense model (MQAR at L=1024
    # was not learned from scratch; passkey at L=512 not without L=128).
    "passkey": TaskRecipe(
      pretrain_short=(128, 600, 3e-3), pretrain_from={1024: 512}
    ),
    # Two layers do not learn vartrack even without hops (0.00 exact at
    # L=256 after 600 steps); four start to learn two hops. 1500 steps at
    # L=128 reach 0.34 exact there and do not carry over to L=512 (0.03),
    # nor do 400 more at L=512 and lr 1e-3 learn it there (0.22); its
    # recipe trains twice as long at L=128 and five times as long at L=512,
    # at a higher lr (seed 0's model: 0.38 exact at L=512,
    # docs/experiments.md). At L=1024 it starts from that model: 1000 steps
    # at L=1024, at lr 1e-3 (a trained model, not a fresh one).
    "vartrack": TaskRecipe(
      model={"num_layers": 4},
      pretrain_short=(128, 3000, 3e-3),
      pretrain_from={1024: 512},
      pretrain={512: (2000, 2e-3), 1024: (1000, 1e-3)},
    ),
    # 400 steps at L=1024 (batch 16) leave MQAR unlearned (loss 1.57, 0.00
    # exact), and 700 as well (loss 0.90, 0.02 exact); at L=512, 400 steps
    # of batch 32 learn it. So L=1024 first trains those examples at L=512
    # (800 steps of the length's batch 16), then its 400 steps at L=1024.
    "mqar": TaskRecipe(pretrain_short_at={1024: (512, 800, 1e-3)}),
  },
  # The saved dense models of the L=512 cells reach 0.38 (vartrack) to 1.00
  # exact at L, passkey's 0.47-0.88; the unlearned L=1024 MQAR models of 400
  # and 700 steps 0.00-0.02 (chance is about 0 on every task).
  min_dense_exact=0.25,
)

SMOKE = Study(
  tasks=("mqar",),
  lens=(32,),
  seeds=(0, 1),
  kinds=("dense", "dsa"),
  dsa_top_k={32: (4,)},
  pretrain_steps={32: 2},
  warmup_steps=1,
  adapt_steps=1,
  warmup_sweep=(0, 1),
  scratch_lens=(32,),
  scratch_tasks=("mqar",),
  sweep_tasks=("mqar",),
  batch_size={32: 2},
  eval_examples=2,
  eval_multiples=(1, 2),
  model=dict(R.PRESETS["smoke"].model),
  lr=1e-3,
  adapt_lr=1e-3,
  lr_warmup_steps=1,
  # Every field set: the path, not a need.
  recipes={
    "mqar": TaskRecipe(
      model={"num_layers": 2},
      options={"value_vocab": 6},
      pretrain_short=(16, 1, 3e-3),
      pretrain_short_at={32: (16, 2, 3e-3)},
      pretrain={32: (3, 1e-3)},
    )
  },
)


def scaled_nsa(seq_len: int, target: float) -> dict:
  """NSA parameters whose key budget at seq_len is closest to `target`.

  NSA's keys per query have a floor: its compressed branch alone attends
  about t / d keys, and its always-selected blocks (1 initial + 2 local)
  3 l'. The paper's sizes (l = 32, d = 16, l' = 64, w = 512, n = 16) attend
  more than all of L = 1024, so the study scales the blocks down, keeping the
  paper's l = 2d, and reports the keys each model actually attended.
  """
  best, best_gap = None, float("inf")
  for d in (2, 4, 8, 16, 32):
    for sel in (d, 2 * d, 4 * d):
      for window in (4, 8, 16, 32):
        p = dict(
          cmp_block=2 * d,
          cmp_stride=d,
          select_block=sel,
          window=window,
          num_selected=3,
        )
        try:
          gap = abs(key_budget("nsa", seq_len, **p) - target)
        except ValueError:
          continue
        if gap < best_gap:
          best, best_gap = p, gap
  assert best is not None
  return best


@dataclasses.dataclass(frozen=True)
class Model:
  """One model to train: a row group of runs.jsonl."""

  part: str
  task: str
  seq_len: int
  protocol: str
  seed: int
  run: tuple  # retrieval.runs_for's (label, kind, top_k, params)
  warmup_steps: int

  def preset(self, st: Study) -> R.Preset:
    L = self.seq_len
    r = st.recipe(self.task)
    steps, lr = r.pretrain.get(L, (st.pretrain_steps[L], st.lr))
    return R.Preset(
      tasks=(self.task,),
      seq_len=L,
      eval_lens=tuple(m * L for m in st.eval_multiples),
      dsa_top_k=st.dsa_top_k[L],
      budget_top_k=st.dsa_top_k[L][len(st.dsa_top_k[L]) // 2],
      kinds=st.kinds,
      pretrain_steps=steps,
      warmup_steps=self.warmup_steps,
      adapt_steps=st.adapt_steps,
      batch_size=st.batch_size[L],
      eval_examples=st.eval_examples,
      model=dict(st.model, **r.model),
      lr=lr,
      adapt_lr=st.adapt_lr,
      lr_warmup_steps=st.lr_warmup_steps,
      pretrain_short=None
      if L in r.pretrain_from
      else r.pretrain_short_at.get(L, r.pretrain_short),
      task_options={self.task: r.options},
    )

  def key(self, st: Study) -> str:
    """Every setting that defines the model's result (not its part)."""
    pr = self.preset(st)
    d = dataclasses.asdict(pr)
    for f in ("tasks", "kinds", "dsa_top_k", "budget_top_k", "task_options"):
      d.pop(f)
    if d["pretrain_short"] is None:  # keys from before the field stay valid
      d.pop("pretrain_short")
    label, kind, top_k, params = self.run
    d.update(
      task=self.task,
      protocol=self.protocol,
      seed=self.seed,
      kind=kind,
      top_k=top_k,
      params=params,
      task_options=pr.options(self.task),
    )
    base = st.recipe(self.task).pretrain_from.get(self.seq_len)
    if self.protocol == "scratch":  # no dense model: none of these applies
      d.pop("adapt_lr")
      d.pop("pretrain_short", None)
    elif base is not None:  # the settings of the model it starts from
      d["pretrain_from"] = json.loads(
        pretrain_key(st, self.task, base, self.seed)
      )
    if STUDY_VERSION > 1:
      d["version"] = STUDY_VERSION
    return json.dumps(d, sort_keys=True)

  def steps(self, st: Study) -> int:
    if self.protocol == "convert":
      return self.warmup_steps + st.adapt_steps
    return self.preset(st).pretrain_steps + st.adapt_steps


def pretrain_key(st: Study, task: str, L: int, seed: int) -> str:
  m = Model("main", task, L, "convert", seed, ("dense", "dense", 0, {}), 0)
  d = json.loads(m.key(st))
  for f in ("warmup_steps", "adapt_steps", "adapt_lr", "kind", "top_k"):
    d.pop(f, None)
  d.pop("params")
  d.pop("eval_lens")
  d.pop("eval_examples")
  return json.dumps(d, sort_keys=True)


def study_runs(pr: R.Preset) -> list[tuple]:
  """retrieval.runs_for, with NSA at the block sizes closest to the budget."""
  target = key_budget("dsa", pr.seq_len, top_k=pr.budget_top_k)
  out = []
  for label, kind, top_k, params in R.runs_for(pr):
    if kind == "nsa":
      params = scaled_nsa(pr.seq_len, target)
    out.append((label, kind, top_k, params))
  return out


def models(
  st: Study, parts, tasks=None, lens=None, seeds=None, kinds=None
) -> list[Model]:
  """The study's models in the order they are trained (seed-major within a
  part, so an interrupted study has whole seeds). kinds: keep the runs of
  these kinds or labels (e.g. "csa", "dsa_k8"); None: all."""
  keep = lambda x, sel: sel is None or x in sel
  out: list[Model] = []
  for part in parts:
    if part == "main":
      grid = [(t, L, "convert") for L in st.lens for t in st.tasks]
    elif part == "scratch":
      grid = [
        (t, L, "scratch") for L in st.scratch_lens for t in st.scratch_tasks
      ]
    elif part == "warmup":
      grid = [(t, L, "convert") for L in st.lens for t in st.sweep_tasks]
    else:
      raise ValueError(f"parts: unknown part {part!r}; known: {PARTS}")
    for seed in st.seeds:
      for task, L, protocol in grid:
        if not (keep(task, tasks) and keep(L, lens) and keep(seed, seeds)):
          continue
        probe = Model(part, task, L, protocol, seed, ("", "", 0, {}), 0)
        pr = probe.preset(st)
        if part == "warmup":
          k = pr.budget_top_k
          for w in st.warmup_sweep:
            run = (f"dsa_k{k}", "dsa", k, {"top_k": k})
            if kinds is None or {run[0], run[1]} & set(kinds):
              out.append(Model(part, task, L, protocol, seed, run, w))
        else:
          for run in study_runs(pr):
            if kinds is not None and not {run[0], run[1]} & set(kinds):
              continue
            out.append(
              Model(part, task, L, protocol, seed, run, st.warmup_steps)
            )
  return out


# ---------------------------------------------------------------------------
# the cache


def read_runs(path: str) -> dict[str, list[dict]]:
  """runs.jsonl: {key: rows}; a torn last line (killed mid-write) is skipped."""
  out: dict[str, list[dict]] = {}
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      out[rec["key"]] = rec["rows"]
  return out


def append_run(path: str, key: str, rows: list[dict]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps({"key": key, "rows": rows}) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _digest(key: str) -> str:
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def save_tree(path: str, tree, **meta) -> None:
  """Writes `tree`'s leaves, named by their key paths, and `meta` (numbers,
  strings) as `__name__` entries to the .npz `path`, atomically (a kill
  while writing keeps the previous file)."""
  entries: dict[str, Any] = {f"__{k}__": v for k, v in meta.items()}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    entries[jax.tree_util.keystr(p)] = np.asarray(jax.device_get(x))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **entries)
  os.replace(tmp, path)


def load_tree(path: str, template) -> Any:
  """The tree save_tree wrote, in `template`'s structure and dtypes.
  ValueError naming the leaf if one is missing or of another shape (saved
  for other settings)."""
  with np.load(path) as z:

    def one(p, x):
      k = jax.tree_util.keystr(p)
      if k not in z.files or z[k].shape != x.shape:
        raise ValueError(
          f"{path}: {k} missing or of another shape than {x.shape}; it was "
          "saved for other settings"
        )
      return jnp.asarray(z[k], x.dtype)

    return jax.tree_util.tree_map_with_path(one, template)


def tree_meta(path: str) -> dict[str, np.ndarray]:
  """The meta save_tree wrote with a tree (0-d arrays by name)."""
  with np.load(path) as z:
    return {
      k[2:-2]: z[k] for k in z.files if k.startswith("__") and k.endswith("__")
    }


def pretrained_path(st, out_dir, task, L, seed) -> str:
  key = pretrain_key(st, task, L, seed)
  return os.path.join(out_dir, "pretrained", _digest(key) + ".npz")


def dense_config(st, task, L, seed):
  """(preset, config) of the dense model of (task, L, seed): the settings
  it loads and is evaluated with."""
  pr = Model("main", task, L, "convert", seed, ("", "", 0, {}), 0).preset(st)
  cfg = R.make_config(
    pr,
    task,
    "dense",
    pr.budget_top_k,
    {},
    warmup=0,
    steps=1,
    lr=pr.lr,
    seed=seed,
  )
  return pr, cfg


def load_or_pretrain(st, out_dir, task, L, seed, log):
  """The dense model of (task, L, seed): params["main"] and its train time,
  from <out_dir>/pretrained/ when a previous run saved it."""
  key = pretrain_key(st, task, L, seed)
  path = pretrained_path(st, out_dir, task, L, seed)
  pr, cfg = dense_config(st, task, L, seed)
  partial = path[: -len(".npz")] + ".partial"
  if os.path.exists(path):
    meta = tree_meta(path)
    if meta["key"].item() != key:
      raise ValueError(f"{path}: saved for other settings; delete it")
    # Shapes and dtypes only: the saved arrays fill them.
    template = T.state_structs(T.setup(cfg))["params"]["main"]
    main = load_tree(path, template)
    pre_time = float(meta["pretrain_time_s"])
    log(f"  [{task} L={L} seed {seed}] dense model from {path}")
    # A kill after the model was saved can leave its checkpoints behind.
    shutil.rmtree(partial, ignore_errors=True)
    return main, pre_time
  init, base_time = None, 0.0
  base = st.recipe(task).pretrain_from.get(L)
  if base is not None:
    init, base_time = load_or_pretrain(st, out_dir, task, base, seed, log)
    log(f"  [{task} L={L} seed {seed}] starts from the L={base} dense model")
  # A long pretraining (vartrack, L=1024) saves its state as it goes: a
  # killed study resumes it where it was.
  state, pre_time = R.pretrain_dense(
    pr, task, seed, log, checkpoint=partial, init=init
  )
  pre_time += base_time
  main = state["params"]["main"]
  save_tree(path, main, pretrain_time_s=pre_time, key=np.array(key))
  shutil.rmtree(partial, ignore_errors=True)
  return main, pre_time


def dense_exact(st, task, L, seed, main) -> float:
  """The dense model's exact match at its training length L, on the
  evaluation examples every model of the study is scored on."""
  pr, cfg = dense_config(st, task, L, seed)
  s = T.setup(cfg)
  state, _ = T.init_from(T.init_state(s), main)
  ev = R.evaluate(
    s,
    state,
    task,
    L,
    pr.eval_examples,
    R.make_eval_fn(s, "sparse"),
    pr.options(task),
  )
  return ev["exact_match"]


def read_scores(out_dir) -> dict[str, dict]:
  """<out_dir>/dense.jsonl: {pretrain key: {"exact_match", ...}} of the
  dense models scored so far (dense_score)."""
  return {
    k: rows[0]
    for k, rows in read_runs(os.path.join(out_dir, "dense.jsonl")).items()
  }


def dense_score(st, out_dir, task, L, seed, main=None) -> float:
  """dense_exact of the saved dense model of (task, L, seed), cached in
  <out_dir>/dense.jsonl with its pretraining time; main: the model when
  the caller holds it (else it is loaded)."""
  key = pretrain_key(st, task, L, seed)
  got = read_scores(out_dir).get(key)
  if got is not None:
    return got["exact_match"]
  pre_time = float(
    tree_meta(pretrained_path(st, out_dir, task, L, seed))["pretrain_time_s"]
  )
  if main is None:
    main, _ = load_or_pretrain(st, out_dir, task, L, seed, lambda _: None)
  exact = dense_exact(st, task, L, seed, main)
  row = dict(
    task=task,
    train_len=L,
    seed=seed,
    exact_match=exact,
    pretrain_time_s=pre_time,
  )
  append_run(os.path.join(out_dir, "dense.jsonl"), key, [row])
  return exact


def score_dense(st, out_dir, log) -> list[dict]:
  """Scores every saved dense model of the grid not scored yet; returns the
  scores of the grid's cells (dense.jsonl rows), for the report."""
  cells = sorted(
    {
      (m.task, m.seq_len, m.seed)
      for m in models(st, PARTS)
      if m.protocol == "convert"
    }
  )
  out = []
  scores = read_scores(out_dir)
  for cell in cells:
    if not os.path.exists(pretrained_path(st, out_dir, *cell)):
      continue
    key = pretrain_key(st, *cell)
    if key not in scores:
      log(f"  scoring the dense model of {cell}")
      dense_score(st, out_dir, *cell)
      scores = read_scores(out_dir)
    out.append(scores[key])
  return out


# ---------------------------------------------------------------------------
# running


def pretrain_steps_left(st, out_dir, task, L, seed) -> float:
  """The dense pretraining steps (task, L, seed) still needs, in steps at L
  as Progress counts them (a step at length l costs about (l / L)^1.5 of
  one): 0 once its model is saved, the model it starts from included."""
  if os.path.exists(pretrained_path(st, out_dir, task, L, seed)):
    return 0.0
  pr = dense_config(st, task, L, seed)[0]
  steps = float(pr.pretrain_steps)
  phases = []
  if pr.pretrain_short is not None:
    phases.append(pr.pretrain_short[:2])
  base = st.recipe(task).pretrain_from.get(L)
  if base is not None:
    b = pretrain_steps_left(st, out_dir, task, base, seed)
    phases.append((base, b))
  for length, n in phases:
    steps += n * (length / L) ** 1.5
  return steps


class Progress:
  """ETA from the seconds per training step of the models trained so far at
  the same length (length^1.5 scaled from the nearest length done).

  items: (training length, steps) per model left, a model's steps including
  the dense pretraining it has to run first.
  """

  def __init__(self, items: list[tuple[int, int]]):
    self.items = list(items)
    self.left = set(range(len(items)))
    self.spent: dict[int, list[float]] = {}  # L -> [seconds, steps]
    self.done_models: set[int] = set()

  def skip(self, i: int) -> None:
    """Model i will not be trained: no longer in the ETA."""
    self.left.discard(i)

  def done(self, i: int, seconds: float) -> None:
    self.left.discard(i)
    self.done_models.add(i)
    L, steps = self.items[i]
    s = self.spent.setdefault(L, [0.0, 0.0])
    s[0] += seconds
    s[1] += steps

  def eta(self) -> float | None:
    if not self.spent:
      return None
    total = 0.0
    for i in self.left:
      L, steps = self.items[i]
      L0 = min(self.spent, key=lambda x: abs(x - L))
      sec, done_steps = self.spent[L0]
      total += sec / done_steps * steps * (L / L0) ** 1.5
    return total


def run_study(st, out_dir, todo, log) -> None:
  runs_path = os.path.join(out_dir, "runs.jsonl")
  cached = read_runs(runs_path)
  distinct = {m.key(st) for m in todo}
  missing, seen = [], set(cached)
  for m in todo:  # a model two parts share is trained once
    if m.key(st) not in seen:
      seen.add(m.key(st))
      missing.append(m)
  log(
    f"retrieval study: {len(todo)} models ({len(distinct)} distinct), "
    f"{len(distinct) - len(missing)} already in {runs_path}, "
    f"{len(missing)} to train"
  )
  items, pending = [], set()
  for m in missing:
    steps = m.steps(st)
    cell = (m.task, m.seq_len, m.seed)
    if m.protocol == "convert" and cell not in pending:
      pending.add(cell)
      steps += round(pretrain_steps_left(st, out_dir, *cell))
    items.append((m.seq_len, steps))
  prog = Progress(items)
  dense: dict[tuple, tuple] = {}
  refused: dict[tuple, float] = {}  # (task, L, seed) -> its exact match
  t_start = time.perf_counter()
  for i, m in enumerate(missing):
    label = m.run[0]
    eta = prog.eta()
    log(
      f"[{i + 1}/{len(missing)}] {m.part} {m.task} L={m.seq_len} "
      f"{m.protocol} seed {m.seed} {label} warm-up {m.warmup_steps}"
      + ("" if eta is None else f"; study eta {C.eta_text(eta)}")
    )
    t0 = time.perf_counter()
    pre_main, pre_time = None, 0.0
    if m.protocol == "convert":
      dk = (m.task, m.seq_len, m.seed)
      if dk not in dense and dk not in refused:
        dense.clear()  # one dense model in memory at a time
        main, pre_time = load_or_pretrain(st, out_dir, *dk, log)
        exact = dense_score(st, out_dir, *dk, main)
        log(
          f"  [{m.task} L={m.seq_len} seed {m.seed}] dense model: "
          f"{exact:.2f} exact at L (the study converts from "
          f">= {st.min_dense_exact:.2f})"
        )
        if st.converts(exact):
          dense[dk] = main, pre_time
        else:
          refused[dk] = exact
      if dk in refused:
        log(f"  refused: the dense model of {dk} has not learned the task")
        prog.skip(i)
        continue
      pre_main, pre_time = dense[dk]
    rows = R.train_and_evaluate(
      m.preset(st),
      m.task,
      m.run,
      protocol=m.protocol,
      seed=m.seed,
      pre_main=pre_main,
      pre_time=pre_time,
      log=log,
    )
    append_run(runs_path, m.key(st), rows)
    prog.done(i, time.perf_counter() - t0)
  n_refused = len(missing) - len(prog.done_models)
  log(
    f"trained {len(prog.done_models)} models in "
    f"{time.perf_counter() - t_start:.0f} s"
  )
  for (task, L, seed), exact in refused.items():
    log(
      f"refused {task} L={L} seed {seed}: its dense model reaches {exact:.2f} "
      f"exact at L, below the study's {st.min_dense_exact:.2f}; the cell "
      "is reported as refused (a longer pretraining would be a change to "
      "Study.recipes for every seed)"
    )
  if n_refused:
    log(f"{n_refused} models not trained (refused dense models)")


def merge(st, out_dir, sources, log) -> None:
  """Adds to <out_dir> the models that other out-dirs trained (the study run
  in pieces, one process per core): their runs.jsonl lines and dense models
  that out_dir lacks. Only the study's own models are taken; a model whose
  settings left the grid (a stale key) is skipped."""
  grid = models(st, PARTS)
  keys = {m.key(st) for m in grid}
  digests = {
    os.path.basename(pretrained_path(st, out_dir, m.task, m.seq_len, m.seed))
    for m in grid
    if m.protocol == "convert"
  }
  runs_path = os.path.join(out_dir, "runs.jsonl")
  have = read_runs(runs_path)
  os.makedirs(os.path.join(out_dir, "pretrained"), exist_ok=True)
  for src in sources:
    added = stale = copied = 0
    for key, rows in read_runs(os.path.join(src, "runs.jsonl")).items():
      if key not in keys:
        stale += 1
      elif key not in have:
        append_run(runs_path, key, rows)
        have[key] = rows
        added += 1
    scores = read_scores(out_dir)
    for key, row in read_scores(src).items():
      if key not in scores:
        append_run(os.path.join(out_dir, "dense.jsonl"), key, [row])
    pre = os.path.join(src, "pretrained")
    for name in sorted(os.listdir(pre)) if os.path.isdir(pre) else ():
      dst = os.path.join(out_dir, "pretrained", name)
      if name in digests and not os.path.exists(dst):
        shutil.copyfile(os.path.join(pre, name), dst)
        copied += 1
    log(
      f"merged {src}: {added} models added, {stale} not in the grid "
      f"skipped, {copied} dense models copied"
    )


# ---------------------------------------------------------------------------
# report


def study_rows(st, out_dir, todo) -> list[dict]:
  """Every cached row of the models in todo, tagged with part and seed."""
  cached = read_runs(os.path.join(out_dir, "runs.jsonl"))
  rows = []
  for m in todo:
    for r in cached.get(m.key(st), ()):
      rows.append(
        dict(
          r,
          part=m.part,
          seed=m.seed,
          warmup_steps=m.warmup_steps,
          adapt_steps=st.adapt_steps,
        )
      )
  return rows


def spread(values) -> str:
  """'mean (min-max)' of exact-match values, or the value for one seed."""
  v = np.asarray(values, float)
  if len(v) == 1:
    return f"{v[0]:.2f}"
  return f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f})"


def group(rows, *fields):
  out: dict[tuple, list[dict]] = {}
  for r in rows:
    out.setdefault(tuple(r[f] for f in fields), []).append(r)
  return out


def grid_cells(rows) -> Iterator[tuple[str, int, str, list[dict], list[int]]]:
  """(task, L, protocol, its rows, its evaluation multiples of L) per cell
  of the grid that rows cover."""
  for (task, L, protocol), rs in group(
    rows, "task", "train_len", "protocol"
  ).items():
    yield task, L, protocol, rs, sorted({r["eval_len"] // L for r in rs})


def length_table(rows, part: str) -> str:
  rows = [r for r in rows if r["part"] == part]
  if not rows:
    return ""
  out = []
  for task, L, protocol, rs, mults in grid_cells(rows):
    header = ["kind", "keys/query @L", "seeds"] + [f"{m}x L" for m in mults]
    table = []
    for (label,), lr in group(rs, "label").items():
      seeds = sorted({r["seed"] for r in lr})
      at = [r for r in lr if r["eval_len"] == L]
      cells = [label, f"{np.mean([r['keys_per_query'] for r in at]):.1f}"]
      cells.append(str(len(seeds)))
      for mu in mults:
        ex = [r["exact_match"] for r in lr if r["eval_len"] == mu * L]
        cells.append(spread(ex) if ex else "")
      table.append(cells)
    steps = rs[0]["steps"]
    how = "after pretraining" if protocol == "convert" else "from scratch"
    out.append(
      f"**{task}, trained at L={L}, protocol {protocol}** "
      f"({steps} steps per model {how})"
      + "\n\n"
      + C.markdown_table(table, header)
    )
  return "\n\n".join(out)


def seed_table(rows) -> str:
  """Per seed, the exact match of every kind of the main and scratch parts
  at 1x / 2x / 4x L (the spread the length tables summarise, seed by seed;
  a seed's cell is empty until its model is trained)."""
  rows = [r for r in rows if r["part"] in ("main", "scratch")]
  if not rows:
    return ""
  out = []
  for task, L, protocol, rs, mults in grid_cells(rows):
    seeds = sorted({r["seed"] for r in rs})
    table = []
    for (label,), lr in group(rs, "label").items():
      by = group(lr, "seed", "eval_len")
      cells = [label]
      for seed in seeds:
        got = [by.get((seed, mu * L)) for mu in mults]
        cells.append(
          ""
          if None in got
          else " / ".join(f"{g[0]['exact_match']:.2f}" for g in got)
        )
      table.append(cells)
    at = " / ".join(f"{m}x" for m in mults)
    out.append(
      f"**{task}, L={L}, protocol {protocol}, per seed** (exact match at "
      f"{at} L)\n\n"
      + C.markdown_table(table, ["kind"] + [f"seed {s}" for s in seeds])
    )
  return "\n\n".join(out)


def warmup_table(rows) -> str:
  rows = [r for r in rows if r["part"] == "warmup"]
  if not rows:
    return ""
  out = []
  for (task, L), rs in group(rows, "task", "train_len").items():
    mults = sorted({r["eval_len"] // L for r in rs})
    table = []
    for w, wr in sorted(group(rs, "warmup_steps").items()):
      cells = [str(w[0]), str(len({r["seed"] for r in wr}))]
      for mu in mults:
        ex = [r["exact_match"] for r in wr if r["eval_len"] == mu * L]
        cells.append(spread(ex) if ex else "")
      table.append(cells)
    out.append(
      f"**{task}, L={L}, {rs[0]['label']}: exact match vs dense warm-up "
      f"steps** (then {rs[0]['adapt_steps']} sparse steps)\n\n"
      + C.markdown_table(
        table, ["warm-up steps", "seeds"] + [f"{m}x L" for m in mults]
      )
    )
  return "\n\n".join(out)


def dense_table(scores, st) -> str:
  """The dense models the convert protocol starts from: exact match at L
  per seed, their pretraining time, and "refused" where the score is under
  `min_dense_exact` (that cell's convert models are not trained)."""
  if not scores:
    return ""
  table = []
  for (task, L), rs in group(scores, "task", "train_len").items():
    by_seed = {r["seed"]: r for r in rs}
    cells = [task, str(L)]
    for seed in st.seeds:
      r = by_seed.get(seed)
      if r is None:
        cells.append("")
        continue
      cell = f"{r['exact_match']:.2f} ({r['pretrain_time_s']:.0f} s)"
      if not st.converts(r["exact_match"]):
        cell += ", refused"
      cells.append(cell)
    table.append(cells)
  header = ["task", "L"] + [f"seed {s}" for s in st.seeds]
  return (
    "**Dense models before conversion** (exact match at L, pretraining "
    "seconds; the study converts only those at >= "
    f"{st.min_dense_exact:.2f})\n\n" + C.markdown_table(table, header)
  )


def report(rows, st, out_dir, seconds: float | None, scores=()) -> str:
  md = "\n\n".join(
    x
    for x in (
      f"Retrieval study; {C.env_line()}. Cells: exact match, mean over "
      "seeds (min-max); keys/query: mean keys attended per query at the "
      f"training length. {len(rows)} rows"
      + ("." if seconds is None else f"; trained now in {seconds:.0f} s."),
      dense_table(list(scores), st),
      length_table(rows, "main"),
      length_table(rows, "scratch"),
      warmup_table(rows),
      seed_table(rows),
    )
    if x
  )
  with open(os.path.join(out_dir, "study.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  C.write_csv(os.path.join(out_dir, "study.csv"), rows, COLUMNS)
  plots(rows, out_dir)
  return md


def plots(rows, out_dir) -> None:
  plt = C.pyplot()
  if plt is None or not rows:
    return
  main = [r for r in rows if r["part"] in ("main", "scratch")]
  panels = list(group(main, "task", "train_len", "protocol"))
  if panels:
    fig, axes = plt.subplots(
      2, len(panels), figsize=(4.5 * len(panels), 8), squeeze=False
    )
    for col, (task, L, protocol) in enumerate(panels):
      rs = [
        r
        for r in main
        if (r["task"], r["train_len"], r["protocol"]) == (task, L, protocol)
      ]
      ax, bx = axes[0][col], axes[1][col]
      # 14+ kinds: the default 10-colour cycle would give two kinds one colour.
      cmap = plt.get_cmap("tab20")
      for n, (label, lr) in enumerate(group(rs, "label").items()):
        color = cmap(n % cmap.N)  # an int picks the n-th of the 20 colours
        pts = sorted(
          (e[0], np.mean([r["exact_match"] for r in er]))
          for e, er in group(lr, "eval_len").items()
        )
        lw = 2.5 if label[0].startswith(("dsa", "dense")) else 1.2
        ax.plot(*zip(*pts), marker="o", lw=lw, label=label[0], color=color)
        at = [r for r in lr if r["eval_len"] == L]
        bx.scatter(
          np.mean([r["keys_per_query"] for r in at]),
          np.mean([r["exact_match"] for r in at]),
          label=label[0],
          color=color,
        )
        bx.annotate(
          label[0],
          (
            np.mean([r["keys_per_query"] for r in at]),
            np.mean([r["exact_match"] for r in at]),
          ),
          fontsize=6,
        )
      ax.set_xscale("log", base=2)
      ax.set_ylim(-0.03, 1.03)
      ax.set_title(f"{task} L={L} {protocol}", fontsize=9)
      ax.set_xlabel("evaluation length")
      ax.set_ylabel("exact match (mean over seeds)")
      ax.grid(True, alpha=0.3)
      bx.set_xscale("log", base=2)
      bx.set_ylim(-0.03, 1.03)
      bx.set_xlabel(f"keys per query at L={L}")
      bx.set_ylabel(f"exact match at L={L}")
      bx.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "study_length.png"), dpi=100)
    plt.close(fig)
  sweep = [r for r in rows if r["part"] == "warmup"]
  if sweep:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (task, L, mult), rs in group(
      [dict(r, mult=r["eval_len"] // r["train_len"]) for r in sweep],
      "task",
      "train_len",
      "mult",
    ).items():
      pts = sorted(
        (w[0], np.mean([r["exact_match"] for r in wr]))
        for w, wr in group(rs, "warmup_steps").items()
      )
      xs = [max(x, 1) for x, _ in pts]  # 0 steps drawn at 1 on the log axis
      ax.plot(
        xs, [y for _, y in pts], marker="o", label=f"{task} L={L} @{mult}x"
      )
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("dense warm-up steps (0 drawn at 1)")
    ax.set_ylabel("DSA exact match (mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "study_warmup.png"), dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--smoke", action="store_true", help="the tiny CI study")
  p.add_argument("--parts", default=",".join(PARTS), help="comma list")
  p.add_argument("--tasks", help="comma list (default: every task)")
  p.add_argument("--lens", help="comma list of training lengths")
  p.add_argument("--seeds", help="comma list (default 0,1,2)")
  p.add_argument(
    "--kinds", help="comma list of kinds or run labels (default: every run)"
  )
  p.add_argument("--out-dir", default="results/retrieval_study")
  p.add_argument("--report-only", action="store_true")
  p.add_argument(
    "--merge",
    nargs="+",
    metavar="DIR",
    help="add the models these out-dirs trained to --out-dir, then report",
  )
  p.add_argument("--list", action="store_true", help="print the models")
  p.add_argument(
    "--no-compile-cache",
    dest="compile_cache",
    action="store_false",
    help="no persistent XLA cache under <out-dir>/jax_cache",
  )
  a = p.parse_args(argv)
  ints = lambda s: tuple(int(x) for x in s.split(",")) if s else None
  a.parts = tuple(a.parts.split(","))
  for part in a.parts:
    if part not in PARTS:
      raise ValueError(f"--parts: unknown part {part!r}; known: {PARTS}")
  a.tasks = tuple(a.tasks.split(",")) if a.tasks else None
  a.lens, a.seeds = ints(a.lens), ints(a.seeds)
  a.kinds = tuple(a.kinds.split(",")) if a.kinds else None
  return a


def iter_lines(todo, st) -> Iterator[str]:
  for m in todo:
    yield (
      f"{m.part:8s} {m.task:9s} L={m.seq_len:5d} {m.protocol:8s} seed "
      f"{m.seed} {m.run[0]:15s} warm-up {m.warmup_steps:4d} steps "
      f"{m.steps(st):5d} {json.dumps(m.run[3], sort_keys=True)}"
    )


def main(argv=None):
  a = parse_args(argv)
  st = SMOKE if a.smoke else CPU
  todo = models(st, a.parts, a.tasks, a.lens, a.seeds, a.kinds)
  if a.list:
    for line in iter_lines(todo, st):
      print(line)
    return []
  os.makedirs(a.out_dir, exist_ok=True)
  if a.compile_cache:
    # Seeds differ only in data: their models compile to the same programs.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.join(a.out_dir, "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  log = lambda s: print(s, flush=True)
  t0 = time.perf_counter()
  if a.merge:
    merge(st, a.out_dir, a.merge, log)
  elif not a.report_only:
    run_study(st, a.out_dir, todo, log)
  # The report covers every part and seed the cache holds, not just this
  # invocation's selection.
  rows = study_rows(st, a.out_dir, models(st, PARTS))
  seconds = None if a.report_only or a.merge else time.perf_counter() - t0
  scores = score_dense(st, a.out_dir, log)
  md = report(rows, st, a.out_dir, seconds, scores)
  log(md)
  return rows


if __name__ == "__main__":
  main()
