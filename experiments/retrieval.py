"""Retrieval suite: does DSA keep dense quality at a small key budget where fixed patterns fail?

For each synthetic task (sparse_attn.data: mqar, passkey, niah, vartrack) and
each attention kind (dense, DSA at several top_k, and every baseline kind at
DSA's key budget), a small decoder is trained through the library's training
API (`sparse_attn.training.setup / init_state / run_stages`: the same jitted
steps, optimisers and stage loop as `training.train`), then evaluated on answer
tokens: exact match (every answer token of an example right, greedy argmax
under teacher forcing) and per-token accuracy, at the training length and at
longer lengths (length generalisation, same task parameters, more filler).

Protocols (--protocol):
  convert (default; DeepSeek-V3.2-Exp's recipe): a dense model is pretrained
    once per task (--pretrain-steps); every kind then starts from that
    checkpoint (`training.init_from`: parameters with the same path and shape
    are copied; kind-only parameters such as the indexer or NSA's gates keep
    their init) and trains --adapt-steps more steps. DSA spends
    --warmup-steps of those in the dense warm-up (main model frozen, indexer
    learns the dense attention), the rest in the sparse stage; every other
    kind (dense included) trains all warmup+adapt steps on the LM loss, so
    every kind sees the same number of steps and data.
  scratch: every kind is trained from scratch for pretrain+adapt steps
    (DSA: --warmup-steps of dense warm-up on the random model, then sparse).

Key budget: baselines get the kind parameter that brings their mean keys per
query (causal, at the training length) closest to DSA's at --budget-top-k
(`sparse_attn.budgets.key_budget`); the table reports the keys per query each
model actually attended at every evaluation length (the `attended_keys`
aux of the layers).

  python experiments/retrieval.py --quick        # 2-core CPU, < ~20 min
  python experiments/retrieval.py --full         # accelerator, L >= 8K
  python experiments/retrieval.py --smoke --out-dir /tmp/r   # CI (< 40 s)
  python experiments/retrieval.py --quick --tasks passkey --kinds dense,dsa,sliding_window
  python experiments/retrieval.py --quick --tasks vartrack --kinds dense \
      --model num_layers=4 --task-options num_hops=1   # other sizes / options

Writes <out-dir>/retrieval.csv, retrieval.md, retrieval.png (and
retrieval_config.json with the exact settings).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sparse_attn import registry  # noqa: E402
from sparse_attn import training as T  # noqa: E402
from sparse_attn.budgets import key_budget, match_budget  # noqa: E402
from sparse_attn.config import Config, ModelConfig, TrainConfig  # noqa: E402
from sparse_attn.data import make_dataset  # noqa: E402

COLUMNS = (
  "task",
  "kind",
  "label",
  "protocol",
  "train_len",
  "eval_len",
  "exact_match",
  "token_acc",
  "n_examples",
  "keys_per_query",
  "budget_nominal",
  "attended_fraction",
  "train_time_s",
  "pretrain_time_s",
  "steps",
  "final_loss",
  "top_k",
  "params",
)


@dataclasses.dataclass
class Preset:
  tasks: tuple[str, ...]
  seq_len: int
  eval_lens: tuple[int, ...]
  dsa_top_k: tuple[int, ...]
  budget_top_k: int
  kinds: tuple[str, ...]
  pretrain_steps: int
  warmup_steps: int
  adapt_steps: int
  batch_size: int
  eval_examples: int
  model: dict
  lr: float = 3e-3
  adapt_lr: float = 1e-3
  lr_warmup_steps: int = 20
  # A first phase of the dense pretraining at a shorter length: (length,
  # steps, peak lr), or None. Passkey, whose answer hides in filler, is
  # learned in a few hundred steps at L=128 and carries over to the training
  # length (RoPE is relative); at L=512 directly, 650 steps at lr 1e-3 left
  # a 2-layer dense model at chance (docs/experiments.md).
  pretrain_short: tuple[int, int, float] | None = None
  # Per task: generator options over _common.TASK_OPTIONS' (--task-options;
  # e.g. {"vartrack": {"num_hops": 1}}), so one run or study can change a
  # task without changing it for the other scripts.
  task_options: dict[str, dict[str, int]] = dataclasses.field(
    default_factory=dict
  )

  def options(self, task: str) -> dict[str, int]:
    """The task's generator options: TASK_OPTIONS, this preset's over them."""
    return dict(C.TASK_OPTIONS.get(task, {}), **self.task_options.get(task, {}))


# Every kind compared on one GQA layer (dense and dsa first; not the MLA
# kinds, whose projections differ).
ALL_KINDS = registry.comparable_names()

PRESETS = {
  # Sizes measured on a shared 2-core CPU: see docs/experiments.md.
  "quick": Preset(
    tasks=("mqar",),
    seq_len=64,
    eval_lens=(64, 128, 256),
    dsa_top_k=(8, 16),
    budget_top_k=8,
    kinds=ALL_KINDS,
    pretrain_steps=300,
    warmup_steps=10,
    adapt_steps=40,
    batch_size=32,
    eval_examples=64,
    model=dict(
      embed_dim=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=384,
      indexer_heads=4,
      indexer_dim=32,
    ),
    lr=1e-3,
    adapt_lr=1e-3,
    lr_warmup_steps=10,
  ),
  "full": Preset(
    tasks=("mqar", "passkey", "niah", "vartrack"),
    seq_len=8192,
    eval_lens=(8192, 16384, 32768),
    dsa_top_k=(128, 256, 512),
    budget_top_k=256,
    kinds=ALL_KINDS,
    pretrain_steps=3000,
    warmup_steps=100,
    adapt_steps=1000,
    batch_size=16,
    eval_examples=256,
    model=dict(
      embed_dim=256,
      num_layers=4,
      num_heads=8,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=768,
      indexer_heads=4,
      indexer_dim=32,
    ),
    lr=1e-3,
    adapt_lr=5e-4,
    lr_warmup_steps=100,
  ),
  "smoke": Preset(
    tasks=("mqar",),
    seq_len=64,
    eval_lens=(64, 128),
    dsa_top_k=(8,),
    budget_top_k=8,
    kinds=("dense", "dsa", "sliding_window"),
    pretrain_steps=3,
    warmup_steps=1,
    adapt_steps=2,
    batch_size=4,
    eval_examples=4,
    model=dict(
      embed_dim=32,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      mlp_dim=64,
      indexer_heads=2,
      indexer_dim=8,
    ),
    lr_warmup_steps=1,
  ),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  g = p.add_mutually_exclusive_group()
  for name in PRESETS:
    g.add_argument(
      f"--{name}",
      dest="preset",
      action="store_const",
      const=name,
      help=f"the {name} preset",
    )
  p.add_argument("--tasks", help="comma list (default: the preset's)")
  p.add_argument("--kinds", help="comma list of attention kinds")
  p.add_argument("--dsa-top-k", help="comma list of DSA top_k values")
  p.add_argument(
    "--budget-top-k",
    type=int,
    help="baselines match DSA's key budget at this top_k",
  )
  p.add_argument("--seq-len", type=int)
  p.add_argument("--eval-lens", help="comma list of evaluation lengths")
  p.add_argument("--pretrain-steps", type=int)
  p.add_argument(
    "--pretrain-short",
    metavar="LEN,STEPS,LR",
    help="dense pretraining first trains STEPS steps at length LEN, peak "
    "lr LR (passkey at L >= 512 needs it)",
  )
  p.add_argument(
    "--model",
    metavar="KEY=VALUE,...",
    help="override the preset's model sizes, e.g. num_layers=4 (vartrack "
    "needs more than 2 layers)",
  )
  p.add_argument(
    "--task-options",
    metavar="KEY=VALUE,...",
    help="override the generator options of every task run, e.g. "
    "num_hops=1 for vartrack (default: _common.TASK_OPTIONS)",
  )
  p.add_argument("--warmup-steps", type=int)
  p.add_argument("--adapt-steps", type=int)
  p.add_argument("--batch-size", type=int)
  p.add_argument("--eval-examples", type=int)
  p.add_argument(
    "--protocol", choices=("convert", "scratch"), default="convert"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default="results/retrieval")
  a = p.parse_args(argv)
  a.preset = a.preset or "quick"
  pr = dataclasses.replace(PRESETS[a.preset])
  ints = lambda s: tuple(int(x) for x in s.split(",") if x)
  if a.tasks:
    pr.tasks = tuple(a.tasks.split(","))
  if a.kinds:
    pr.kinds = tuple(a.kinds.split(","))
  if a.dsa_top_k:
    pr.dsa_top_k = ints(a.dsa_top_k)
  if a.eval_lens:
    pr.eval_lens = ints(a.eval_lens)
  if a.pretrain_short:
    parts = a.pretrain_short.split(",")
    if len(parts) != 3:
      raise ValueError(
        f"--pretrain-short: LEN,STEPS,LR expected, got {a.pretrain_short!r}"
      )
    pr.pretrain_short = (int(parts[0]), int(parts[1]), float(parts[2]))
  if a.model:
    model = int_options("--model", a.model)
    unknown = sorted(set(model) - set(pr.model))
    if unknown:
      raise ValueError(
        f"--model: unknown keys {unknown}; known: {sorted(pr.model)}"
      )
    pr.model = dict(pr.model, **model)
  if a.task_options:
    opts = int_options("--task-options", a.task_options)
    pr.task_options = {
      task: dict(pr.task_options.get(task, {}), **opts) for task in pr.tasks
    }
  for f in (
    "budget_top_k",
    "seq_len",
    "pretrain_steps",
    "warmup_steps",
    "adapt_steps",
    "batch_size",
    "eval_examples",
  ):
    if getattr(a, f) is not None:
      setattr(pr, f, getattr(a, f))
  for k in pr.kinds:
    if k not in ALL_KINDS:
      raise ValueError(f"unknown kind {k!r}; known: {ALL_KINDS}")
  return a, pr


def int_options(flag: str, text: str) -> dict[str, int]:
  """Parses `a=1,b=2` into {"a": 1, "b": 2}; ValueError naming the flag."""
  out = {}
  for item in text.split(","):
    key, eq, value = item.partition("=")
    try:
      if not (key and eq):
        raise ValueError
      out[key.strip()] = int(value)
    except ValueError:
      raise ValueError(
        f"{flag}: KEY=INT,... expected, got {text!r} (at {item!r})"
      ) from None
  return out


# ---------------------------------------------------------------------------
# runs


def runs_for(pr: Preset):
  """(label, kind, top_k, attention_params) for every model to train."""
  target = key_budget("dsa", pr.seq_len, top_k=pr.budget_top_k)
  out = []
  for kind in pr.kinds:
    if kind == "dsa":
      for k in pr.dsa_top_k:
        out.append((f"dsa_k{k}", "dsa", k, {"top_k": k}))
    elif kind == "dense":
      out.append(("dense", "dense", pr.budget_top_k, {}))
    else:
      params = match_budget(kind, pr.seq_len, target)
      out.append((kind, kind, pr.budget_top_k, params))
  return out


def make_config(
  pr: Preset,
  task: str,
  kind: str,
  top_k: int,
  params: dict,
  *,
  warmup: int,
  steps: int,
  lr: float,
  seed: int,
) -> Config:
  model = ModelConfig(
    top_k=top_k,
    implementation="xla" if jax.default_backend() == "cpu" else None,
    **pr.model,
  ).with_attention(kind, **params)
  opts = pr.options(task)
  train = TrainConfig(
    dataset=task,
    seq_len=pr.seq_len,
    batch_size=pr.batch_size,
    seed=seed,
    warmup_stage_steps=warmup,
    sparse_stage_steps=steps,
    lr=lr,
    indexer_lr=lr,
    lr_warmup_steps=pr.lr_warmup_steps,
    dataset_options={task: opts} if opts else {},
    checkpoint_every=0,
    eval_every=0,
    log_every=10**9,
  )
  return Config(model=model, train=train, name=f"retrieval_{task}_{kind}")


def dataset(task, length, split, seed=0, options=None):
  """The task's dataset; options: its generator options (default: the
  script's TASK_OPTIONS, as Preset.options gives them without overrides)."""
  if options is None:
    options = C.TASK_OPTIONS.get(task, {})
  return make_dataset(task, seq_len=length, split=split, seed=seed, **options)


