"""Datasets of a run and their batches as global arrays on the run's mesh.

Each process loads only the rows of the global batch its devices hold
(`Dataset.batch(..., shard_index=, num_shards=)`), and the rows of all
processes are assembled into one global jax.Array per field, so the same
code runs on one device, a mesh of devices and many hosts.
"""

from __future__ import annotations

from typing import Any

import jax

from sparse_attn import sharding as shd
from sparse_attn.config import Config
from sparse_attn.data import Batch, Dataset, make_dataset
from sparse_attn.data.mixture import is_mixture, parse_mixture
from sparse_attn.training.state import Setup


def make_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
  """(train, validation) datasets of cfg.train: its dataset (one name or a
  mixture spec), dataset_options, length and seed; text parts read
  data_path, max_bytes (train) and eval_max_bytes (validation)."""
  t = cfg.train
  options = t.dataset_options_dict
  has_text = "text" in [n for n, _ in parse_mixture(t.dataset)]

  def build(split: str, max_bytes: int | None) -> Dataset:
    kw: dict[str, Any] = (
      options if is_mixture(t.dataset) else options.get(t.dataset, {})
    )
    if has_text:
      kw = dict(kw, path=t.data_path, max_bytes=max_bytes)
    return make_dataset(
      t.dataset, seq_len=t.seq_len, split=split, seed=t.seed, **kw
    )

  return build("train", t.max_bytes), build("validation", t.eval_max_bytes)


def global_batch(s: Setup, local: Batch) -> dict[str, jax.Array]:
  """This process's rows of a batch -> the global batch of the run.

  local: Batch of [B/n, L] arrays (n = processes sharing the batch; all B
  rows on one process). Returns {"inputs", "targets", "loss_mask"}: global
  [B, L] arrays on s.batch_sharding (B = cfg.train.batch_size).
  """
  rows = {
    "inputs": local.inputs,
    "targets": local.targets,
    "loss_mask": local.loss_mask,
  }
  return shd.make_global_batch(rows, s.batch_sharding, s.cfg.train.batch_size)


class BatchLoader:
  """Global batches of a dataset, by step: each process loads its own rows."""

  def __init__(self, dataset: Dataset, s: Setup):
    self.dataset, self.s = dataset, s
    self.batch_size = s.cfg.train.batch_size
    self.shard, self.num_shards = shd.local_batch_rows(
      s.batch_sharding, self.batch_size
    )

  def train(self, step: int) -> dict[str, jax.Array]:
    """The global training batch of data step `step`."""
    return global_batch(
      self.s,
      self.dataset.batch(
        step,
        self.batch_size,
        shard_index=self.shard,
        num_shards=self.num_shards,
      ),
    )

  def eval(self, index: int) -> dict[str, jax.Array]:
    """The global evaluation batch `index`."""
    return global_batch(
      self.s,
      self.dataset.eval_batch(
        index,
        self.batch_size,
        shard_index=self.shard,
        num_shards=self.num_shards,
      ),
    )
