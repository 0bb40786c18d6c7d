"""Data: a byte-level text corpus and synthetic long-context tasks.

Pure numpy; nothing is downloaded and jax is not imported. Everything a model
sees from this package lives in ONE vocabulary of 256 tokens, token id ==
byte value, so the same byte-level model trains on text and on every task.

  example   VOCAB_SIZE, Example, Batch, decode: what a model sees (the shift
            into inputs/targets and the answer mask)
  text      the text corpus: files, split by file, loading, DOC_SEP
  filler    the ASCII filler, numbers and names the text tasks are made of
  tasks     MQAR, passkey, needle in a haystack, variable tracking
  dataset   Dataset, TextDataset, TaskDataset, MixtureDataset, make_dataset:
            deterministic, resumable, shardable batches
  mixture   parse_mixture: specs such as "text:2+passkey" (rows drawn from
            text and tasks)
  checks    argument checks

Token conventions: `text` is the raw bytes of the files, each followed by
DOC_SEP; `tasks` documents the tasks' tokens (answers are always marked by
loss_mask, aligned with targets).
"""

from sparse_attn.data.checks import SPLITS
from sparse_attn.data.dataset import (
  Dataset,
  MixtureDataset,
  TaskDataset,
  TextDataset,
  make_dataset,
)
from sparse_attn.data.example import VOCAB_SIZE, Batch, Example, decode
from sparse_attn.data.mixture import parse_mixture
from sparse_attn.data.tasks import (
  MQAR_KEY_BASE,
  TASKS,
  MQARTask,
  NeedleTask,
  PasskeyTask,
  Task,
  VariableTrackingTask,
  mqar,
  niah,
  passkey,
  vartrack,
)
from sparse_attn.data.text import (
  DOC_SEP,
  TextCorpus,
  clear_cache,
  list_text_files,
  load_text,
  split_files,
)

__all__ = [
  "VOCAB_SIZE",
  "DOC_SEP",
  "MQAR_KEY_BASE",
  "TASKS",
  "SPLITS",
  "Example",
  "Batch",
  "TextCorpus",
  "list_text_files",
  "split_files",
  "load_text",
  "clear_cache",
  "Task",
  "MQARTask",
  "PasskeyTask",
  "NeedleTask",
  "VariableTrackingTask",
  "mqar",
  "passkey",
  "niah",
  "vartrack",
  "Dataset",
  "TextDataset",
  "TaskDataset",
  "MixtureDataset",
  "make_dataset",
  "parse_mixture",
  "decode",
]
