"""Tensor mapping rules between this library's parameters and HF tensor names.

A `Rule` ties some parameters (paths into the model's nnx state, e.g.
("blocks", 0, "attn", "wq_b")) to some HF tensors, with the two layout
conversions. HF linear weights are [out, in]; this library keeps [in, out]
with the heads as an axis of their own ([E, H, D], [H, D, E]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Path = tuple
Arrays = list[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
  """params <-> tensors: load(tensors) -> params, save(params) -> tensors."""

  params: tuple[Path, ...]
  tensors: tuple[str, ...]
  load: Callable[[Arrays], Arrays]
  save: Callable[[Arrays], Arrays]


def same(path: Path, name: str) -> Rule:
  """A tensor kept as is (embeddings, norm scales, biases)."""
  return Rule((path,), (name,), lambda t: [t[0]], lambda p: [p[0]])


def linear(path: Path, name: str) -> Rule:
  """[in, out] <-> HF [out, in]."""
  return Rule((path,), (name,), lambda t: [t[0].T], lambda p: [p[0].T])


def heads_out(path: Path, name: str, heads: int) -> Rule:
  """[in, H, D] <-> HF [H * D, in] (a projection to per-head features)."""

  def load(t):
    w = t[0]
    return [w.reshape(heads, -1, w.shape[1]).transpose(2, 0, 1)]

  def save(p):
    w = p[0]
    return [w.transpose(1, 2, 0).reshape(-1, w.shape[0])]

  return Rule((path,), (name,), load, save)


def heads_bias(path: Path, name: str, heads: int) -> Rule:
  """[H, D] <-> HF [H * D] (the bias of a per-head projection)."""
  return Rule(
    (path,),
    (name,),
    lambda t: [t[0].reshape(heads, -1)],
    lambda p: [p[0].reshape(-1)],
  )


def heads_in(path: Path, name: str, heads: int) -> Rule:
  """[H, D, out] <-> HF [out, H * D] (an output projection of the heads)."""

  def load(t):
    w = t[0]
    return [w.reshape(w.shape[0], heads, -1).transpose(1, 2, 0)]

  def save(p):
    w = p[0]
    return [w.transpose(2, 0, 1).reshape(w.shape[2], -1)]

  return Rule((path,), (name,), load, save)


def split_heads_out(
  paths: Sequence[Path], name: str, heads: int, sizes: Sequence[int]
) -> Rule:
  """Several [in, H, D_i] <-> HF [H * sum(D_i), in], each head [D_0 ; D_1 ; ...]."""
  cuts = np.cumsum(sizes)[:-1].tolist()

  def load(t):
    w = t[0].reshape(heads, sum(sizes), t[0].shape[1])
    return [p.transpose(2, 0, 1) for p in np.split(w, cuts, axis=1)]

  def save(p):
    w = np.concatenate([x.transpose(1, 2, 0) for x in p], axis=1)
    return [w.reshape(-1, w.shape[2])]

  return Rule(tuple(paths), (name,), load, save)


def stacked_linear(path: Path, names: Sequence[str]) -> Rule:
  """[N, in, out] <-> N HF tensors [out, in] (per-expert weights)."""

  def load(t):
    return [np.stack([w.T for w in t])]

  def save(p):
    return [w.T for w in p[0]]

  return Rule((path,), tuple(names), load, save)


def transposed_stack(path: Path, name: str) -> Rule:
  """[N, in, out] <-> HF [N, out, in] (packed experts)."""
  return Rule(
    (path,),
    (name,),
    lambda t: [t[0].transpose(0, 2, 1)],
    lambda p: [p[0].transpose(0, 2, 1)],
  )


def packed_gate_up(gate: Path, up: Path, name: str) -> Rule:
  """gate, up [N, in, I] <-> HF [N, 2I, in] (transformers' packed experts)."""

  def load(t):
    g, u = np.split(t[0], 2, axis=1)
    return [g.transpose(0, 2, 1), u.transpose(0, 2, 1)]

  def save(p):
    return [np.concatenate([x.transpose(0, 2, 1) for x in p], axis=1)]

  return Rule((gate, up), (name,), load, save)


def tensor_names(rules: Sequence[Rule]) -> set[str]:
  return {n for r in rules for n in r.tensors}


def apply_load(
  rules: Sequence[Rule],
  read: Callable[[str], np.ndarray],
  shapes: Mapping[Path, tuple[int, ...]],
  convert: Callable[[Path, np.ndarray], Any] = lambda path, arr: arr,
) -> dict[Path, Any]:
  """{param path: convert(path, array)} from HF tensors, checked against
  `shapes`, one rule at a time.

  ValueError naming the tensor, its shape and the parameter it feeds when a
  converted tensor does not fit.
  """
  out: dict[Path, Any] = {}
  for rule in rules:
    arrays = rule.load([read(n) for n in rule.tensors])
    for path, arr in zip(rule.params, arrays):
      want = tuple(shapes[path])
      if tuple(arr.shape) != want:
        raise ValueError(
          f"tensor(s) {list(rule.tensors)} give shape {tuple(arr.shape)} for "
          f"parameter {'.'.join(map(str, path))}, which needs {want}."
        )
      out[path] = convert(path, arr)
  return out


def apply_save(
  rules: Sequence[Rule], params: Mapping[Path, np.ndarray]
) -> dict[str, np.ndarray]:
  """{HF tensor name: array} from parameters."""
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    arrays = rule.save([params[p] for p in rule.params])
    for name, arr in zip(rule.tensors, arrays):
      out[name] = arr
  return out
