"""Reading and writing HF checkpoint tensors: safetensors files, shards, FP8.

A checkpoint directory holds `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` named by `model.safetensors.index.json`
({"weight_map": {tensor: file}}), as transformers' `save_pretrained` and
DeepSeek's releases write them. Tensors are read lazily, one at a time,
with the `safetensors` package (numpy framework; bfloat16 through
ml_dtypes, which JAX installs). Float8 tensors, which its numpy framework
cannot return, are memory-mapped at the offsets of the file's own header
(the safetensors format: an 8-byte little-endian header size, a JSON header
{name: {dtype, shape, data_offsets}}, then the data). No torch is imported.

DeepSeek's FP8 releases store a linear weight W [out, in] as float8_e4m3fn
with `<name>_scale_inv` f32 [ceil(out/128), ceil(in/128)]: W = W8 * scale
per 128 x 128 block (`dequantize_blocks`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_RAW_DTYPES = {
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointTensors(Mapping):
  """Lazy read-only mapping tensor name -> np.ndarray of a checkpoint dir."""

  def __init__(self, path: str):
    self.path = path
    single = os.path.join(path, SINGLE_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' object.")
      self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      self.files = {}
      with safe_open(single, framework="numpy") as f:
        for k in f.keys():
          self.files[k] = single
    else:
      shards = sorted(
        n for n in os.listdir(path) if re.fullmatch(r".*\.safetensors", n)
      )
      if not shards:
        raise ValueError(
          f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors in {path!r}."
        )
      self.files = {}
      for n in shards:
        with safe_open(os.path.join(path, n), framework="numpy") as f:
          for k in f.keys():
            self.files[k] = os.path.join(path, n)
    missing = sorted({f for f in self.files.values() if not os.path.exists(f)})
    if missing:
      raise ValueError(f"checkpoint {path!r} lacks the shard files {missing}.")

  def __getitem__(self, name: str) -> np.ndarray:
    return read_tensor(self.files[name], name)

  def __iter__(self) -> Iterator[str]:
    return iter(self.files)

  def __len__(self) -> int:
    return len(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    with safe_open(self.files[name], framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype string ("F32", "BF16", "F8_E4M3", ...)."""
    with safe_open(self.files[name], framework="numpy") as f:
      return f.get_slice(name).get_dtype()


def read_tensor(file: str, name: str) -> np.ndarray:
  """Tensor `name` of one safetensors file as a numpy array."""
  with safe_open(file, framework="numpy") as f:
    dtype = f.get_slice(name).get_dtype()
    if dtype not in _RAW_DTYPES:
      return f.get_tensor(name)
  return _read_raw(file, name, dtype)


def _read_raw(file: str, name: str, dtype: str) -> np.ndarray:
  with open(file, "rb") as fh:
    header_len = int.from_bytes(fh.read(8), "little")
    header = json.loads(fh.read(header_len))
  entry = header[name]
  start, end = entry["data_offsets"]
  data = np.memmap(
    file,
    dtype=np.uint8,
    mode="r",
    offset=8 + header_len + start,
    shape=(end - start,),
  )
  return np.array(data).view(_RAW_DTYPES[dtype]).reshape(entry["shape"])


def dequantize_blocks(
  weight: np.ndarray, scale_inv: np.ndarray, block: int = 128
) -> np.ndarray:
  """f32 [out, in] = weight * scale_inv of its block (DeepSeek's FP8 weights)."""
  out, inp = weight.shape
  rows, cols = -(-out // block), -(-inp // block)
  if scale_inv.shape != (rows, cols):
    raise ValueError(
      f"weight_scale_inv shape {scale_inv.shape} must be (ceil(out/{block}), "
      f"ceil(in/{block})) = {(rows, cols)} for a weight of shape "
      f"{weight.shape}."
    )
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)
  return weight.astype(np.float32) * scale[:out, :inp]


def write_checkpoint(
  path: str,
  tensors: Mapping[str, np.ndarray],
  *,
  max_shard_bytes: int | None = None,
) -> list[str]:
  """Writes tensors as model.safetensors, or as shards + an index when their
  size exceeds max_shard_bytes. Returns the files written."""
  os.makedirs(path, exist_ok=True)
  # A previous checkpoint's index or shards would shadow the new files.
  for old in os.listdir(path):
    if old in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(
      r"model-\d+-of-\d+\.safetensors", old
    ):
      os.remove(os.path.join(path, old))
  names = sorted(tensors)
  shards: list[list[str]] = [[]]
  size = 0
  for n in names:
    nbytes = tensors[n].nbytes
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(n)
    size += nbytes
  meta = {"format": "pt"}  # what transformers expects of a safetensors file
  if len(shards) == 1:
    save_file(
      _contiguous(tensors, names), os.path.join(path, SINGLE_FILE), meta
    )
    return [SINGLE_FILE]
  files, weight_map, total = [], {}, 0
  for i, group in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(_contiguous(tensors, group), os.path.join(path, fname), meta)
    files.append(fname)
    for n in group:
      weight_map[n] = fname
      total += tensors[n].nbytes
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return files + [INDEX_FILE]


def _contiguous(tensors: Mapping[str, Any], names) -> dict[str, np.ndarray]:
  return {n: np.ascontiguousarray(tensors[n]) for n in names}
