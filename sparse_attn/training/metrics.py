"""Metrics of a run: to the host, the terminal, JSONL and TensorBoard.

Files: <run_dir>/metrics.jsonl (one JSON object per event) and
<run_dir>/tensorboard/ when tensorboardX (or torch's writer) is importable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax

from sparse_attn import sharding as shd


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """Replicated scalar metrics (of any process) -> Python floats.

  Waits for the step that produced them.
  """
  return {k: float(shd.to_host(v)) for k, v in metrics.items()}


def read_metrics(run_dir: str, event: str = "train") -> dict[int, dict]:
  """The last record per step of `event` in run_dir/metrics.jsonl."""
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("event") == event:
        out[rec["step"]] = rec
  return out


class MetricsLogger:
  """Terminal line + JSONL (+ TensorBoard if importable), process 0 only.

  run_dir None: no files (the echo only). enabled False: writes nothing
  (the other processes of a multi-host run).
  """

  def __init__(
    self, run_dir: str | None, enabled: bool, echo: Callable[[str], None] | None
  ):
    self.enabled = enabled
    self.echo = echo
    self.file = None
    self.tb = None
    if enabled and run_dir:
      self.file = open(
        os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8"
      )
      self.tb = _tensorboard(os.path.join(run_dir, "tensorboard"))

  def write(self, record: dict[str, Any], line: str | None = None) -> None:
    """Appends `record` to the JSONL (and TensorBoard); echoes `line`."""
    if not self.enabled:
      return
    if self.file:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()
    if self.tb is not None and "step" in record:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self.tb.add_scalar(
            f"{record.get('event', 'train')}/{k}", v, record["step"]
          )
    if line and self.echo:
      self.echo(line)

  def close(self) -> None:
    if self.file:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def _tensorboard(logdir: str):
  # Both writers are optional dependencies (not installed: no TensorBoard).
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  # pyright: ignore[reportMissingImports]

    return SummaryWriter(logdir)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    from torch.utils.tensorboard import SummaryWriter  # pylint: disable=g-import-not-at-top  # pyright: ignore[reportMissingImports]

    return SummaryWriter(logdir)
  except Exception:  # pylint: disable=broad-except
    return None


def fmt_tokens(x: float) -> str:
  """A token rate for the terminal: 12.3k or 456."""
  return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"
