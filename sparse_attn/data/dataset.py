"""Deterministic, resumable datasets over the corpus and the tasks.

`Dataset.batch(step, batch_size, shard_index=, num_shards=)` is a pure
function: row r of the global batch at `step` is drawn from
np.random.default_rng(SeedSequence([seed, TRAIN_TAG, stream, step, r])) where
`stream` is a stable hash (crc32) of (dataset name, split). A run resumed at
step N gets exactly the batch it would have had, whatever was asked before,
and shard i of n computes only rows [i*B/n, (i+1)*B/n) of the global batch.
`eval_batch`/`eval_batches` use a separate stream that does not depend on
`seed`, so runs with different seeds are evaluated on the same examples.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator

import numpy as np

from sparse_attn.data.checks import as_int, check_split
from sparse_attn.data.example import VOCAB_SIZE, Batch, Example, stack
from sparse_attn.data.mixture import canonical, is_mixture, parse_mixture
from sparse_attn.data.tasks import TASKS, Task
from sparse_attn.data.text import TextCorpus, load_text

# Entropy words of the two random streams (the eval one is seed-free).
_EVAL_TAG = 0x5EED_E7A1
_TRAIN_TAG = 0x7EA1_0000


def _rows(batch_size: int, shard_index: int, num_shards: int) -> range:
  """The rows of the global batch that shard `shard_index` computes."""
  b = as_int("batch_size", batch_size, 1)
  n = as_int("num_shards", num_shards, 1)
  i = as_int("shard_index", shard_index, 0)
  if i >= n:
    raise ValueError(f"shard_index must be in [0, num_shards={n}), got {i}")
  if b % n:
    raise ValueError(
      f"batch_size={b} (global) must be divisible by num_shards={n}"
    )
  per = b // n
  return range(i * per, (i + 1) * per)


class Dataset:
  """Deterministic, resumable batches for next-token prediction.

  Every method is a pure function of (seed, split, step/index, rows): no
  iterator state, so resuming at step N or running on many hosts needs no
  bookkeeping. Attributes: name, seq_len, split, seed, vocab_size (256).
  """

  vocab_size: int = VOCAB_SIZE

  def __init__(self, name: str, seq_len: int, split: str, seed: int):
    self.name = name
    self.seq_len = as_int("seq_len", seq_len, 1)
    self.split = check_split(split)
    self.seed = as_int("seed", seed, 0)
    self._stream = zlib.crc32(f"{name}:{self.split}".encode())

  # Subclasses implement: one row from its rng (train) / eval row j.
  def _train_row(self, rng: np.random.Generator) -> Example:
    raise NotImplementedError

  def _eval_row(self, index: int, row: int, batch_size: int) -> Example:
    rng = np.random.default_rng(
      np.random.SeedSequence([_EVAL_TAG, self._stream, index, row])
    )
    return self._train_row(rng)

  def draw(self, rng: np.random.Generator) -> Example:
    """One training row drawn from `rng` (what batch() draws per row)."""
    return self._train_row(rng)

  def eval_row(self, index: int, row: int, batch_size: int) -> Example:
    """Row `row` of evaluation batch `index` of `batch_size` rows."""
    return self._eval_row(index, row, batch_size)

  def batch(
    self,
    step: int,
    batch_size: int,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
  ) -> Batch:
    """Rows [i*B/n, (i+1)*B/n) of the global batch for `step`.

    B = batch_size (global), i = shard_index, n = num_shards. Returns
    Batch(inputs int32[B/n, L], targets int32[B/n, L],
    loss_mask float32[B/n, L]).
    """
    step = as_int("step", step, 0)
    rows = _rows(batch_size, shard_index, num_shards)
    return stack(
      [
        self._train_row(
          np.random.default_rng(
            np.random.SeedSequence(
              [self.seed, _TRAIN_TAG, self._stream, step, r]
            )
          )
        )
        for r in rows
      ]
    )

  def batches(
    self,
    batch_size: int,
    *,
    start_step: int = 0,
    num_steps: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
  ) -> Iterator[Batch]:
    """batch(start_step), batch(start_step + 1), ... (forever if None)."""
    step = as_int("start_step", start_step, 0)
    stop = (
      None if num_steps is None else step + as_int("num_steps", num_steps, 0)
    )
    while stop is None or step < stop:
      yield self.batch(
        step, batch_size, shard_index=shard_index, num_shards=num_shards
      )
      step += 1

  def eval_batch(
    self,
    index: int,
    batch_size: int,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
  ) -> Batch:
    """Evaluation batch `index` (seed-free; from this dataset's split)."""
    index = as_int("index", index, 0)
    rows = _rows(batch_size, shard_index, num_shards)
    return stack([self._eval_row(index, r, batch_size) for r in rows])

  def eval_batches(
    self,
    num_batches: int,
    batch_size: int,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
  ) -> Iterator[Batch]:
    """eval_batch(0), ..., eval_batch(num_batches - 1), lazily; seed-free."""
    num_batches = as_int("num_batches", num_batches, 0)
    _rows(batch_size, shard_index, num_shards)  # validate eagerly
    return (
      self.eval_batch(
        i, batch_size, shard_index=shard_index, num_shards=num_shards
      )
      for i in range(num_batches)
    )

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(name={self.name!r}, "
      f"seq_len={self.seq_len}, split={self.split!r}, "
      f"seed={self.seed}, vocab_size={self.vocab_size})"
    )


class TextDataset(Dataset):
  """Random windows of seq_len + 1 bytes of a TextCorpus; loss_mask all ones.

  Training windows start at uniformly random offsets. Evaluation uses the
  `num_eval_windows` non-overlapping windows [w*(L+1), (w+1)*(L+1)) in a
  fixed shuffled order (wrapping around after all have been used).
  """

  def __init__(
    self,
    corpus: TextCorpus,
    seq_len: int,
    split: str = "train",
    seed: int = 0,
    name: str = "text",
  ):
    super().__init__(name, seq_len, split, seed)
    self.corpus = corpus
    self.data = corpus.data
    self.files = corpus.files
    n, w = int(self.data.shape[0]), self.seq_len + 1
    if n < w:
      raise ValueError(
        f"{split} split of the text corpus has {n} bytes "
        f"({len(self.files)} files), fewer than seq_len + 1 = "
        f"{w}; use a larger corpus/max_bytes or a smaller "
        f"seq_len"
      )
    self.num_bytes = n
    self.num_eval_windows = n // w
    self._eval_order: np.ndarray | None = None

  def _window(self, start: int) -> Example:
    seq = np.asarray(
      self.data[start : start + self.seq_len + 1], dtype=np.int32
    )
    return Example(seq[:-1], seq[1:], np.ones(self.seq_len, np.float32))

  def _train_row(self, rng: np.random.Generator) -> Example:
    return self._window(int(rng.integers(0, self.num_bytes - self.seq_len)))

  @property
  def eval_order(self) -> np.ndarray:
    """int[num_eval_windows]: the aligned window evaluation row i reads is
    eval_order[i % num_eval_windows] (a fixed permutation of all windows)."""
    if self._eval_order is None:
      rng = np.random.default_rng(
        np.random.SeedSequence([_EVAL_TAG, self.num_eval_windows])
      )
      self._eval_order = rng.permutation(self.num_eval_windows)
    return self._eval_order

  def _eval_row(self, index: int, row: int, batch_size: int) -> Example:
    w = self.seq_len + 1
    window = self.eval_order[(index * batch_size + row) % self.num_eval_windows]
    return self._window(int(window) * w)


class TaskDataset(Dataset):
  """Batches of a synthetic task (one independent example per row)."""

  def __init__(self, task: Task, split: str = "train", seed: int = 0):
    super().__init__(task.name, task.seq_len, split, seed)
    self.task = task

  def _train_row(self, rng: np.random.Generator) -> Example:
    return self.task.sample(rng)

  def __repr__(self) -> str:
    return f"TaskDataset({self.task!r}, split={self.split!r}, seed={self.seed})"


class MixtureDataset(Dataset):
  """Rows drawn from component datasets with fixed probabilities.

  Training row r of step s: the row's own rng picks component c with
  probability weights[c] / sum(weights), then draws c's row from the same
  rng, so batches stay a pure function of (seed, split, step, row).
  Evaluation takes the parts in turn, whatever the weights: row r of
  evaluation batch i is the g-th row overall (g = i * batch_size + r), and
  comes from component g % n, whose own evaluation rows it reads in order
  (so over batches every part is evaluated equally often, within one row,
  even when batch_size < n). All components must have the same seq_len.
  """

  def __init__(
    self,
    components: list[Dataset],
    weights: list[float],
    name: str,
    split: str = "train",
    seed: int = 0,
  ):
    if not components or len(components) != len(weights):
      raise ValueError(
        f"MixtureDataset needs one weight per component, got "
        f"{len(components)} components and {len(weights)} weights"
      )
    lengths = {c.seq_len for c in components}
    if len(lengths) != 1:
      raise ValueError(
        f"mixture components must share seq_len, got {sorted(lengths)}"
      )
    w = np.asarray(weights, np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
      raise ValueError(f"mixture weights must be finite and > 0, got {weights}")
    super().__init__(name, components[0].seq_len, split, seed)
    self.components = list(components)
    self.probabilities = w / w.sum()

  def _train_row(self, rng: np.random.Generator) -> Example:
    c = int(rng.choice(len(self.components), p=self.probabilities))
    return self.components[c].draw(rng)

  def _eval_row(self, index: int, row: int, batch_size: int) -> Example:
    n = len(self.components)
    g = index * batch_size + row
    mine = g // n  # this component's g-th evaluation row, in batches of B
    return self.components[g % n].eval_row(
      mine // batch_size, mine % batch_size, batch_size
    )

  def __repr__(self) -> str:
    parts = ", ".join(
      f"{c.name}: {p:.3g}" for c, p in zip(self.components, self.probabilities)
    )
    return (
      f"MixtureDataset({{{parts}}}, seq_len={self.seq_len}, "
      f"split={self.split!r}, seed={self.seed})"
    )


_TEXT_KWARGS = ("val_fraction", "suffixes", "cache_dir")


def make_dataset(
  name: str,
  *,
  seq_len: int,
  split: str = "train",
  seed: int = 0,
  path=None,
  max_bytes: int | None = None,
  **kwargs,
) -> Dataset:
  """Builds a dataset by name.

  name: "text" (stdlib sources, or `path`), or a synthetic task in TASKS:
    "mqar", "passkey", "niah", "vartrack".
  seq_len: L, the length of inputs/targets/loss_mask rows.
  split: "train" or "validation" (text: disjoint file sets; tasks: different
    random streams).
  seed: int >= 0; batch(step) depends only on (seed, split, step, shard).
  path, max_bytes (+ val_fraction, suffixes, cache_dir): text only, see
    load_text.
  **kwargs: task options (see MQARTask, PasskeyTask, NeedleTask,
    VariableTrackingTask).

  A mixture spec, e.g. "text+passkey" or "text:2+passkey:1"
  (`sparse_attn.data.mixture`), builds a MixtureDataset of those datasets;
  path/max_bytes go to its text part, and kwargs are per part, keyed by
  name: make_dataset("text+passkey", seq_len=128, passkey={"num_digits": 5}).
  """
  split = check_split(split)
  if is_mixture(name):
    return _make_mixture(name, seq_len, split, seed, path, max_bytes, kwargs)
  if name == "text":
    _check_options(name, kwargs)
    seq_len = as_int("seq_len", seq_len, 1)
    corpus = load_text(path, split=split, max_bytes=max_bytes, **kwargs)
    return TextDataset(corpus, seq_len, split=split, seed=seed)
  if name not in TASKS:
    raise ValueError(
      f"unknown dataset {name!r}; expected 'text' or one of {sorted(TASKS)}"
    )
  if path is not None or max_bytes is not None:
    raise ValueError(
      f"path/max_bytes apply only to 'text', not to the synthetic task {name!r}"
    )
  _check_options(name, kwargs)
  return TaskDataset(TASKS[name](seq_len, **kwargs), split=split, seed=seed)


def _check_options(name: str, options: dict) -> None:
  """ValueError naming the options dataset `name` does not take."""
  if name == "text":
    accepted = ["path", "max_bytes", *_TEXT_KWARGS]
  else:
    accepted = [f.name for f in dataclasses.fields(TASKS[name])]
    accepted.remove("seq_len")
  bad = sorted(set(options) - set(accepted))
  if bad:
    raise ValueError(
      f"unknown option(s) {bad} for {name!r}; accepted: {accepted}"
    )


def check_dataset(
  spec: str,
  *,
  seq_len: int,
  options: dict[str, dict] | None = None,
  has_path: bool = False,
) -> list[tuple[str, float]]:
  """The parts of dataset spec `spec` (a name or a mixture), checked.

  options: per part, {"passkey": {"num_digits": 5}}. Raises ValueError
  naming the problem: an unknown name, options for a part the spec does not
  name or that the task does not take, a task too long for seq_len, a text
  path without a text part.
  """
  parts = parse_mixture(spec)
  names = [n for n, _ in parts]
  options = dict(options or {})
  unknown = [n for n in names if n != "text" and n not in TASKS]
  if unknown:
    raise ValueError(
      f"dataset {spec!r}: unknown dataset(s) {unknown}; expected 'text' or "
      f"one of {sorted(TASKS)} (or a mixture such as 'text+passkey')"
    )
  extra = sorted(set(options) - set(names))
  if extra:
    raise ValueError(
      f"dataset options name {extra}, which are not parts of {spec!r} "
      f"(options are per part: {names[0]}={{...}})"
    )
  if has_path and "text" not in names:
    raise ValueError(f"a text path needs a 'text' part in {spec!r}")
  for name in names:
    opts = options.get(name) or {}
    if not isinstance(opts, dict):
      raise ValueError(f"options of {name!r} must be a dict, got {opts!r}")
    _check_options(name, opts)
    if name != "text":
      TASKS[name](seq_len, **opts)  # the task's own checks (lengths, ranges)
  return parts


def _make_mixture(name, seq_len, split, seed, path, max_bytes, kwargs):
  parts = check_dataset(
    name,
    seq_len=seq_len,
    options=kwargs,
    has_path=path is not None or max_bytes is not None,
  )
  components = []
  for part, _ in parts:
    options = dict(kwargs.get(part) or {})
    if part == "text":
      options.update(path=path, max_bytes=max_bytes)
    components.append(
      make_dataset(part, seq_len=seq_len, split=split, seed=seed, **options)
    )
  return MixtureDataset(
    components,
    [w for _, w in parts],
    name=canonical(name),
    split=split,
    seed=seed,
  )
