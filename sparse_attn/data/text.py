"""The byte-level text corpus: listing files, the split by file, loading.

Default corpus: every `.py` file under `sysconfig.get_paths()["stdlib"]`
(CPython 3.11: ~1,790 files, ~31.5 MB, including the `test` package, whose
files are ordinary Python, only more of it), excluding `site-packages`,
`dist-packages`, `__pycache__` and hidden entries. Or `path=`: a file, a
directory (recursively: every non-hidden, non-empty file, optionally filtered
by `suffixes`), or a list of those.

The train/validation split is BY FILE: a file is in validation iff
sha256(relative_path)[:8] / 2**64 < val_fraction (default 2%), with at least
one file forced into each split. A single file is split by bytes instead (its
last val_fraction goes to validation). Files of a split are concatenated in
hash order (a fixed pseudo-random order), so `max_bytes` keeps a
deterministic, well-mixed prefix and reads only the files it needs. Each file
is followed by DOC_SEP (byte 0x00, absent from CPython 3.11's standard-library
sources), so a window may span a document boundary and the model sees where
documents end.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig
import tempfile
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from sparse_attn.data.checks import as_fraction, as_int, check_split

DOC_SEP = 0  # byte that terminates every document in the text corpus

_STDLIB_EXCLUDE = frozenset({"site-packages", "dist-packages", "__pycache__"})

# (relative name, absolute path) of one corpus file.
CorpusFile = tuple[str, pathlib.Path]


class TextCorpus(NamedTuple):
  """One split of a byte corpus."""

  data: np.ndarray  # uint8[N], read-only (possibly a np.memmap)
  files: tuple[str, ...]  # relative names of the files in `data`, in order


def _as_paths(path) -> list[pathlib.Path]:
  if isinstance(path, (str, os.PathLike)):
    return [pathlib.Path(path)]
  if isinstance(path, Sequence) and path:
    return [pathlib.Path(p) for p in path]
  raise ValueError(
    f"path must be a file/directory path or a non-empty list "
    f"of them, got {path!r}"
  )


def list_text_files(
  path=None, *, suffixes: Sequence[str] | None = None
) -> list[CorpusFile]:
  """Files of a corpus as sorted `(relative_name, absolute_path)` pairs.

  path: None (Python stdlib `.py` sources), a file, a directory, or a list
    of those. Directories are walked recursively in sorted order, skipping
    hidden entries and `__pycache__` (and, for the stdlib, site-packages /
    dist-packages). Empty files are skipped. The relative name (posix,
    relative to the directory given; a file's own name for a file given
    directly) is what decides the split.
  suffixes: keep only files whose names end with one of these (applied to
    files found in directories; default: `(".py",)` for the stdlib, all
    files otherwise).
  Raises FileNotFoundError naming a missing path, ValueError if nothing is
  found.
  """
  if path is None:
    roots = [pathlib.Path(sysconfig.get_paths()["stdlib"])]
    exclude = _STDLIB_EXCLUDE
    suffixes = (".py",) if suffixes is None else suffixes
  else:
    roots = _as_paths(path)
    exclude = frozenset({"__pycache__"})
  if isinstance(suffixes, str):
    suffixes = (suffixes,)
  suffixes = tuple(suffixes) if suffixes is not None else None
  found: dict[pathlib.Path, str] = {}
  for root in roots:
    if not root.exists():
      raise FileNotFoundError(f"text corpus path does not exist: {str(root)!r}")
    if root.is_file():
      if root.stat().st_size > 0:
        found.setdefault(root.resolve(), root.name)
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(
        d for d in dirnames if not d.startswith(".") and d not in exclude
      )
      for fn in sorted(filenames):
        if fn.startswith(".") or (
          suffixes is not None and not fn.endswith(suffixes)
        ):
          continue
        full = pathlib.Path(dirpath, fn)
        try:
          if not full.is_file() or full.stat().st_size == 0:
            continue
        except OSError:
          continue
        found.setdefault(full.resolve(), full.relative_to(root).as_posix())
  if not found:
    if path is None:
      what = "the Python standard library"
    else:
      what = repr(str(roots[0]) if len(roots) == 1 else [str(r) for r in roots])
    raise ValueError(
      f"no non-empty text files found in {what} (suffixes={suffixes})"
    )
  return sorted(
    ((rel, p) for p, rel in found.items()), key=lambda t: (t[0], str(t[1]))
  )


def _file_hash(rel: str) -> float:
  """Stable hash of a relative path as a float in [0, 1)."""
  digest = hashlib.sha256(rel.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
  files: Sequence[CorpusFile], val_fraction: float = 0.02
) -> tuple[list[CorpusFile], list[CorpusFile]]:
  """Deterministic split BY FILE -> (train, validation), each in hash order.

  A file goes to validation iff hash(relative_name) < val_fraction. With two
  or more files each split is guaranteed at least one file (the lowest-hash
  file is moved to validation / the highest-hash file to train if needed).
  """
  val_fraction = as_fraction(
    "val_fraction", val_fraction, lo_open=True, hi_open=True
  )
  ordered = sorted(files, key=lambda f: (_file_hash(f[0]), f[0], str(f[1])))
  train = [f for f in ordered if _file_hash(f[0]) >= val_fraction]
  val = [f for f in ordered if _file_hash(f[0]) < val_fraction]
  if len(ordered) >= 2:
    if not val:
      val, train = [train[0]], train[1:]
    elif not train:
      train, val = [val[-1]], val[:-1]
  return train, val


_MEMO: dict[str, TextCorpus] = {}
_MEMO_MAX = 8


def clear_cache() -> None:
  """Forgets the corpora memoised in this process (disk caches stay)."""
  _MEMO.clear()


def _concat(
  files: Sequence[CorpusFile], max_bytes: int | None
) -> tuple[bytes, list[str]]:
  parts, names, total = [], [], 0
  sep = bytes([DOC_SEP])
  for rel, p in files:
    if max_bytes is not None and total >= max_bytes:
      break
    b = p.read_bytes()
    if not b:
      continue
    parts += [b, sep]
    names.append(rel)
    total += len(b) + 1
  blob = b"".join(parts)
  return (blob[:max_bytes] if max_bytes is not None else blob), names


def load_text(
  path=None,
  *,
  split: str = "train",
  max_bytes: int | None = None,
  val_fraction: float = 0.02,
  suffixes: Sequence[str] | None = None,
  cache_dir: str | os.PathLike | None = None,
) -> TextCorpus:
  """Loads one split of a byte corpus as a uint8 array (see module docstring).

  max_bytes: keep only the first max_bytes bytes of the split (files in hash
    order; only the files needed are read).
  cache_dir: if given (or env `SPARSE_ATTN_DATA_CACHE` is set), the array is
    cached there as `.npy` keyed by the file list, sizes, mtimes and options,
    and loaded back with mmap_mode="r". Results are also memoised in-process
    (`clear_cache` forgets them).
  """
  split = check_split(split)
  if max_bytes is not None:
    max_bytes = as_int("max_bytes", max_bytes, 1)
  files = list_text_files(path, suffixes=suffixes)
  train, val = split_files(files, val_fraction)
  single = len(files) == 1
  chosen = files if single else (train if split == "train" else val)
  stats = [
    (rel, str(p), p.stat().st_size, p.stat().st_mtime_ns) for rel, p in chosen
  ]
  key = hashlib.sha256(
    repr(("v1", split, float(val_fraction), max_bytes, single, stats)).encode()
  ).hexdigest()[:24]
  if key in _MEMO:
    return _MEMO[key]
  if cache_dir is None:
    cache_dir = os.environ.get("SPARSE_ATTN_DATA_CACHE") or None
  cache_file = (
    pathlib.Path(cache_dir, f"sparse_attn_text_{key}.npy")
    if cache_dir
    else None
  )
  names_file = cache_file.with_suffix(".files.txt") if cache_file else None
  if (
    cache_file is not None
    and names_file is not None
    and cache_file.exists()
    and names_file.exists()
  ):
    corpus = TextCorpus(
      np.load(cache_file, mmap_mode="r"),
      tuple(names_file.read_text("utf-8").splitlines()),
    )
  else:
    if single:
      blob, names = _concat(chosen, None)
      n_val = max(1, int(round(len(blob) * val_fraction)))
      if len(blob) < 2:
        raise ValueError(
          f"text file {str(chosen[0][1])!r} is too short to "
          f"split into train/validation"
        )
      blob = (
        blob[: len(blob) - n_val]
        if split == "train"
        else blob[len(blob) - n_val :]
      )
      blob = blob[:max_bytes] if max_bytes is not None else blob
    else:
      blob, names = _concat(chosen, max_bytes)
    arr = np.frombuffer(blob, dtype=np.uint8)
    corpus = TextCorpus(arr, tuple(names))
    if cache_file is not None and names_file is not None:
      cache_file.parent.mkdir(parents=True, exist_ok=True)
      fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npy.tmp")
      with os.fdopen(fd, "wb") as f:
        np.save(f, arr)
      names_file.write_text("\n".join(names), "utf-8")
      os.replace(tmp, cache_file)  # atomic: readers never see a partial file
      corpus = TextCorpus(np.load(cache_file, mmap_mode="r"), corpus.files)
  if len(_MEMO) >= _MEMO_MAX:
    _MEMO.pop(next(iter(_MEMO)))
  _MEMO[key] = corpus
  return corpus