LOG_EVERY_S = 300.0


def train_steps(
  s, state, ds, first_step: int, log, label: str, *, start=0, on_step=None
):
  """Runs both stages of s.cfg on ds batches first_step, first_step+1, ...
  from training step `start`; on_step(result) after each step.

  Logs four times per run, and at least every LOG_EVERY_S seconds (long
  pretrainings); returns (state, the metrics last logged).
  """
  total = s.cfg.train.total_steps
  every = max(1, total // 4)
  last = None
  timed: list[tuple[int, float]] = []  # (step, time) of the logs so far
  started = time.perf_counter()

  def log_step(r):
    nonlocal last
    since = time.perf_counter() - (timed[-1][1] if timed else started)
    if r.step % every == 0 or r.step == total or since >= LOG_EVERY_S:
      last = T.host_metrics(r.metrics)
      timed.append((r.step, time.perf_counter()))
      eta = ""
      if len(timed) > 1 and r.step < total:  # the first log holds compiles
        (s0, t0), (s1, t1) = timed[0], timed[-1]
        left = (t1 - t0) / (s1 - s0) * (total - s1)
        eta = f" eta {C.eta_text(left)}"
      log(
        f"    [{label}:{r.stage}] step {r.step}/{total} loss "
        f"{last['loss']:.4f} kl {last['indexer_kl']:.4f} attended "
        f"{last['attended_fraction']:.3f}{eta}"
      )
    if on_step is not None:
      on_step(r)

  state = T.run_stages(
    s, state, ds, first_step=first_step, start=start, on_step=log_step
  )
  return state, last


def make_eval_fn(s, mode):
  def fn(params, inputs, targets, mask):
    model = nnx.merge(s.graphdef, params["indexer"], params["main"])
    logits, aux = model(inputs, mode=mode)
    ok = (jnp.argmax(logits, -1) == targets) & (mask > 0)
    exact = jnp.all(ok | (mask == 0), axis=-1) & (jnp.sum(mask, -1) > 0)
    return {
      "exact": jnp.sum(exact),
      "tok_ok": jnp.sum(ok),
      "tok": jnp.sum(mask),
      "attended": aux["attended_keys"],
      "visible": aux["visible_keys"],
    }

  return jax.jit(fn)


def evaluate(s, state, task, length, n_examples, eval_fn, options=None):
  ds = dataset(task, length, "validation", options=options)
  bsz = min(n_examples, 16)
  tot = {}
  n_batches = -(-n_examples // bsz)
  for i in range(n_batches):
    b = ds.eval_batch(i, bsz)
    out = eval_fn(
      state["params"],
      jnp.asarray(b.inputs),
      jnp.asarray(b.targets),
      jnp.asarray(b.loss_mask),
    )
    for k, v in out.items():
      tot[k] = tot.get(k, 0.0) + float(v)
  n = n_batches * bsz
  num_layers = s.cfg.model.num_layers
  return {
    "exact_match": tot["exact"] / n,
    "token_acc": tot["tok_ok"] / tot["tok"],
    "n_examples": n,
    "keys_per_query": tot["attended"] / (num_layers * n * length),
    "attended_fraction": tot["attended"] / max(tot["visible"], 1.0),
  }


def pretrain_dense(
  pr: Preset,
  task: str,
  seed: int,
  log,
  checkpoint: str | None = None,
  save_every_s: float = 600.0,
  init=None,
):
  """The convert protocol's shared dense model: (training state, seconds).

  init: params["main"] of a dense model of the same architecture (e.g.
  one pretrained at a shorter length) that the first phase starts from,
  with a fresh optimiser; None starts from the initialisation.

  With pr.pretrain_short, the model first trains that phase at its length
  (a fresh optimiser and schedule), then pr.pretrain_steps at pr.seq_len
  from those parameters; the seconds cover both phases.

  checkpoint: a directory. The whole training state is saved there with the
  library's orbax checkpoints (`training.checkpoint_manager`, one run
  directory per phase: `<checkpoint>/phase<n>/`, the seconds so far kept
  with each step) every save_every_s seconds of training and at the end of
  each phase. A call with the same directory resumes from the latest step
  of the latest phase: same batches, same optimiser state, so a killed
  pretraining ends with the model an uninterrupted one gives. The caller
  keys the directory by the settings and deletes it once it has the model.
  """
  clock = time.perf_counter
  t0 = clock()
  phases = [dataclasses.replace(pr, pretrain_short=None)]
  if pr.pretrain_short is not None:
    length, steps, lr = pr.pretrain_short
    phases.insert(
      0,
      dataclasses.replace(
        pr, seq_len=length, pretrain_steps=steps, lr=lr, pretrain_short=None
      ),
    )
  cfgs = [
    make_config(
      ph,
      task,
      "dense",
      ph.budget_top_k,
      {},
      warmup=0,
      steps=ph.pretrain_steps,
      lr=ph.lr,
      seed=seed,
    )
    for ph in phases
  ]
  with contextlib.ExitStack() as stack:
    # One manager per phase for the whole call: a manager cleans up the
    # leftovers of a killed save in the background, and two on one folder
    # could both try.
    mngrs: list[Any] = [None] * len(phases)
    if checkpoint is not None:
      mngrs = [
        stack.enter_context(
          _managed(T.checkpoint_manager(_phase_dir(checkpoint, n), c))
        )
        for n, c in enumerate(cfgs)
      ]
    resume = _latest_step(mngrs, checkpoint)  # (phase, step, seconds)
    before = 0.0 if resume is None else resume[2]

    def seconds():
      return before + clock() - t0

    main = init
    state: Any = None  # the last phase always runs: set by the loop
    for n, (ph, cfg, mngr) in enumerate(zip(phases, cfgs, mngrs, strict=True)):
      if resume is not None and n < resume[0]:
        continue
      s = T.setup(cfg)
      start = 0
      if resume is not None and n == resume[0]:
        start = resume[1]
        state = _restore(mngr, s, start, checkpoint)
        log(
          f"  [{task}] dense pretraining resumed at step {start}/"
          f"{ph.pretrain_steps} of L={ph.seq_len} from {checkpoint}"
        )
      else:
        state = T.init_state(s)
        if main is not None:
          state, _ = T.init_from(state, main)
        log(
          f"  [{task}] dense pretraining: {ph.pretrain_steps} steps at "
          f"L={ph.seq_len}"
          + (" (after the short phase)" if n > 0 else "")
          + (
            " (from the given dense model)"
            if n == 0 and init is not None
            else ""
          )
        )
      ds = dataset(task, ph.seq_len, "train", seed, ph.options(task))
      saver = _PretrainSaver(mngr, save_every_s, seconds)
      state, _ = train_steps(
        s, state, ds, 0, log, "pretrain", start=start, on_step=saver.on_step
      )
      jax.block_until_ready(state)
      if n < len(phases) - 1:
        saver.save(ph.pretrain_steps, state)
      main = state["params"]["main"]
  pre_time = seconds()
  log(f"  [{task}] pretraining took {pre_time:.0f} s")
  return state, pre_time


def _phase_dir(checkpoint: str, phase: int) -> str:
  return os.path.join(checkpoint, f"phase{phase}")


@contextlib.contextmanager
def _managed(mngr):
  """mngr, its pending saves finished and closed on exit (a kill included)."""
  try:
    yield mngr
  finally:
    mngr.wait_until_finished()
    mngr.close()


def _latest_step(mngrs, checkpoint):
  """(phase, step, seconds so far) of the latest checkpoint, or None."""
  for n in reversed(range(len(mngrs))):
    step = None if mngrs[n] is None else mngrs[n].latest_step()
    if step is None:
      continue
    meta = T.saved_metadata(mngrs[n], step)
    if "seconds" not in meta:
      raise ValueError(
        f"{_phase_dir(checkpoint, n)}: step {step} was not saved by "
        "pretrain_dense (no seconds); delete the directory"
      )
    return n, step, float(meta["seconds"])
  return None


def _restore(mngr, s, step: int, checkpoint: str | None):
  try:
    return T.restore_state(mngr, s, step)
  except Exception as e:  # orbax's errors name neither the cause nor a fix
    raise ValueError(
      f"{checkpoint}: step {step} does not restore into this model's state "
      f"({type(e).__name__}: {e}); it was saved by other code or settings, "
      "delete the directory"
    ) from e


class _PretrainSaver:
  """Saves a phase of pretrain_dense through its orbax manager: at most
  every `every` seconds from on_step, and when asked (the phase's end).
  seconds(): the pretraining's seconds so far, earlier runs of it included."""

  def __init__(self, mngr, every: float, seconds):
    self.mngr, self.every, self.seconds = mngr, every, seconds
    self.last = time.perf_counter()
    # orbax refuses to save a step twice, and the phase-end save can repeat
    # one: the timed save of the last step, or the step a run resumed at.
    self.saved_step = None if mngr is None else mngr.latest_step()

  def save(self, step: int, state) -> None:
    if self.mngr is not None and step != self.saved_step:
      self.saved_step = step
      T.save_state(self.mngr, step, state, metadata={"seconds": self.seconds()})
    self.last = time.perf_counter()

  def on_step(self, r) -> None:
    # Here, before the next step donates r.state's buffers: save returns
    # once the arrays are on the host (the writing may go on in the
    # background).
    if self.mngr is not None and time.perf_counter() - self.last >= self.every:
      self.save(r.step, r.state)


def train_and_evaluate(
  pr: Preset,
  task: str,
  run: tuple[str, str, int, dict],
  *,
  protocol: str,
  seed: int,
  pre_main=None,
  pre_time: float = 0.0,
  log=print,
) -> list[dict]:
  """Trains one model of runs_for(pr) and evaluates it at every pr.eval_lens.

  convert: starts from pre_main (the dense model's params["main"]) and
  trains warmup_steps + adapt_steps; scratch: trains warmup_steps of its
  pretrain_steps + adapt_steps from a fresh init. Returns one row (COLUMNS)
  per evaluation length.
  """
  label, kind, top_k, params = run
  ds = dataset(task, pr.seq_len, "train", seed, pr.options(task))
  convert = protocol == "convert"
  if convert and pre_main is None:
    raise ValueError("pre_main: the convert protocol needs the dense model")
  cfg = make_config(
    pr,
    task,
    kind,
    top_k,
    params,
    warmup=pr.warmup_steps,
    steps=pr.adapt_steps + (0 if convert else pr.pretrain_steps),
    lr=pr.adapt_lr if convert else pr.lr,
    seed=seed,
  )
  # Converted models continue the dense model's data stream.
  first = pr.pretrain_steps if convert else 0
  t0 = time.perf_counter()
  s = T.setup(cfg)
  state = T.init_state(s)
  if convert:
    state, moved = T.init_from(
      state, pre_main, repeat=registry.get(kind).dense_copies
    )
    if moved.kept:
      log(
        f"    {label}: {len(moved.kept)} parameter(s) not in the dense "
        f"checkpoint keep their init"
      )
  state, last = train_steps(s, state, ds, first, log, label)
  jax.block_until_ready(state)
  train_time = time.perf_counter() - t0
  eval_fn = make_eval_fn(s, "sparse")
  rows = []
  for length in pr.eval_lens:
    ev = evaluate(
      s, state, task, length, pr.eval_examples, eval_fn, pr.options(task)
    )
    rows.append(
      {
        "task": task,
        "kind": kind,
        "label": label,
        "protocol": protocol,
        "train_len": pr.seq_len,
        "eval_len": length,
        "train_time_s": train_time,
        "pretrain_time_s": pre_time,
        "steps": s.cfg.train.total_steps,
        "final_loss": last["loss"] if last else None,
        "top_k": top_k,
        "budget_nominal": key_budget(kind, length, **params),
        "params": json.dumps(params, sort_keys=True),
        **ev,
      }
    )
    log(
      f"  [{task}] {label:15s} L={length:6d} exact {ev['exact_match']:.3f} "
      f"token {ev['token_acc']:.3f} keys/query {ev['keys_per_query']:.1f} "
      f"(train {train_time:.0f} s)"
    )
  return rows


def run_task(pr: Preset, a, task: str, log):
  rows = []
  pre_main, pre_time = None, 0.0
  if a.protocol == "convert":
    pre_state, pre_time = pretrain_dense(pr, task, a.seed, log)
    pre_main = pre_state["params"]["main"]
  runs = runs_for(pr)
  task_start = time.perf_counter()
  for n_done, run in enumerate(runs):
    if n_done:  # models differ in cost; the mean so far is the estimate
      left = (time.perf_counter() - task_start) / n_done * (len(runs) - n_done)
      log(
        f"  [{task}] model {n_done + 1}/{len(runs)} ({run[0]}); eta "
        f"{C.eta_text(left)} for this task"
      )
    rows += train_and_evaluate(
      pr,
      task,
      run,
      protocol=a.protocol,
      seed=a.seed,
      pre_main=pre_main,
      pre_time=pre_time,
      log=log,
    )
  return rows


# ---------------------------------------------------------------------------
# report


def summary_markdown(rows, pr):
  lens = sorted({r["eval_len"] for r in rows})
  header = ["task", "kind", "keys/query @train L", "train s"] + [
    f"L={l} exact / token" for l in lens
  ]
  table = []
  seen = []
  for r in rows:
    key = (r["task"], r["label"])
    if key not in seen:
      seen.append(key)
  for task, label in seen:
    rs = {
      r["eval_len"]: r
      for r in rows
      if r["task"] == task and r["label"] == label
    }
    first = rs[min(rs)]
    train_len = first["train_len"]
    at_train = rs.get(train_len, first)
    cells = [
      task,
      label,
      f"{at_train['keys_per_query']:.1f}",
      f"{first['train_time_s']:.0f}",
    ]
    for l in lens:
      r = rs.get(l)
      cells.append(
        ""
        if r is None
        else f"{r['exact_match']:.2f} / {r['token_acc']:.2f}"
        f" ({r['keys_per_query']:.0f}k)"
      )
    table.append(cells)
  pre = {r["task"]: r["pretrain_time_s"] for r in rows}
  note = (
    "Cells: exact-match / per-token accuracy on answer tokens (keys per "
    "query actually attended, mean over layers and positions). Train s: "
    "adaptation (or scratch) training time of that kind incl. "
    "compilation; shared dense pretraining: "
    + ", ".join(f"{t} {v:.0f} s" for t, v in pre.items())
    + "."
  )
  return C.markdown_table(table, header) + "\n\n" + note


def plot(rows, path):
  plt = C.pyplot()
  if plt is None:
    return False
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(
    1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False
  )
  for ax, task in zip(axes[0], tasks):
    labels = list(dict.fromkeys(r["label"] for r in rows if r["task"] == task))
    for label in labels:
      pts = sorted(
        (r["eval_len"], r["exact_match"])
        for r in rows
        if r["task"] == task and r["label"] == label
      )
      lw = 2.5 if label.startswith("dsa") or label == "dense" else 1.2
      ax.plot(*zip(*pts), marker="o", lw=lw, label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{task}: exact match vs eval length")
    ax.set_xlabel(f"evaluation length (trained at {rows[0]['train_len']})")
    ax.set_ylabel("exact match")
    ax.grid(True, alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None):
  a, pr = parse_args(argv)
  os.makedirs(a.out_dir, exist_ok=True)
  log = lambda s: print(s, flush=True)
  log(
    f"retrieval: preset {a.preset}, protocol {a.protocol}; "
    f"{dataclasses.asdict(pr)}; {C.env_line()}"
  )
  with open(
    os.path.join(a.out_dir, "retrieval_config.json"), "w", encoding="utf-8"
  ) as f:
    json.dump(
      {
        "preset": a.preset,
        "protocol": a.protocol,
        "seed": a.seed,
        "task_kwargs": {t: pr.options(t) for t in pr.tasks},
        **dataclasses.asdict(pr),
      },
      f,
      indent=2,
    )
  t0 = time.perf_counter()
  rows = []
  csv_path = os.path.join(a.out_dir, "retrieval.csv")
  for task in pr.tasks:
    rows += run_task(pr, a, task, log)
    C.write_csv(csv_path, rows, COLUMNS)
  total = time.perf_counter() - t0
  md = (
    f"Preset `{a.preset}`, protocol `{a.protocol}`, trained at "
    f"L={pr.seq_len}; {C.env_line()}; total {total:.0f} s.\n\n"
    + summary_markdown(rows, pr)
  )
  with open(
    os.path.join(a.out_dir, "retrieval.md"), "w", encoding="utf-8"
  ) as f:
    f.write(md + "\n")
  plot(rows, os.path.join(a.out_dir, "retrieval.png"))
  log(md)
  log(f"wrote {csv_path} ({total:.0f} s)")
  return rows


if __name__ == "__main__":
  main()
