"""The module paths of the first, flat layout, kept importable.

`import sparse_attn.decode` or `from sparse_attn.baseline_layers import
key_budget` keep working: each old path is a thin module whose attributes
come from the modules its contents moved to (listed in `MOVED`). Importing
one warns once with a DeprecationWarning naming the new home.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: old module -> the modules its public names now live in (searched in order).
MOVED: dict[str, tuple[str, ...]] = {
  "sparse_attn._checks": ("sparse_attn.ops.checks",),
  "sparse_attn.masking": ("sparse_attn.ops.masking",),
  "sparse_attn.chunking": ("sparse_attn.ops.chunking",),
  "sparse_attn.rope": ("sparse_attn.ops.rope",),
  "sparse_attn.attention": ("sparse_attn.ops.attention",),
  "sparse_attn.losses": ("sparse_attn.ops.losses",),
  "sparse_attn.indexer": ("sparse_attn.ops.indexer", "sparse_attn.nn.indexer"),
  "sparse_attn.patterns": ("sparse_attn.kinds.patterns",),
  "sparse_attn.lsh": ("sparse_attn.kinds.lsh",),
  "sparse_attn.nsa": ("sparse_attn.kinds.nsa",),
  "sparse_attn.moba": ("sparse_attn.kinds.moba",),
  "sparse_attn.params": ("sparse_attn.nn.params",),
  "sparse_attn.layers": ("sparse_attn.nn", "sparse_attn.nn.base"),
  "sparse_attn.baseline_layers": (
    "sparse_attn.nn",
    "sparse_attn.budgets",
    "sparse_attn.registry",
  ),
  "sparse_attn.model": (
    "sparse_attn.models",
    "sparse_attn.models.transformer",
    "sparse_attn.registry",
    "sparse_attn.nn",
  ),
  "sparse_attn.decode": (
    "sparse_attn.inference",
    "sparse_attn.inference.decoder",
    "sparse_attn.models.cache",
    "sparse_attn.nn.base",
    "sparse_attn.ops.quantize",
  ),
  "sparse_attn.train": ("sparse_attn.training",),
}


class MovedModule(types.ModuleType):
  """A module whose attributes are looked up in the modules of MOVED[name]."""

  def __init__(self, name: str, targets: tuple[str, ...]):
    super().__init__(name, f"Moved to {', '.join(targets)}.")
    self.__targets = targets

  def __getattr__(self, attr: str) -> Any:
    if attr.startswith("__"):
      raise AttributeError(attr)
    for target in self.__targets:
      module = importlib.import_module(target)
      if hasattr(module, attr):
        return getattr(module, attr)
    raise AttributeError(
      f"module {self.__name__!r} (moved to "
      f"{', '.join(self.__targets)}) has no attribute "
      f"{attr!r}"
    )

  def __dir__(self) -> list[str]:
    names: set[str] = set()
    for target in self.__targets:
      names.update(dir(importlib.import_module(target)))
    return sorted(names)


class _Loader(importlib.abc.Loader):
  def create_module(self, spec):
    return MovedModule(spec.name, MOVED[spec.name])

  def exec_module(self, module):
    warnings.warn(
      f"{module.__name__} moved to {', '.join(MOVED[module.__name__])}",
      DeprecationWarning,
      stacklevel=2,
    )


class MovedModuleFinder(importlib.abc.MetaPathFinder):
  """Finds the old module paths of MOVED (nothing else)."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname not in MOVED:
      return None
    return importlib.machinery.ModuleSpec(fullname, _Loader())


def install() -> None:
  """Puts the finder on sys.meta_path once (sparse_attn/__init__ calls it)."""
  if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(MovedModuleFinder())
